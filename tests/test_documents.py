"""Every bad document gets a clear error naming the problem; good ones are read whole."""
import os
import socket

import pytest

from app.runtime import documents
from app.runtime.documents import read_document
from app.runtime.types import VramchatError


def err(path):
    with pytest.raises(VramchatError) as e:
        read_document(path)
    return str(e.value)


def test_missing_file(tmp_path):
    assert "no such file" in err(tmp_path / "nope.txt")


def test_directory(tmp_path):
    assert "is a directory" in err(tmp_path)


def test_symlink_loop(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    msg = err(a)
    assert str(a) in msg and "cannot be opened" in msg


def test_device_and_fifo_are_refused_without_reading(tmp_path):
    assert "not a regular file" in err("/dev/zero")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert "not a regular file" in err(fifo)  # would block forever if opened


def test_socket_refused(tmp_path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "sock"))
    try:
        assert "not a regular file" in err(tmp_path / "sock")
    finally:
        s.close()


def test_binary(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(bytes(range(256)) * 10)
    assert "binary" in err(p)


def test_invalid_utf8_says_where(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(b"line one\nline two caf\xe9\n")
    msg = err(p)
    assert "not valid UTF-8" in msg and "offset 21" in msg and "line 2" in msg


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"])
def test_empty(tmp_path, content):
    p = tmp_path / "empty.md"
    p.write_bytes(content)
    assert "is empty" in err(p)


def test_too_large_refused_before_reading(tmp_path, monkeypatch):
    p = tmp_path / "big.txt"
    p.write_text("word " * 1000)
    monkeypatch.setattr(documents, "max_bytes", lambda: 1000)
    msg = err(p)
    assert "4.9 KiB" in msg and "at most 1000 B" in msg


def test_file_growing_past_the_limit_while_read(tmp_path, monkeypatch):
    p = tmp_path / "grows.txt"
    p.write_text("x" * 100)
    monkeypatch.setattr(documents, "max_bytes", lambda: 500)
    real_open = open

    def growing_open(path, mode="r", *a, **k):
        with real_open(path, "a") as fh:  # another writer appends between stat and read
            fh.write("y" * 1000)
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr("builtins.open", growing_open)
    assert "grew past 500 B" in err(p)


def test_reads_whole_text_and_bom(tmp_path):
    p = tmp_path / "ok.md"
    body = "# Title\r\n" + "Ünïcode text. " * 5000
    p.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert read_document(p) == body.replace("\r\n", "\n")


def _pdf(path, text=None, password=None):
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject
    w = PdfWriter()
    page = w.add_blank_page(200, 200)
    if text is not None:
        font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                                 NameObject("/BaseFont"): NameObject("/Helvetica")})
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): w._add_object(font)})})
        stream = DecodedStreamObject()
        stream.set_data(f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode())
        page[NameObject("/Contents")] = w._add_object(stream)
    if password:
        w.encrypt(password)
    with open(path, "wb") as fh:
        w.write(fh)


def test_pdf_text(tmp_path):
    p = tmp_path / "a.pdf"
    _pdf(p, "The deadline is Friday")
    assert "The deadline is Friday" in read_document(p)


def test_pdf_without_text_layer(tmp_path):
    p = tmp_path / "scan.pdf"
    _pdf(p)
    assert "no text layer" in err(p)


def test_pdf_encrypted(tmp_path):
    p = tmp_path / "secret.pdf"
    _pdf(p, "hidden", password="pw")
    assert "encrypted PDF" in err(p)


def test_pdf_garbage(tmp_path):
    p = tmp_path / "broken.pdf"
    p.write_bytes(b"%PDF-1.4\n this is not a pdf")
    assert "not a readable PDF" in err(p)
