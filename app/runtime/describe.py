"""A model described for `main.py plan` and `auto` from its metadata alone (config.json, a
GGUF header, a hub-cache entry; no weights read) or from a loaded runtime: parameter counts
of the model built on the `meta` device, its ModelInfo, and its weights' bytes at each
`--weights` choice (4/8-bit: the decoder's Linear weights quantized as bitsandbytes stores
them, everything else in bf16)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .types import VramchatError

CHOICES = ("fp32", "bf16", "fp16", "8bit", "4bit")
_ELT = {"fp32": 4, "bf16": 2, "fp16": 2, "8bit": 2, "4bit": 2}  # bytes of what is not quantized
NF4_BLOCK = 64  # bitsandbytes 4-bit: one fp32 absmax per 64 weights


@dataclasses.dataclass
class Model:
    model_id: str
    arch: str
    info: object  # policies.ModelInfo on the meta device
    linear: int  # parameters of the decoder layers' Linear weights (what 4/8-bit quantizes)
    other: int  # every other parameter (embeddings, lm head, norms, biases)
    buffers: int  # bytes of the model's buffers (RoPE frequencies: kept in fp32)
    window: int
    intermediate: int
    vocab: int
    refused: dict  # policy -> why this architecture rules it out (app/runtime/adapter.refusals)


class _Vocab:
    """A tokenizer stand-in that knows only its length: a model's key for its heads and
    channels (`policies.files.model_key`) counts the vocabulary, and building a GGUF's
    tokenizer means reading every token (seconds). Its tokens' texts are unknown: each
    decodes to "" and none is special, so what a policy finds in the vocabulary when it is
    built (offload's quote log, anchor's separators) is empty: sizes do not depend on it."""

    all_special_ids: list = []
    unk_token_id = None

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batch_decode(self, ids: list) -> list[str]:
        return [""] * len(ids)

    def convert_tokens_to_ids(self, token: str) -> None:
        return None


def _tokenizer(path: Path, vocab: int, trust_remote_code: bool):
    """The model's tokenizer where it is cheap to read (a folder; the embedded model's
    converted copy), else a `_Vocab` of the GGUF's token count."""
    from transformers import AutoTokenizer
    if path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            pass
    return _Vocab(vocab)


def _config(model: str | None, trust_remote_code: bool):
    """-> (transformers config, the id to show, its folder or GGUF, vocabulary size) without
    reading weights."""
    from transformers import AutoConfig
    from . import loader
    from .resolve import resolve
    from .facts import gguf_config, read_gguf_header
    if model in (None, "", "default", loader.DEFAULT_MODEL):
        gguf = loader.default_gguf()
        cached = loader.gguf_cache_dir(gguf)  # the converted copy every start after the first loads
        path = cached if loader.check_cached(cached) else gguf
        return gguf_config(gguf), loader.DEFAULT_MODEL, path, gguf_config(gguf).vocab_size
    path = Path(model).expanduser()
    found = None if path.exists() else resolve(model)
    if found:
        path, model = found
    if path.is_file():
        cfg = gguf_config(path)
        tokens = read_gguf_header(path)[0].get("tokenizer.ggml.tokens", cfg.vocab_size)
        return cfg, model, path, tokens if isinstance(tokens, int) else len(tokens)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise VramchatError(f"{path} has no config.json: not a Hugging Face model folder")
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cfg, model, path, getattr(cfg.get_text_config(), "vocab_size", 0)
    raise VramchatError(f"model {model!r} not found on this machine (plan reads only local metadata): "
                        "pass a model folder, a .gguf file, a cached Hugging Face id or a `main.py models` name")


def describe(model: str | None = None, trust_remote_code: bool = False) -> Model:
    """The model's shapes and the runtime's ModelInfo for it, on the meta device."""
    from transformers import AutoModelForCausalLM
    cfg, model_id, path, vocab = _config(model, trust_remote_code)
    try:
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise VramchatError(f"{model_id}: transformers cannot build a causal LM from its config ({e})") from None
    from .adapter import Adapter
    ad = Adapter(hf, _tokenizer(path, vocab, trust_remote_code), model_id)
    return _model(hf, ad.info, model_id, ad.refused)


def model_of(rt) -> Model:
    """The Model of a loaded runtime `rt` (its own ModelInfo and refusals), as `describe`
    makes one from metadata."""
    return _model(rt.adapter.model, rt.adapter.info, rt.model_id, rt.adapter.refused)


def _model(hf, info, model_id: str, refused: dict) -> Model:
    """Parameter counts of `hf` (on meta, or loaded) and its ModelInfo moved to meta."""
    linear = sum(m.weight.numel() for name, m in hf.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}")
    total = sum(p.numel() for p in {id(p): p for p in hf.parameters()}.values())
    buffers = sum(b.numel() * b.element_size() for b in hf.buffers())
    cfg = hf.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    info = dataclasses.replace(info, device=torch.device("meta"), resources=info.resources)
    return Model(model_id, getattr(cfg, "model_type", "?"), info, linear, total - linear, buffers, info.window,
                 getattr(text, "intermediate_size", 4 * info.hidden_size), getattr(text, "vocab_size", 0), refused)


def weights_bytes(m: Model, choice: str) -> int:
    if choice in ("fp32", "bf16", "fp16"):
        return (m.linear + m.other) * _ELT[choice] + m.buffers
    if choice == "8bit":  # int8 weights + one fp32 scale per output row (~hidden rows: counted as 1/1024)
        return m.linear + m.linear * 4 // 1024 + m.other * 2 + m.buffers
    return m.linear // 2 + m.linear * 4 // NF4_BLOCK + m.other * 2 + m.buffers


def _dtype(choice: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16}.get(choice, torch.bfloat16)
