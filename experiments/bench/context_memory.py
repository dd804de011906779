"""Per-device memory of a long-context DPO step with and without context parallelism, compiled
from shapes on fake CPU devices (nothing is allocated), and a real step of a small model.

    python experiments/bench/context_memory.py --devices 8 --tokens 32768 \
        --meshes 1,2,1,4 1,1,8,1 1,2,4,1                   # Llama-3.1-8B, 1 pair, from shapes
    python experiments/bench/context_memory.py --devices 64 --pairs 8 --tokens 131072 \
        --meshes 1,16,1,4 1,16,4,1 1,8,8,1
    python experiments/bench/context_memory.py --run --preset tiny-llama --tokens 32768 \
        --meshes 1,1,8,1 --response 1024 --dtype float32 --remat full   # one real step

Each mesh is ``data,fsdp,context,tensor``. The step is the trainer's
(``step.make_train_step``: sigmoid DPO, AdamW, float32 master weights and moments, the frozen
reference in bfloat16, a reference forward each step), jitted with the state's shardings
(``train_state.param_shardings`` under the default rules: ``embed`` over fsdp x context,
vocabulary / MLP / heads over tensor) and the batch's (``sharding.batch_shardings``: rows over
data x fsdp, the length over context), under ``jax.set_mesh`` as a run is. The batch: ``--pairs``
pairs, each row ``--tokens`` long, a shared prompt and ``--response`` scored tokens per
response. Memory is XLA's buffer assignment of the compiled SPMD program, per device:
arguments (state shard + batch shard), temporaries, and peak = arguments + outputs - donated
(aliased) + temporaries. ``--run`` also executes the step once on random parameters and
reports its wall time, its loss, gradient norm and summed log-probs (``1,1,1,1``: the same
step unsharded, on the first device) and the process' peak RSS (``ru_maxrss``, over the whole
process so far; the host holds all the fake devices' buffers). One JSON line per mesh.
``PJRT_NPROC`` (XLA:CPU's thread pools) is set as ``dpo_jax.distributed.cpu_pool_threads``
says unless given: with fewer threads the 32k step deadlocks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

GiB = 2 ** 30


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices")
    p.add_argument("--meshes", nargs="+", default=["1,2,1,4", "1,1,8,1"],
                   help="data,fsdp,context,tensor per configuration")
    p.add_argument("--preset", default="llama-3.1-8b")
    p.add_argument("--tokens", type=int, default=32768, help="row length")
    p.add_argument("--response", type=int, default=1024, help="scored tokens per response")
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--remat", default="full")
    p.add_argument("--attention_chunk", type=int, default=1024,
                   help="query rows per attention block (attention_impl='chunked')")
    p.add_argument("--seq_chunk", type=int, default=512, help="log-prob head positions per chunk")
    p.add_argument("--run", action="store_true", help="also run the step once (small models)")
    return p.parse_args()


def main() -> None:
    args = _args()
    # all-reduce-promotion off: XLA:CPU's pass (bfloat16 all-reduces widened to float32)
    # aborts on the all-reduce of shard_map's transpose ("Invalid binary instruction opcode
    # copy", jax 0.10.2); without it the CPU program keeps bfloat16 all-reduces, as GPU / TPU
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}"
                               " --xla_cpu_enable_concurrency_optimized_scheduler=false"
                               " --xla_disable_hlo_passes=all-reduce-promotion"
                               # --run: one device thread may compute for minutes before a
                               # collective on a loaded 2-core host (the default aborts at 40 s)
                               " --xla_cpu_collective_call_terminate_timeout_seconds=7200"
                               " --xla_cpu_collective_timeout_seconds=7200")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # XLA:CPU's pools, CPU_THREADS_PER_DEVICE threads per fake device: a collective blocks its
    # thread, and with the default max(cores, devices) threads the --run step at 32k tokens
    # deadlocked (dpo_jax/distributed.py explains)
    from dpo_jax.distributed import cpu_pool_threads
    threads = cpu_pool_threads(os.environ)
    if threads is not None:
        os.environ["PJRT_NPROC"] = str(threads)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dpo_jax import losses as losses_lib
    from dpo_jax import sharding
    from dpo_jax.config import base_config
    from dpo_jax.data import to_global
    from dpo_jax.logprobs import LogprobConfig
    from dpo_jax.models import Model, preset
    from dpo_jax.optim import OptimConfig, make_optimizer
    from dpo_jax.state import Frozen, TrainState, cast_floats
    from dpo_jax.step import StepConfig, make_train_step
    from dpo_jax.train_state import param_shardings

    cfg = preset(args.preset, dtype=args.dtype, remat=args.remat, attention_impl="chunked",
                 attention_chunk=args.attention_chunk)
    model = Model(cfg)
    c = base_config()
    c.optim.update(name="adamw", lr=1e-6, warmup_steps=0, max_grad_norm=1.0)
    tx, schedule = make_optimizer(OptimConfig.from_config(c.optim), 1000)
    loss_cfg = losses_lib.loss_config_from(c.loss)
    step_cfg = StepConfig(logprobs=LogprobConfig(scored_only=True, seq_chunk=args.seq_chunk,
                                                 vocab_chunk=None))
    T, B, resp = args.tokens, args.pairs, args.response
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (2 * B, T), dtype=np.int32)
    ids[B:, :T - resp] = ids[:B, :T - resp]
    mask = np.zeros((2 * B, T), np.float32)
    mask[:, T - resp:] = 1.0
    batch_np = {"input_ids": ids, "positions": np.tile(np.arange(T, dtype=np.int32), (2 * B, 1)),
                "segment_ids": np.ones_like(ids), "loss_mask": mask,
                "pair_weight": np.ones((B,), np.float32)}
    bf16 = jnp.dtype("bfloat16")
    for text in args.meshes:
        shape = dict(zip(sharding.MESH_AXES, (int(x) for x in text.split(","))))
        # a mesh of fewer devices (1,1,1,1: the unsharded step) takes the first ones
        mesh = sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(list(
            shape.values())))])
        shardings = param_shardings(model, mesh, sharding.DEFAULT_RULES)
        opt_shape = jax.eval_shape(tx.init, model.abstract_params())
        abstract = lambda tree, sh: jax.tree.map(  # noqa: E731
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
        opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shape, shardings,
                                       transform_non_params=lambda _: sharding.replicated(mesh))
        params = abstract(model.abstract_params(), shardings)
        ref = abstract(jax.eval_shape(lambda p: cast_floats(p, bf16), model.abstract_params()),
                       shardings)
        state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32,
                                                     sharding=sharding.replicated(mesh)),
                           trainable=params, opt_state=abstract(opt_shape, opt_sh),
                           frozen=Frozen.of(params, ref))
        batch_sh = sharding.batch_shardings(batch_np, mesh)
        if B % sharding.num_batch_shards(mesh):  # one pair's weight over 2 rows' shards
            batch_sh["pair_weight"] = sharding.replicated(mesh)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
                 for k, v in batch_np.items()}
        state_sh = jax.tree.map(lambda x: x.sharding, state)
        step = jax.jit(make_train_step(model, loss_cfg, tx, schedule, step_cfg),
                       in_shardings=(state_sh, None), out_shardings=(state_sh, None),
                       donate_argnums=0, static_argnums=2)
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = step.lower(state, batch, resp).compile()
        mem = compiled.memory_analysis()
        out = {"preset": args.preset, "devices": args.devices, "mesh": text,
               "pairs": B, "tokens": T, "response": resp, "dtype": args.dtype,
               "remat": args.remat, "attention_chunk": args.attention_chunk,
               "compile_s": round(time.perf_counter() - t0, 1),
               "args_GiB": round(mem.argument_size_in_bytes / GiB, 3),
               "temp_GiB": round(mem.temp_size_in_bytes / GiB, 3),
               "peak_GiB": round((mem.argument_size_in_bytes + mem.output_size_in_bytes
                                  - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / GiB, 3)}
        if args.run:
            with jax.set_mesh(mesh):
                p = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0))
                r = jax.jit(lambda p: cast_floats(p, bf16), out_shardings=shardings)(p)
                live = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32),
                                                      sharding.replicated(mesh)),
                                  trainable=p, opt_state=jax.jit(
                                      tx.init, out_shardings=opt_sh)(p),
                                  frozen=Frozen.of(p, r))
                data = to_global(batch_np, batch_sh)
                t0 = time.perf_counter()
                _, metrics = compiled(live, data)
                metrics = jax.device_get(metrics)
            out.update(step_s=round(time.perf_counter() - t0, 1),
                       **{k: float(metrics[k]) for k in ("loss", "grad_norm", "logps/chosen",
                                                         "logps/rejected")},
                       max_rss_GiB=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                         * 1024 / GiB, 2))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        print(json.dumps(dict(out, load_avg_1min=load,
                              pjrt_nproc=os.environ.get("PJRT_NPROC"))), flush=True)


if __name__ == "__main__":
    main()
