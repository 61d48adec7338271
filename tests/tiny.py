"""Tiny randomly initialised models built from a config, for fast tests."""
from __future__ import annotations

import functools

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_config(**over) -> LlamaConfig:
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(over)
    return LlamaConfig(**cfg)


@functools.lru_cache(maxsize=8)
def _tiny(seed: int, key: tuple):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**dict(key))).eval()
    # Larger-than-default weights so attention is peaked and errors show up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(3.0)
    return model


def tiny_llama(seed: int = 0, **over) -> LlamaForCausalLM:
    """A fresh copy of a cached tiny Llama (fp32, CPU)."""
    import copy
    return copy.deepcopy(_tiny(seed, tuple(sorted(over.items()))))


def tiny_arch(arch: str, seed: int = 0, **over):
    """A tiny random model (fp32, CPU) of another architecture users load: Mistral, Qwen2
    (q/k/v biases), Qwen3 (q/k norms), Phi-3 (fused qkv projection, its own partial-rotary
    RoPE under `partial_rotary_factor`)."""
    import transformers as tf
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               tie_word_embeddings=False, pad_token_id=0)
    if arch == "qwen3":
        cfg["head_dim"] = 16  # Qwen3Config's default is 128, not hidden / heads
    cfg.update(over)
    name = {"mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3"}[arch]
    torch.manual_seed(seed)
    return getattr(tf, f"{name}ForCausalLM")(getattr(tf, f"{name}Config")(**cfg)).eval()


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """Byte-level tokenizer (256 byte tokens + specials) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


TINY_VOCAB = 264  # >= len(tiny_tokenizer()); ids: pad 0, bos 1, eos 2


def tiny_pair(seed: int = 0, **over):
    """(model, tokenizer) for runtime tests; eos = <|im_end|> = 2."""
    over.setdefault("vocab_size", TINY_VOCAB)
    return tiny_llama(seed, **over), tiny_tokenizer()


def random_heads(info, path, seed: int = 1, **shape):
    """Random Locret retaining heads for the model `info` describes (tiny models ship none),
    saved at `path` -> path. shape overrides n_layers, d_in, d_r (16) or n_kv: a file made
    for another model."""
    from policies.locret import RetainingHeads, model_key, save_heads
    torch.manual_seed(seed)
    dims = dict(n_layers=info.n_layers, d_in=info.hidden_size, d_r=16, n_kv=info.n_kv_heads) | shape
    save_heads(RetainingHeads(**dims), path, model_key(info), ["tiny"])
    return path


def tiny_policy_files(folder, **over) -> dict:
    """Random retaining heads and channels calibrated on random tokens for the tiny runtime
    (tiny_pair(0, **over) behind a Runtime, tokenizer included: its model key).
    -> {"heads": path, "ch": path}."""
    from app.outlier_channels import collect
    from app.runtime.engine import Runtime
    from offload.calibrate import save
    from policies.locret import model_key
    m, t = tiny_pair(0, **over)
    ad = Runtime.from_model(m, t, model_id="tiny").adapter
    info = ad.info
    random_heads(info, f"{folder}/heads.safetensors", seed=5)
    gen = torch.Generator().manual_seed(0)
    stats = collect(ad, [torch.randint(4, 260, (64,), generator=gen) for _ in range(4)])
    save(f"{folder}/ch.safetensors", stats.mean(), 4, model_key(info), ["tiny"], 256, "random tokens (test)")
    return {"heads": f"{folder}/heads.safetensors", "ch": f"{folder}/ch.safetensors"}


def tiny_model_dir(tmp_path, monkeypatch):
    """The tiny model and tokenizer saved as a folder a user would pass with --model, with the
    config, data and cache dirs under tmp_path (-> the folder)."""
    m, t = tiny_pair(0)
    model_dir = tmp_path / "tiny-model"
    m.save_pretrained(model_dir)
    t.save_pretrained(model_dir)
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("VRAMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    return model_dir
