"""A model's facts without loading its weights: architecture, parameters, quantization and
native window from a GGUF header or from config.json and the safetensors headers."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from .types import VramchatError


def _dequantizable(qtype) -> bool:
    """Whether gguf (what transformers dequantizes with) can dequantize this tensor type."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, dequantize
    size = GGML_QUANT_SIZES.get(qtype)
    if size is None:
        return False
    try:
        dequantize(np.zeros((1, size[1]), np.uint8), qtype)
        return True
    except NotImplementedError:
        return False


# GGUF value types (gguf.GGUFValueType): struct formats of the scalar ones
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_header(path: Path) -> tuple[dict, list[tuple[str, list[int], int]]]:
    """-> (metadata {key: value}, tensors [(name, shape, ggml type)]) from a GGUF file's
    header, reading nothing past it. Arrays longer than 64 (the tokenizer's vocabulary and
    merges) come back as their length only: gguf.GGUFReader builds every one of their
    ~10^5 strings, seconds per file."""
    with open(path, "rb") as fh:
        def read(fmt):
            size = struct.calcsize(fmt)
            data = fh.read(size)
            if len(data) != size:
                raise EOFError("the file ends inside its header")
            return struct.unpack("<" + fmt, data)[0]

        def string():
            n = read("Q")
            if n > 1 << 24:
                raise ValueError(f"a {n}-byte string")
            return fh.read(n).decode("utf-8", "replace")

        def value(vtype):
            if vtype in _SCALAR:
                return read(_SCALAR[vtype])
            if vtype == _STRING:
                return string()
            if vtype == _ARRAY:
                itype, n = read("I"), read("Q")
                if n <= 64:
                    return [value(itype) for _ in range(n)]
                if itype in _SCALAR:
                    fh.seek(n * struct.calcsize(_SCALAR[itype]), 1)
                else:
                    for _ in range(n):
                        value(itype)
                return n
            raise ValueError(f"unknown value type {vtype}")

        if fh.read(4) != b"GGUF":
            raise ValueError("no GGUF magic at the start")
        version = read("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}")
        n_tensors, n_kv = read("Q"), read("Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(read("I"))
        tensors = []
        for _ in range(n_tensors):
            name = string()
            shape = [read("Q") for _ in range(read("I"))]
            tensors.append((name, shape, read("I")))
            read("Q")  # data offset
    return meta, tensors


def gguf_facts(path: Path) -> dict:
    """-> {arch, params, quant, context, config, vocab} from a GGUF header; VramchatError on
    a file that is not GGUF, or whose quantization or architecture cannot be loaded."""
    from gguf import GGMLQuantizationType, LlamaFileType
    try:
        meta, tensors = read_gguf_header(path)
    except (ValueError, EOFError, struct.error) as e:
        raise VramchatError(f"not a readable GGUF file ({e})") from None
    arch = meta.get("general.architecture", "")
    bad = set()
    for _, _, t in tensors:
        try:
            qtype = GGMLQuantizationType(t)
        except ValueError:
            bad.add(f"type {t}")
            continue
        if not _dequantizable(qtype):
            bad.add(qtype.name)
    if bad:
        raise VramchatError(f"GGUF quantization {', '.join(sorted(bad))} cannot be dequantized by the gguf "
                            "package transformers loads with; use a Q4_K_M, Q5_K_M, Q8_0 or F16 file of this model")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        known = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise VramchatError(f"GGUF architecture `{arch or '?'}` cannot be loaded by transformers (it reads {known})")
    ft = meta.get("general.file_type")
    try:
        quant = LlamaFileType(ft).name.replace("MOSTLY_", "").replace("ALL_", "") if ft is not None else ""
    except ValueError:
        quant = f"type {ft}"
    cfg = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(arch + ".")}
    params = 0
    for _, shape, _ in tensors:
        n = 1
        for d in shape:
            n *= d
        params += n
    vocab = meta.get("tokenizer.ggml.tokens", 0)
    return {"arch": arch, "params": params, "quant": quant, "context": cfg.get("context_length"), "config": cfg,
            "vocab": vocab if isinstance(vocab, int) else len(vocab)}


def _safetensors_params(folder: Path) -> int | None:
    """Parameter count from the safetensors headers (8-byte length + JSON), no tensors read."""
    total, files = 0, sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                total += count
    return total


def _text_config(cfg: dict) -> dict:
    """The language model's part of a config (multimodal Gemma 3 nests it)."""
    return cfg.get("text_config") or cfg


def folder_facts(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise VramchatError(f"config.json unreadable ({e})") from None
    from transformers import CONFIG_MAPPING
    arch = cfg.get("model_type", "")
    if arch not in CONFIG_MAPPING:
        raise VramchatError(f"architecture `{arch or '?'}` is unknown to this transformers "
                            "(it would need --trust-remote-code, which `models` does not assume)")
    text = _text_config(cfg)
    q = cfg.get("quantization_config") or {}
    quant = q.get("quant_method", "")
    if quant and q.get("bits"):
        quant += f"-{q['bits']}bit"
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "")
    quant = quant or {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    try:
        params = _safetensors_params(folder)
    except (OSError, ValueError, struct.error, KeyError) as e:
        raise VramchatError(f"a safetensors header is unreadable ({type(e).__name__}); the download may "
                            "be incomplete") from None
    if params is None and not any(folder.glob("*.bin")):
        raise VramchatError("config.json but no weights (*.safetensors or *.bin): an incomplete download?")
    return {"arch": arch, "params": params, "quant": quant, "context": text.get("max_position_embeddings"),
            "config": text, "vocab": text.get("vocab_size", 0)}


def gguf_config(path: Path):
    """A transformers config from a GGUF header alone, as transformers' own GGUF loader maps
    it (its key table; the llama->mistral, *moe and gemma3->gemma3_text renames; tied
    embeddings where there is no output tensor). Reading the header is milliseconds where
    transformers' reader builds the whole vocabulary first (~20 s for a 49K-token one here)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_TO_TRANSFORMERS_MAPPING
    gguf_facts(path)  # refuses what transformers cannot load, with the reason
    meta, tensors = read_gguf_header(path)
    arch = meta["general.architecture"]
    model_type = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(arch, arch)
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        model_type = "mistral"
    table = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    cfg = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}))
    for key, value in meta.items():
        prefix, _, rest = key.partition(".")
        prefix = model_type if prefix == arch else prefix
        name = table.get(prefix, {}).get(rest)
        if name not in (None, -1) and prefix != "general":
            cfg[name] = value
    cfg["tie_word_embeddings"] = all(name != "output.weight" for name, _, _ in tensors)
    if "vocab_size" not in cfg:
        tokens = meta.get("tokenizer.ggml.tokens", 0)
        cfg["vocab_size"] = tokens if isinstance(tokens, int) else len(tokens)
    model_type = {"gemma3": "gemma3_text"}.get(model_type, model_type)  # the GGUF holds the text model
    return AutoConfig.for_model(model_type, **cfg)
