"""`ffnskip`: skip saturated FFN blocks while decoding (FFN-SkipLLM, arXiv 2404.03865).

Attention always runs, so the KV cache stays whole and any selector/store composes.
Per decoded token, layer by layer: in an eligible layer (not one of the first/last
`cold` layers) whose FFN runs, the cosine similarity between the hidden state entering
the FFN block h [T, hidden] and after its residual add h + ffn(norm(h)) is measured;
once it reaches `threshold`, the FFN of every following eligible layer is skipped for
this token (its residual add becomes + 0). The first `warmup` tokens of an answer decode
densely; prefill never skips. The adapter routes each decoder layer's MLP through `mlp`.

Cold layers: `cold=first:last` (e.g. 4:4; a comma would end the option), a calibration
JSON (`save_calibration`), or `auto`: the shipped file in `policies/calib/` for this
model, else 4:4.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .registry import Opt, SpecError, register
from .slots import Ffn

CALIB_DIR = Path(__file__).parent / "calib"
DEFAULT_COLD = (4, 4)


def calibrate(cos: torch.Tensor, threshold: float) -> tuple[int, int]:
    """cos [N, L]: per decoded token, each layer's FFN in/out cosine similarity (dense run).
    -> (first, last): the leading / trailing layers whose mean similarity stays below
    `threshold` (the FFN still changes the hidden state a lot there), at least 1 each."""
    mean = cos.float().mean(0).tolist()
    first = next((i for i, c in enumerate(mean) if c >= threshold), len(mean))
    last = next((i for i, c in enumerate(reversed(mean)) if c >= threshold), len(mean))
    return max(1, first), max(1, last)


def save_calibration(path, model_id: str, cos: torch.Tensor, threshold: float) -> dict:
    """Write the calibration JSON for `cos` [N, L] (see `calibrate`); returns its content."""
    first, last = calibrate(cos, threshold)
    data = {"format": "vramchat-ffnskip-1", "model_id": model_id, "n_layers": cos.shape[1],
            "threshold": threshold, "tokens": cos.shape[0], "first": first, "last": last,
            "mean_cos": [round(c, 5) for c in cos.float().mean(0).tolist()]}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    return data


def _norm(name: str) -> str:
    return Path((name or "").rstrip("/")).name.lower().removesuffix(".gguf")


def resolve_cold(cold: str, info) -> tuple[int, int, str]:
    """-> (first, last, where it came from); raises SpecError naming the option."""
    where = "option `cold` of policy `ffnskip`"
    if cold == "auto":
        for f in sorted(CALIB_DIR.glob("ffnskip-*.json")):
            data = json.loads(f.read_text())
            if data.get("n_layers") == info.n_layers and _norm(info.model_id).startswith(_norm(data["model_id"])):
                return data["first"], data["last"], str(f)
        return (*DEFAULT_COLD, "default 4:4 (no calibration shipped for this model)")
    parts = cold.split(":") if ":" in cold else None
    if parts is not None and len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        first, last, src = int(parts[0]), int(parts[1]), cold
    else:
        p = Path(cold).expanduser()
        if not p.is_file():
            raise SpecError(f"{where}: {cold!r} is neither `first:last` (e.g. 4:4) nor a calibration file")
        data = json.loads(p.read_text())
        if data.get("format") != "vramchat-ffnskip-1" or data.get("n_layers") != info.n_layers:
            raise SpecError(f"{where}: {p} is not an ffnskip calibration for a {info.n_layers}-layer model")
        first, last, src = data["first"], data["last"], str(p)
    if first + last > info.n_layers:
        raise SpecError(f"{where}: {first}+{last} cold layers exceed the model's {info.n_layers} layers")
    return first, last, src


class FfnSkip(Ffn):
    """The model-level `ffn` component: decides per decode token which MLPs run."""

    def __init__(self, opts: dict, info):
        self.threshold, self.warmup = opts["threshold"], opts["warmup"]
        self.n_layers = info.n_layers
        self.first, self.last, self.source = resolve_cold(opts["cold"], info)
        self.skipped = self.ran = 0  # FFN blocks since the last prefill (one answer)
        self.record: list | None = None  # set to [] to log per-token cos [L] (calibration)
        self._tokens = 0
        self._decode = self._active = self._skipping = False
        self._row: list = []

    def begin(self, chunk) -> None:
        """Called by the adapter before each forward."""
        self._decode = chunk.phase == "decode"
        if not self._decode:
            self._tokens, self.skipped, self.ran = 0, 0, 0
        else:
            self._tokens += 1
        self._active = self._decode and self._tokens > self.warmup
        self._skipping = False
        if self.record is not None and self._decode:
            self._row = [float("nan")] * self.n_layers
            self.record.append(self._row)

    def state(self) -> tuple[dict, dict]:
        """The answer's counters (a restored cache decoding on skips as this one would)."""
        return {}, {"tokens": self._tokens, "skipped": self.skipped, "ran": self.ran}

    def restore(self, tensors: dict, meta: dict) -> None:
        self._tokens, self.skipped, self.ran = int(meta["tokens"]), int(meta["skipped"]), int(meta["ran"])

    def eligible(self, i: int) -> bool:
        return self.first <= i < self.n_layers - self.last

    def mlp(self, i: int, h: torch.Tensor, x: torch.Tensor, run) -> torch.Tensor:
        """h [.., hidden] enters the FFN block, x = its normed form; run(x) is the MLP."""
        if not self._decode:
            return run(x)
        if self._skipping and self.eligible(i):
            self.skipped += 1
            return torch.zeros_like(x)
        out = run(x)
        self.ran += 1
        if self._active and self.eligible(i) or self.record is not None:
            cos = float(F.cosine_similarity(h.float(), (h + out).float(), dim=-1).min())
            if self.record is not None:
                self._row[i] = cos
            if self._active and self.eligible(i) and cos >= self.threshold:
                self._skipping = True
        return out

    def ratio(self) -> float:
        """Skipped FFN blocks / FFN blocks of the decoded tokens since the last prefill."""
        n = self.skipped + self.ran
        return self.skipped / n if n else 0.0


@register("ffnskip", "ffn", {
    "threshold": Opt(float, 0.99, "FFN in/out cosine similarity after which later FFNs are skipped",
                     min=0.0, max=1.0),
    "warmup": Opt(int, 5, "first tokens of an answer decoded densely", min=0),
    "cold": Opt(str, "auto", "never-skipped first:last layers (e.g. 4:4), a calibration JSON, or auto"),
}, "skip saturated FFN blocks while decoding (FFN-SkipLLM); composes with every KV policy")
def build(policy, info, layer):
    return FfnSkip(policy.opts, info)
