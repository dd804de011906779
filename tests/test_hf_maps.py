"""hf_maps.slice_through: reading a device's slice straight from the HF layout (no torch)."""

import itertools

import numpy as np

from dpo_jax.models import hf_maps as M
from dpo_jax.models import preset


def test_slice_through_matches_full_transform():
    rng = np.random.default_rng(0)
    cases = [("T", (24, 8), (8, 4, 6)), ("T", (8, 24), (4, 6, 8)), ("R", (8, 24), (8, 4, 6)),
             ("R", (24,), (4, 6)), ("T", (6, 8), (8, 1, 6))]
    checked = 0
    for layout, hf, ours in cases:
        w = rng.normal(size=hf)
        make = M._T if layout == "T" else M._R
        t = make("x", hf, ("p",), ours)
        full = t.split(w)[0]
        opts = [[slice(None)] + [slice(a, min(d, a + max(1, d // 2)))
                                 for a in range(0, d, max(1, d // 2))] for d in ours]
        for idx in itertools.product(*opts):
            plan = M.slice_through(t, ours, idx)
            if plan is None:
                continue
            hf_index, block, residual = plan
            raw = w[hf_index]
            raw = raw.T if layout == "T" else raw
            np.testing.assert_array_equal(raw.reshape(block)[residual], full[idx])
            checked += 1
    assert checked > 50
    fused = M._gpt2(preset("tiny-gpt2"))
    assert M.slice_through(next(t for t in fused if t.layout == "fused"), (32, 4, 8),
                           (slice(None),) * 3) is None
