"""XLA:CPU's float32 matmul rate against PyTorch's on the shapes of a SmolLM2-135M step.

The same-math comparison with TRL (``trl_vs_dpo_jax.py``) is compute-bound in the body's
matmuls, so its ratio is the FLOP count ratio (TRL's 10N against dpo_jax's 8N per column) times
the ratio of the two libraries' matmul rates. This script measures the second factor: each
projection of a Llama layer at d 576 / d_ff 1536 / 3 kv heads of 64 over 4,096 columns (16 rows
x 256), in the three orientations a training step runs (forward ``x @ W``, input gradient
``dy @ W.T``, weight gradient ``x.T @ dy``), jitted JAX against ``torch.matmul``, interleaved
so both see the same machine load.

    pip install torch==2.13.0     # benchmark only
    python experiments/bench/matmul_rates.py [--reps 5] [--threads 2]

Prints one line per shape, GFLOP/s as the best of ``--reps`` timed calls, and the FLOP-weighted
ratio over the step's matmuls (each shape appears once per orientation per layer).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

COLUMNS, D, D_FF, D_KV = 4096, 576, 1536, 192

# (name, rows of W, columns of W): the layer's projections
WEIGHTS = (("q/o", D, D), ("k/v", D, D_KV), ("gate/up", D, D_FF), ("down", D_FF, D))
# count of each weight in a layer (q and o; k and v; gate and up; down)
COUNT = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}


def cases():
    """(label, lhs shape, rhs shape, transpose lhs, transpose rhs, flops, weight)."""
    out = []
    for name, n_in, n_out in WEIGHTS:
        flops = 2 * COLUMNS * n_in * n_out
        out.append((f"{name} fwd  x@W", (COLUMNS, n_in), (n_in, n_out), False, False, flops,
                    COUNT[name]))
        out.append((f"{name} dx   dy@W.T", (COLUMNS, n_out), (n_in, n_out), False, True, flops,
                    COUNT[name]))
        out.append((f"{name} dW   x.T@dy", (COLUMNS, n_in), (COLUMNS, n_out), True, False,
                    flops, COUNT[name]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    total = {"jax": 0.0, "torch": 0.0}
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    for label, sa, sb, ta, tb, flops, weight in cases():
        a_np = rng.standard_normal(sa, np.float32)
        b_np = rng.standard_normal(sb, np.float32)
        f = jax.jit(lambda x, y, ta=ta, tb=tb: (x.T if ta else x) @ (y.T if tb else y))
        ja, jb = jnp.asarray(a_np), jnp.asarray(b_np)
        at, bt = torch.from_numpy(a_np), torch.from_numpy(b_np)
        run = {"jax": lambda: f(ja, jb).block_until_ready(),
               "torch": lambda: (at.T if ta else at) @ (bt.T if tb else bt)}
        got_j = np.asarray(run["jax"]())
        got_t = run["torch"]().numpy()
        scale = float(np.abs(got_t).max())
        assert np.abs(got_j - got_t).max() <= 1e-4 * scale, label  # the same product
        best = {k: float("inf") for k in run}
        for _ in range(a.reps):
            for k, fn in run.items():
                t = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t)
        for k in run:
            total[k] += weight * best[k]
        print(f"{label:20s} jax {flops / best['jax'] / 1e9:6.1f} GFLOP/s   torch "
              f"{flops / best['torch'] / 1e9:6.1f} GFLOP/s   jax/torch time "
              f"{best['jax'] / best['torch']:.2f}")
    print(f"a layer's matmuls, forward + backward: jax {total['jax'] * 1e3:.1f} ms, torch "
          f"{total['torch'] * 1e3:.1f} ms: XLA:CPU takes {total['jax'] / total['torch']:.2f}x "
          "torch's time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
