"""Model stores built inside the tests: tiny GGUF files written with the `gguf` package,
an Ollama store (manifests -> blobs), an LM Studio folder and a Hugging Face hub cache."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from tiny import CHATML, tiny_tokenizer

SHAPE = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, context=512)


def write_gguf(path: Path, arch: str = "llama", quant: str = "Q8_0", extra_tensor=None, seed: int = 0,
               name: str = "tiny") -> Path:
    """A complete tiny Llama-layout GGUF (weights, byte-level tokenizer, ChatML template)
    that transformers can load; `quant` is the type of the 2-D weights (F32, F16, Q8_0),
    `extra_tensor` (name, array) adds one more tensor (e.g. float64 to make it unloadable)."""
    import gguf
    rng = np.random.default_rng(seed)
    s = SHAPE
    h, d = s["hidden"], s["hidden"] // s["heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(s["context"])
    w.add_block_count(s["layers"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    tok = tiny_tokenizer()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    n_vocab = 264
    tokens = [t for t, _ in vocab] + ["ab"] + [f"<unused{i}>" for i in range(n_vocab - len(vocab) - 1)]
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens])
    w.add_token_merges(["a b"])  # transformers derives merges from scores when a file has none
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(CHATML)

    def mat(name, rows, cols):
        a = (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)
        if quant == "F32":
            w.add_tensor(name, a)
        elif quant == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    mat("token_embd.weight", n_vocab, h)
    for i in range(s["layers"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32))
        mat(f"blk.{i}.attn_q.weight", h, h)
        mat(f"blk.{i}.attn_k.weight", s["kv_heads"] * d, h)
        mat(f"blk.{i}.attn_v.weight", s["kv_heads"] * d, h)
        mat(f"blk.{i}.attn_output.weight", h, h)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32))
        mat(f"blk.{i}.ffn_gate.weight", s["ffn"], h)
        mat(f"blk.{i}.ffn_up.weight", s["ffn"], h)
        mat(f"blk.{i}.ffn_down.weight", h, s["ffn"])
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    mat("output.weight", n_vocab, h)
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def ollama_add(root: Path, name: str, gguf_file: Path | None, namespace: str = "library",
               host: str = "registry.ollama.ai", manifest: str | None = None) -> Path:
    """Put a model into an Ollama-layout store: blobs/sha256-<hex> plus a manifest at
    manifests/<host>/<namespace>/<model>/<tag> (`manifest` overrides its text)."""
    model, _, tag = name.partition(":")
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    layers = []
    if gguf_file is not None:
        dg = _digest(gguf_file)
        shutil.copy(gguf_file, blobs / dg.replace(":", "-"))
        layers.append({"mediaType": "application/vnd.ollama.image.model", "digest": dg,
                       "size": gguf_file.stat().st_size})
    tmpl = blobs / "template.tmp"
    tmpl.write_text("{{ .Prompt }}")
    dt = _digest(tmpl)
    tmpl.rename(blobs / dt.replace(":", "-"))
    layers.append({"mediaType": "application/vnd.ollama.image.template", "digest": dt, "size": 13})
    man = root / "manifests" / host / namespace / model / (tag or "latest")
    man.parent.mkdir(parents=True, exist_ok=True)
    man.write_text(manifest if manifest is not None else json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": dt, "size": 13},
        "layers": layers}))
    return man


def hub_add(cache: Path, repo_id: str, folder: Path, rev: str = "0123abcd") -> Path:
    """A hub-cache entry: models--owner--name/{blobs, refs/main, snapshots/<rev>/...} with
    the snapshot's files symlinked to blobs, as huggingface_hub lays them out."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in folder.iterdir():
        if f.is_file():
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copy(f, blob)
            (snap / f.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return snap
