"""The label cache stores labels compactly (int8 + a scale per row) and scores as before."""
from __future__ import annotations

import pytest
import torch

from offload import labels


def rows(h=3, n=500, r=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h, n, r, generator=g) * torch.rand(r, generator=g) * 8  # uneven channels


@pytest.mark.parametrize("kind, bound", [("int8", 0.501 / 127), ("fp16", 1e-3), ("model", 0.0)])
def test_rows_decode_within_half_a_step(kind, bound):
    x = rows()
    lc = labels.LabelCache(3, 16, torch.float32, "cpu", kind)
    lc.grow(512, 0)
    lc.write(0, x[:, :200])
    lc.write(200, x[:, 200:])
    err = (lc[:, :500] - x).abs()
    assert (err <= bound * x.abs().amax(-1, keepdim=True) + 1e-7).all()
    assert kind == "model" or err.max() > 0  # it really rounds
    zero = torch.zeros(3, 4, 16)
    lc.write(500, zero)  # an all-zero row stays finite and exact
    assert torch.equal(lc[:, 500:504], zero)


def test_bytes_are_exact():
    lc = labels.LabelCache(3, 16, torch.float32, "cpu")
    lc.grow(256, 0)
    assert lc.nbytes() == 3 * 256 * (16 + 2)
    assert labels.LabelCache(3, 16, torch.float32, "cpu", "fp16").nbytes() == 0
    fp = labels.LabelCache(3, 16, torch.float32, "cpu", "model")
    fp.grow(256, 0)
    assert fp.nbytes() == 3 * 256 * 16 * 4 and fp.nbytes() / lc.nbytes() == 64 / 18  # fp32 rows: 3.6x
    assert labels.row_bytes(16, torch.float32) * 3 * 256 == lc.nbytes()
    assert labels.row_bytes(16, torch.float32, "model") * 3 * 256 == fp.nbytes()


def test_int8_rankings_agree_with_full_precision():
    x = rows(n=4000, seed=1)
    qs = torch.randn(3, 24, 16, generator=torch.Generator().manual_seed(2))
    lc = labels.LabelCache(3, 16, torch.float32, "cpu")
    lc.grow(4096, 0)
    lc.write(0, x)
    exact = labels.grouped_scores(qs, x)
    got = lc.scores(qs, 4000)
    k = 256
    a, b = exact.topk(k, 1).indices, got.topk(k, 1).indices
    overlap = sum(len(set(a[h].tolist()) & set(b[h].tolist())) for h in range(3)) / (3 * k)
    assert overlap > 0.97, overlap
    torch.testing.assert_close(got, exact, atol=0.02 * exact.abs().max().item(), rtol=0)


def test_state_round_trip_and_float_rows_from_older_files():
    x = rows(n=100, seed=3)
    lc = labels.LabelCache(3, 16, torch.float32, "cpu")
    lc.grow(256, 0)
    lc.write(0, x)
    saved = lc.state(100)
    assert saved["labels"].dtype == torch.int8 and saved["label_scales"].shape == (3, 100)
    back = labels.LabelCache(3, 16, torch.float32, "cpu")
    back.restore(saved, 100, 256)
    assert back.capacity == 256 and torch.equal(back[:, :100], lc[:, :100])
    back.restore({"labels": x}, 100, 128)  # a cache file that kept fp32 labels
    assert torch.equal(back[:, :100], lc[:, :100])
    with pytest.raises(ValueError, match="labels: saved"):
        back.restore({"labels": x[:, :50]}, 100, 128)
    with pytest.raises(ValueError, match="label kind"):
        labels.LabelCache(3, 16, torch.float32, "cpu", "int4")
