"""Where step 1's round-off came from: the same parameters' summed log-probs from differently
compiled passes (docs/losses.md, "The first step").

    python experiments/hh/roundoff.py [--layers=6]

SmolLM2-135M-Instruct's first ``--layers`` layers ($DPO_JAX_MODELS), 8 pairs of random token ids
(prompts 60-150, responses 10-60 tokens + EOS), float32 on the CPU. Prints, for each pass, how
many of the 16 per-sequence sums differ from a forward-only pass at padded length 256 and by how
much: forward-only at another padded length (320) and with twice the scored-token bound, and the
log-probs computed inside ``jax.grad`` (the training step's policy pass).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dpo_jax.models import Model, load_hf_config, load_hf_params  # noqa: E402
from dpo_jax.models.local import SMOLLM2, find_local_model  # noqa: E402
from dpo_jax.step import StepConfig, sequence_stats  # noqa: E402
from tests import helpers as h  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    args = ap.parse_args()
    path = find_local_model(SMOLLM2)
    if path is None:
        sys.exit(f"{SMOLLM2} not found under $DPO_JAX_MODELS (bash ../shared/models/smollm2.sh)")
    cfg = load_hf_config(path, n_layer=args.layers)
    model, params = Model(cfg), load_hf_params(path, cfg)
    rng = np.random.default_rng(0)
    pairs = [{"prompt": rng.integers(3, 49000, rng.integers(60, 150)).astype(np.int32),
              **{k: np.append(rng.integers(3, 49000, rng.integers(10, 60)), 2).astype(np.int32)
                 for k in ("chosen", "rejected")}} for _ in range(8)]
    mesh, sc, out = h.mesh({"data": 1, "fsdp": 1, "tensor": 1}), StepConfig(), {}
    for length in (256, 320):
        batch, ms = h.device_batch(h.pair_batch(pairs, buckets=str(length)), mesh)
        for scale in (1, 2):
            fwd = jax.jit(lambda p, b, m=ms * scale: sequence_stats(model, p, b, sc, m,
                                                                    forward_only=True).logps)
            out[f"forward-only, length {length}, max_scored x{scale}"] = np.asarray(
                fwd(params, batch))

        def loss(p, b, m=ms):
            lp = sequence_stats(model, p, b, sc, m).logps
            return jnp.sum(lp), lp

        out[f"inside jax.grad, length {length}"] = np.asarray(
            jax.jit(jax.grad(loss, has_aux=True))(params, batch)[1])
    base = out["forward-only, length 256, max_scored x1"]
    for name, v in out.items():
        print(f"{name}: {int(np.sum(v != base))} of {v.size} differ, "
              f"max |diff| {float(np.max(np.abs(v - base))):.3g} nats")


if __name__ == "__main__":
    main()
