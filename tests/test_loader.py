"""Model loading: local folders, GGUF cache integrity, clear refusals."""
import json

import pytest
import torch

from app.runtime import loader
from app.runtime.engine import Runtime
from app.runtime.types import VramchatError
from tiny import tiny_pair


def test_local_hf_folder_round_trip(tmp_path):
    """The path real users take: a saved HF folder (safetensors) loads and answers like
    the in-memory model."""
    model, tok = tiny_pair(11)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    rt = Runtime.load(str(tmp_path), weights="fp32", device="cpu")
    ref = Runtime.from_model(tiny_pair(11)[0], tok)
    assert rt.model_id == str(tmp_path) and rt.weights == "fp32"
    assert rt.ask("hi there", max_new_tokens=8).answer == ref.ask("hi there", max_new_tokens=8).answer


def test_bf16_weights_on_cpu(tmp_path):
    model, tok = tiny_pair(12)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rt = Runtime.load(str(tmp_path), weights="bf16", device="cpu")
    assert rt.adapter.info.dtype == torch.bfloat16
    rt.ask("x", max_new_tokens=2)
    assert rt.memory().kv["gpu"]["keys"] % 2 == 0 and rt.cache.layers[0].store.k.dtype == torch.bfloat16


@pytest.mark.parametrize("model,needle", [
    ("meta-llama/Not-A-Real-Model-xyz", "could not load model"),
    ("./no/such/dir", "not found: no such folder"),
    ("weird name with spaces", "not found"),
])
def test_missing_models_say_what_to_do(model, needle, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VramchatError, match=needle):
        Runtime.load(model, device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(VramchatError, match="without config.json"):
        loader.load(str(tmp_path), device="cpu")


def test_missing_gguf(tmp_path):
    with pytest.raises(VramchatError, match="does not exist"):
        loader.load(str(tmp_path / "m.gguf"), device="cpu")


def test_quantized_weights_need_cuda():
    with pytest.raises(VramchatError, match="needs bitsandbytes on a CUDA GPU"):
        loader.resolve_weights("4bit", torch.device("cpu"))
    with pytest.raises(VramchatError, match="choose one of"):
        loader.resolve_weights("3bit", torch.device("cpu"))


def test_bad_device():
    with pytest.raises(VramchatError, match="unknown device"):
        loader.resolve_device("tpu:9")
    if not torch.cuda.is_available():
        with pytest.raises(VramchatError, match="no CUDA GPU"):
            loader.resolve_device("cuda")


def test_bad_spec_fails_before_loading():
    from policies import SpecError
    with pytest.raises(SpecError, match="unknown policy"):
        Runtime.load("/definitely/not/loaded", policy="magic")


def test_cache_manifest_detects_truncation_and_corruption(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "manifest.json").write_text(json.dumps(loader._manifest(tmp_path)))
    assert loader.check_cached(tmp_path, full=True)
    (tmp_path / "model.safetensors").write_bytes(b"y" * 1000)  # same size, other bytes
    assert loader.check_cached(tmp_path) and not loader.check_cached(tmp_path, full=True)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)  # truncated
    assert not loader.check_cached(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    assert not loader.check_cached(tmp_path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes 4/8-bit weights)")
@pytest.mark.parametrize("weights", ["4bit", "8bit", "bf16"])
def test_cuda_weights_load_and_answer(tmp_path, weights):
    model, tok = tiny_pair(13, hidden_size=128, intermediate_size=256)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rt = Runtime.load(str(tmp_path), weights=weights, device="cuda")
    assert rt.device.type == "cuda" and rt.weights == weights
    res = rt.ask("hello", max_new_tokens=4)
    assert res.new_tokens >= 1 and rt.memory().torch_allocated > 0
