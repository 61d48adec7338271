"""A model of a real shape with random weights, and random policy files to go with it.

Memory and speed depend on a model's shape, not its values: `bench gpu128k`, `bench speed
--shape` and the decode probe measure these where no real model can be loaded or fits.
The retaining heads and outlier channels are random too (what they keep changes quality,
not cost), and every suite that uses them says so.
"""
from __future__ import annotations

import tempfile

import torch

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=131072,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096),
}


def build_model(shape: str, device: torch.device, weights: str):
    """Random-weight LlamaForCausalLM of the given shape, built in place on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, rms_norm_eps=1e-5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta" if weights == "4bit" else device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    if weights == "4bit":
        model = _to_4bit(model, device, dtype)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    return model.eval()


def _to_4bit(model, device, dtype):
    """Materialize a meta-device model on `device`, one decoder layer at a time, with every
    decoder Linear replaced by a bitsandbytes NF4 Linear of random weights (the bf16 model
    never exists whole)."""
    import bitsandbytes as bnb
    for layer in model.model.layers:
        layer.to_empty(device=device)
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, torch.nn.Linear):
                    w = torch.randn(mod.out_features, mod.in_features, dtype=dtype, device=device) * 0.02
                    q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=dtype,
                                          quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4").to(device)
                    setattr(parent, name, q)
        with torch.no_grad():
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
    for mod in (model.model.embed_tokens, model.model.norm, model.lm_head):
        mod.to_empty(device=device)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.02)
        model.model.norm.weight.fill_(1.0)
    with torch.device(device):  # built on meta above: its inv_freq buffer must be recomputed
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    return model



def random_heads_dir(info) -> str:
    """Random retaining heads in the heads file format (for memory/speed only)."""
    from policies.locret import RetainingHeads, model_key, save_heads
    d = tempfile.mkdtemp(prefix="vramchat-random-heads-")
    heads = RetainingHeads(info.n_layers, info.hidden_size, 256 if info.hidden_size < 1024 else 1024,
                           info.n_kv_heads)
    save_heads(heads, f"{d}/heads.safetensors", model_key(info), [info.model_id], {"random": True})
    return d


def random_channels_file(info) -> str:
    """A calibration file of random outlier channels (offload's label cache; memory and
    speed only: which channels are chosen changes what is recalled, not what it costs)."""
    from offload.calibrate import save
    from policies.files import model_key
    d = tempfile.mkdtemp(prefix="vramchat-random-channels-")
    g = torch.Generator().manual_seed(0)
    stat = torch.rand(info.n_layers, info.n_kv_heads, info.head_dim, generator=g)
    return str(save(f"{d}/channels.safetensors", stat, 16, model_key(info), [info.model_id], 0, "random (bench)"))


def random_adapter(shape: str, device: str = "auto"):
    """-> (Adapter over a random-weight model of `shape`, (random heads dir, random channels
    file)): what `bench speed --shape` measures where no real model can be loaded."""
    from app.runtime.adapter import Adapter
    dev = torch.device(("cuda:0" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    ad = Adapter(build_model(shape, dev, "bf16"), None, f"random {shape} ({'bf16' if dev.type == 'cuda' else 'fp32'})")
    print(f"model: {ad.model_id}; retaining heads and offload channels are RANDOM (speed only)")
    return ad, (random_heads_dir(ad.info), random_channels_file(ad.info))


def with_files(spec: str, heads: str | None, channels: str | None) -> str:
    """`spec` with heads= on locret and channels_file= on doublesparse and on offload
    behind a selector (`offload` alone keeps every token and needs no channels)."""
    parts = []
    alone = "+" not in spec
    for part in spec.split("+"):
        name, _, opts = part.partition(":")
        extra = {"locret": heads and f"heads={heads}", "offload": channels and not alone and f"channels_file={channels}",
                 "doublesparse": channels and f"channels_file={channels}"}.get(name)
        if extra:
            opts = f"{extra},{opts}" if opts else extra
        parts.append(f"{name}:{opts}" if opts else name)
    return "+".join(parts)
