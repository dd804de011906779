"""DPO step of mixture-of-experts models, dense vs sparse dispatch (issue 30), one invocation.

Times the trainer's jitted DPO step (`dpo_jax.step.make_train_step`, donated state, sigmoid loss,
AdamW, reference forward every step in bfloat16 storage, the router loss at the model's
default weight) with `moe_impl='dense'` (every token through every expert) and
`moe_impl='sparse'` (dropless grouped dispatch, models/moe_dispatch.py; on CPU its tiled
kernel) on two small shapes, and prints XLA's compiled memory for each; then the from-shapes
FLOPs and state memory per device of Mixtral-8x7B and Qwen3-30B-A3B DPO steps.

  python experiments/bench/moe_bench.py                 # both shapes, dense and sparse
  python experiments/bench/moe_bench.py --steps 2 --warmup 1 --pairs 2   # quick

Shapes: `mixtral-small` (8 experts, top-2, expert width 512) and `qwen3-moe-small` (64 small
experts, top-8, width 64, q/k norms), 2 layers, d_model 256, vocabulary 1024. Their dense
dispatch runs the same expert FLOPs (E x width equal); sparse runs k / E of them (1/4 and 1/8).
The first step's loss is printed for both implementations (equal to round-off).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from dpo_jax.distributed import state_bytes_per_device  # noqa: E402
from dpo_jax.models import Model, matmul_param_count, param_count, preset  # noqa: E402
from dpo_jax.models.config import ModelConfig, _layer_matmul_params  # noqa: E402
from dpo_jax.state import Frozen, TrainState  # noqa: E402
from dpo_jax.step import StepConfig, make_train_step  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dpo import bench_optimizer, compiled_memory, machine, make_batch  # noqa: E402

_COMMON = dict(n_layer=2, d_model=256, n_head=4, n_kv_head=2, d_ff=1024, vocab_size=1024,
               max_len=1024, rope_scaling=None)
SHAPES = {
    "mixtral-small": ("mixtral-8x7b", dict(_COMMON, n_experts=8, n_experts_per_tok=2,
                                           moe_d_ff=512)),
    "qwen3-moe-small": ("qwen3-30b-a3b", dict(_COMMON, head_dim=64, n_experts=64,
                                              n_experts_per_tok=8, moe_d_ff=64)),
}


def bench(shape: str, impl: str, pairs: int, prompt: int, response: int, steps: int,
          warmup: int) -> dict:
    name, overrides = SHAPES[shape]
    cfg = preset(name, **overrides, moe_impl=impl)
    model = Model(cfg)
    tx, schedule, loss_cfg = bench_optimizer()  # router loss: the model config's
    params = jax.jit(model.init)(jax.random.key(0))
    ref = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p))(params)
    batch = {k: jnp.asarray(v) for k, v in
             make_batch(pairs, prompt, response, cfg.vocab_size).items()}
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=params,
                       frozen=Frozen(reference=ref), opt_state=jax.jit(tx.init)(params))
    step_fn = jax.jit(make_train_step(model, loss_cfg, tx, schedule, StepConfig()),
                      donate_argnums=0, static_argnums=2)
    t = time.perf_counter()
    compiled = step_fn.lower(state, batch, None).compile()
    out = dict(shape=shape, impl=impl, kernel=cfg.moe_kernel or "auto", pairs=pairs,
               seq=prompt + response, tokens=2 * pairs * (prompt + response),
               experts=cfg.n_experts, top_k=cfg.n_experts_per_tok, moe_d_ff=cfg.moe_d_ff,
               compile_s=round(time.perf_counter() - t, 2))
    compiled_memory(compiled, out)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        loss = float(metrics["loss"])  # blocks
        if i == 0:
            out["first_loss"], out["first_aux_loss"] = loss, float(metrics["aux_loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t)
    out["step_s_median"] = round(statistics.median(times), 4)
    out["step_s_min"] = round(min(times), 4)
    return out


def dpo_flops_per_token(cfg: ModelConfig, seq: int, dense: bool) -> float:
    """FLOPs per token of one DPO step (policy forward + backward, reference forward):
    8 N + 16 L (n_head head_dim) T, N the matmul weights a token runs through (sparse: router,
    top-k experts, shared expert, LM head; dense dispatch: every expert)."""
    n = (cfg.n_layer * _layer_matmul_params(cfg, active=not dense)
         + cfg.vocab_size * cfg.d_model)
    return 8 * n + 16 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq


# (where, mesh): the expert axis maps to fsdp (sharding.DEFAULT_RULES); an axis the mesh does
# not divide stays replicated (Mixtral's 8 experts on fsdp 16)
MESHES = [("8x H100 (1 host)", {"fsdp": 8}), ("TPU v5p-32 (16 chips)", {"fsdp": 16}),
          ("TPU v5p-32 (16 chips)", {"data": 2, "fsdp": 8})]


def from_shapes(pairs: int = 64, seq: int = 2048) -> list[dict]:
    """Per device: DPO-step FLOPs (global batch of `pairs` pairs of `seq` tokens, rows split
    over data x fsdp) and training-state bytes (float32 or bfloat16 policy, AdamW, bfloat16
    reference; `distributed.state_bytes_per_device`, activations excluded), for Mixtral-8x7B and
    Qwen3-30B-A3B."""
    rows = []
    for name in ("mixtral-8x7b", "qwen3-30b-a3b"):
        cfg = preset(name)
        for where, mesh in MESHES:
            devices = int(np.prod(list(mesh.values())))
            tokens = 2 * pairs * seq / devices
            b = state_bytes_per_device(cfg, mesh, policy_dtype="float32", ref_dtype="bfloat16")
            b16 = state_bytes_per_device(cfg, mesh, policy_dtype="bfloat16",
                                         ref_dtype="bfloat16")
            rows.append(dict(
                model=name, params_B=round(param_count(cfg) / 1e9, 2),
                active_matmul_B=round(matmul_param_count(cfg) / 1e9, 2), where=where,
                mesh=mesh, tokens_per_device=int(tokens),
                sparse_TFLOP_per_device=round(dpo_flops_per_token(cfg, seq, False) * tokens
                                              / 1e12, 1),
                dense_TFLOP_per_device=round(dpo_flops_per_token(cfg, seq, True) * tokens
                                             / 1e12, 1),
                state_GB_per_device=round(b["total"] / 1e9, 2),
                state_GB_per_device_bf16=round(b16["total"] / 1e9, 2)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--response", type=int, default=192)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--shapes", default=",".join(SHAPES))
    a = p.parse_args()
    print(json.dumps({"machine": machine()}))
    rows = []
    for shape in a.shapes.split(","):
        for impl in ("dense", "sparse"):
            rows.append(bench(shape, impl, a.pairs, a.prompt, a.response, a.steps, a.warmup))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| shape | impl | experts / top-k | step s (median) | compiled temp MiB | "
          "compile s | first loss | speed-up |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        dense = next(d for d in rows if d["shape"] == r["shape"] and d["impl"] == "dense")
        print(f"| {r['shape']} | {r['impl']} | {r['experts']} / {r['top_k']} | "
              f"{r['step_s_median']} | {r.get('compiled_temp_MiB')} | {r['compile_s']} | "
              f"{r['first_loss']:.6f} | {dense['step_s_median'] / r['step_s_median']:.2f}x |")
    print("\n| model | params | active matmul params | where | mesh | tokens / device | "
          "TFLOP / device (sparse) | TFLOP / device (dense dispatch) | state GB / device "
          "(f32 policy) | state GB / device (bf16 policy) |")
    print("| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in from_shapes():
        print(f"| {r['model']} | {r['params_B']}B | {r['active_matmul_B']}B | {r['where']} | "
              f"{r['mesh']} | {r['tokens_per_device']:,} | {r['sparse_TFLOP_per_device']} | "
              f"{r['dense_TFLOP_per_device']} | {r['state_GB_per_device']} | "
              f"{r['state_GB_per_device_bf16']} |")


if __name__ == "__main__":
    main()
