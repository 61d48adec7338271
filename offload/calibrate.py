"""Outlier-channel calibration for label caches (Double Sparsity, arXiv 2408.07092 §3).

The "qk" statistic: for every layer, KV head and channel c, the mean over calibration
tokens t of sum_{query heads h of the group} |q[h, t, c] * k[kv, t, c]| — post-RoPE, each
token's query with its own key. Channels with the largest statistic carry most of q·k,
so a key restricted to them (its *label*) ranks tokens almost as the full key does.

NOTE: the statistic is accumulated as *sums plus a token count* and divided once at the
end, so calibrating on two half-blocks equals calibrating on one block (the reference
script overwrites the accumulator per block instead of summing).

A calibration file is safetensors holding `stat` [L, Hkv, D] float32 (the full per-channel
statistic, so any channel count can be taken from it) and `channels` [L, Hkv, r] int64
(the top r, sorted), with JSON metadata: format, model key, model names, r, token count,
data provenance and the command that made it. Policies look for the file shipped in
`offload/channels/` for their model, or take `channels_file=PATH`; there is no fallback.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from policies import ModelInfo, SpecError
from policies.files import check_digest, digest, find_file, find_shipped, model_key, read_meta  # noqa: F401  (re-exported)

FORMAT = "vramchat-channels-1"
CHANNELS_DIR = Path(__file__).parent / "channels"
HINT = ("make one with `python main.py calibrate --model M` (kept for the model on this machine and found "
        "there next time), or with `--out FILE` and pass `channels_file=FILE`")


def qk_sum(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [Hq, T, D], k [Hkv, T, D] post-RoPE -> [Hkv, D] float64: sum over the T tokens and
    the group's query heads of |q ⊙ k| (each token's query with its own key)."""
    hq, t, d = q.shape
    hkv = k.shape[0]
    qg = q.reshape(hkv, hq // hkv, t, d).double().abs()
    return (qg * k.double().abs()[:, None]).sum((1, 2))


class QKStats:
    """Accumulates the qk statistic over calibration blocks, per layer."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int):
        self.sums = torch.zeros(n_layers, n_kv, head_dim, dtype=torch.float64)  # [L, Hkv, D]
        self.tokens = torch.zeros(n_layers, dtype=torch.long)  # [L]

    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """One block of layer `layer`: q [Hq, T, D], k [Hkv, T, D] post-RoPE."""
        self.sums[layer] += qk_sum(q, k).cpu()
        self.tokens[layer] += q.shape[1]

    def mean(self) -> torch.Tensor:
        """-> [L, Hkv, D] float32 mean statistic; refuses a layer that saw no tokens."""
        if (self.tokens == 0).any():
            missing = (self.tokens == 0).nonzero()[:, 0].tolist()
            raise ValueError(f"calibration saw no tokens for layers {missing}")
        return (self.sums / self.tokens[:, None, None]).float()


def top_channels(stat: torch.Tensor, r: int) -> torch.Tensor:
    """stat [..., D] -> the r largest channels' indices [..., r] int64, sorted ascending."""
    if not 1 <= r <= stat.shape[-1]:
        raise SpecError(f"option `channels`: {r} must be between 1 and head_dim {stat.shape[-1]}")
    return stat.topk(r, dim=-1).indices.sort(dim=-1).values


def save(path: str | Path, stat: torch.Tensor, r: int, key: str, names: list[str], tokens: int,
         data: str, command: str = "") -> Path:
    """Write a calibration file (see the module docstring); returns its path."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "model_key": key, "names": json.dumps(names), "channels": str(r),
            "statistic": "qk", "tokens": str(tokens), "data": data, "command": command,
            "shape": json.dumps(list(stat.shape))}
    state = {"stat": stat.float().contiguous().cpu(), "channels": top_channels(stat.float(), r).cpu()}
    meta["sha256"] = digest(state)
    save_file(state, str(path), metadata=meta)
    return path


def load(path: str | Path, info: ModelInfo | None = None) -> tuple[torch.Tensor, dict]:
    """-> (stat [L, Hkv, D] float32, metadata); refuses another model's or a broken file."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"channels file {path} does not exist; {HINT}")
    meta = read_meta(path)
    if meta.get("format") != FORMAT:
        raise SpecError(f"{path}: not a vramchat channels file (format {meta.get('format')!r}); {HINT}")
    state = load_file(str(path))
    check_digest(path, state, meta, HINT)
    stat = state["stat"]
    if info is not None:
        want = (info.n_layers, info.n_kv_heads, info.head_dim)
        if meta.get("model_key") != model_key(info) or tuple(stat.shape) != want:
            raise SpecError(f"{path} was calibrated for model key {meta.get('model_key')} "
                            f"(stat {tuple(stat.shape)}), but this model is {model_key(info)} "
                            f"(needs [layers, kv heads, head_dim] = {list(want)}); {HINT}")
    return stat, meta


def shipped(info: ModelInfo) -> Path | None:
    """The shipped file for this model (model key and name both match), or None."""
    return find_file("channels", CHANNELS_DIR, info)


def find_channels(info: ModelInfo, r: int, path: str = "", policy: str = "offload") -> torch.Tensor:
    """-> channels [L, Hkv, r] int64 on info.device, from `path` or the shipped file.

    Cached in `info.resources`, so all layers share one load. Raises a SpecError naming
    how to make a file; arbitrary channels are never used.
    """
    key = ("channels", path or "shipped", r)
    if key in info.resources:
        return info.resources[key]
    src = Path(path).expanduser() if path else shipped(info)
    if src is None:
        raise SpecError(f"policy `{policy}` needs calibrated outlier channels for model "
                        f"{info.model_id or '?'} (key {model_key(info)}); none ship in {CHANNELS_DIR}; {HINT}")
    stat, _ = load(src, info)
    if not 1 <= r <= info.head_dim:
        raise SpecError(f"option `channels` of policy `{policy}`: {r} must be between 1 and "
                        f"head_dim {info.head_dim}")
    ch = top_channels(stat, r).to(info.device)
    info.resources[key] = ch
    return ch
