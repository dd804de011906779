#!/usr/bin/env bash
# GPU benchmark in one call (results pending: no GPU has been lent to this project's sessions yet).
# Ours (the trainer's jitted step) and pytorch_dpo_step.py --device cuda on the same shapes in
# the same invocation; 16 pairs x 512 tokens (prompt 128). Every configuration runs in its own
# process (--isolate), so its peak device memory is its own. Results are written to $OUT as they
# come, and each piece has its own time limit, so a partial run still reports.
# Usage: experiments/bench/gpu.sh [path/to/pytorch_dpo_step.py] [outdir]
#   ~8 min on one H100 (estimated, never run); hard limits 90 + 260 + 100 + 120 s, so one
#   600 s device call always returns: smoke checks, Pythia-1.4B 5 configurations + PyTorch
#   (one of them prefix-shared), GPT-2-large 2 configurations + PyTorch, and Pythia-1.4B on
#   an HH-like shape (prompt 384, responses 64) with and without prefix sharing
#   (NAME+shared: data.prefix_sharing; same pairs, so first_loss agrees with NAME's).
# Plumbing check on a CPU (tiny shapes, PyTorch on the CPU; cuDNN reports FAILED there):
#   BIG=gpt2-tiny LARGE=gpt2-tiny PAIRS=2 PROMPT=32 RESPONSE=32 SMOKE_T=64 TORCH_DEVICE=cpu \
#     experiments/bench/gpu.sh ../shared/bench/pytorch_dpo_step.py /tmp/gpu_dry
set -uo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave GPU memory to the PyTorch subprocess
cd "$(dirname "$0")/../.."
TORCH_SCRIPT="${1:-../shared/bench/pytorch_dpo_step.py}"  # default: beside the repository
OUT="${2:-${OUT:-/tmp/dpo_bench_gpu}}"
PY="${PYTHON:-python3}"  # on the GPU machines python3 is the interpreter with jax and torch
BIG="${BIG:-pythia-1.4b}" LARGE="${LARGE:-gpt2-large}" TORCH_DEVICE="${TORCH_DEVICE:-cuda}"
PAIRS="${PAIRS:-16}" PROMPT="${PROMPT:-128}" RESPONSE="${RESPONSE:-384}" SMOKE_T="${SMOKE_T:-1024}"
SHAPE=(--pairs "$PAIRS" --prompt "$PROMPT" --response "$RESPONSE" --steps 8 --warmup 2 --isolate)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

# 1. Attention implementations on the GPU against the XLA path (values and gradients, bf16).
SMOKE_T="$SMOKE_T" timeout 90 "$PY" - <<'PY' 2>&1 | tee "$OUT/attention_smoke.log"
import dataclasses, os, jax, jax.numpy as jnp
from dpo_jax.models import Model, preset
base = preset("gpt2", n_layer=2, dtype="bfloat16")
T = int(os.environ["SMOKE_T"]); R = T * 7 // 8  # row 1 is right-padded after R tokens
ids = jax.random.randint(jax.random.key(1), (2, T), 0, base.vocab_size)
pos = jnp.broadcast_to(jnp.arange(T), ids.shape)
seg = jnp.ones_like(ids).at[1, R:].set(0)
ref_m = Model(base)
params = jax.jit(ref_m.init)(jax.random.key(0))
def value_grad(m):
    f = lambda p: jnp.mean(jnp.square(m.hidden(p, ids, pos, seg).astype(jnp.float32)[:, :R]))
    return jax.jit(jax.value_and_grad(f))(params)
v0, g0 = value_grad(ref_m)
for impl in ("cudnn", "chunked"):
    try:
        v, g = value_grad(Model(dataclasses.replace(base, attention_impl=impl, attention_chunk=T // 4)))
        sq = lambda t: sum(float(jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in jax.tree.leaves(t))
        diff = sq(jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), g, g0))
        # whole-tree relative L2 error (k_bias's true gradient is 0: per-leaf ratios are noise)
        print(f"{impl}: loss {float(v):.6f} vs xla {float(v0):.6f}; "
              f"|grad - grad_xla| / |grad_xla| = {(diff / sq(g0)) ** 0.5:.3e}")
    except Exception as e:
        print(f"{impl}: FAILED {type(e).__name__}: {str(e)[:500]}")
PY

# 2. Pythia-1.4B, PyTorch eager first, then in order of importance (a piece that runs out of
# time loses the last ones): same math (bf16 compute, dense log-probs, online reference) with
# cuDNN attention; the best configuration, unshared and prefix-shared; same math with XLA attention under remat
# dots_no_batch (CPU-compiled estimate in float32: 55 GiB vs 147 GiB without remat); plain
# bf16 last (the one most likely to run out of memory).
timeout 260 "$PY" experiments/bench/bench_dpo.py --preset "$BIG" "${SHAPE[@]}" --isolate_timeout 80 \
  --configs bf16_cudnn,best_bf16_cudnn,best_bf16_cudnn+shared,bf16_remat_dots_nb,bf16 \
  --torch --torch_script "$TORCH_SCRIPT" --torch_device "$TORCH_DEVICE" \
  --out "$OUT/bench_$BIG.json" 2>&1 | tee "$OUT/bench_$BIG.log"

# 3. GPT-2-large must fit at the same batch.
timeout 100 "$PY" experiments/bench/bench_dpo.py --preset "$LARGE" "${SHAPE[@]}" --isolate_timeout 60 \
  --configs bf16_cudnn,best_bf16_cudnn \
  --torch --torch_script "$TORCH_SCRIPT" --torch_device "$TORCH_DEVICE" \
  --out "$OUT/bench_$LARGE.json" 2>&1 | tee "$OUT/bench_$LARGE.log"

# 4. Prefix sharing where the prompt is most of the tokens (HH-like: prompt 384, responses 64).
timeout 120 "$PY" experiments/bench/bench_dpo.py --preset "$BIG" --pairs "$PAIRS" \
  --prompt "${HH_PROMPT:-384}" --response "${HH_RESPONSE:-64}" --steps 8 --warmup 2 --isolate \
  --isolate_timeout 60 --configs best_bf16_cudnn,best_bf16_cudnn+shared \
  --out "$OUT/bench_${BIG}_hh_like.json" 2>&1 | tee "$OUT/bench_${BIG}_hh_like.log"
echo "gpu.sh done"
