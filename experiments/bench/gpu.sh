#!/usr/bin/env bash
# GPU benchmark, ready to run on one GPU (results pending: no GPU in the session that wrote it).
# Ours (same jitted step as the trainer) and pytorch_dpo_step.py --device cuda, same shapes,
# one invocation each per model so both sides share the environment; 16 pairs x 512 tokens.
# Usage: experiments/bench/gpu.sh [path/to/pytorch_dpo_step.py] [outdir]
set -euo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave GPU memory to the PyTorch subprocess
cd "$(dirname "$0")/../.."
TORCH_SCRIPT="${1:-/work/shared/bench/pytorch_dpo_step.py}"
OUT="${2:-${OUT:-/tmp/dpo_bench_gpu}}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for model in gpt2-large pythia-1.4b; do
  python experiments/bench/bench_dpo.py --preset "$model" --pairs 16 --prompt 128 --response 384 \
    --steps 10 --warmup 3 --configs same_math,bf16,best_bf16,remat_dots \
    --torch --torch_script "$TORCH_SCRIPT" --torch_device cuda \
    --out "$OUT/bench_${model}.json" | tee "$OUT/bench_${model}.log"
done
# cuDNN fused attention (config path model.attention_impl='cudnn'; untested so far).
python - <<'PY' | tee "$OUT/cudnn_smoke.log"
import jax, jax.numpy as jnp
from dpo_jax.models import Model, preset
cfg = preset("gpt2", n_layer=2, dtype="bfloat16", attention_impl="cudnn")
m = Model(cfg); p = jax.jit(m.init)(jax.random.key(0))
ids = jnp.zeros((2, 512), jnp.int32); pos = jnp.broadcast_to(jnp.arange(512), ids.shape)
ref = Model(preset("gpt2", n_layer=2, dtype="bfloat16"))
a = m.logits(p, ids, pos, jnp.ones_like(ids)); b = ref.logits(p, ids, pos, jnp.ones_like(ids))
print("cudnn vs xla max abs logit diff", float(jnp.max(jnp.abs(a - b))))
PY
