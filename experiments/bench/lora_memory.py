"""XLA memory and step time of the DPO step: full fine-tuning against LoRA (dpo_jax/lora.py).

    python experiments/bench/lora_memory.py --preset gpt2-cpu-bench --pairs 8 --prompt 64 \
        --response 64 --steps 5                       # CPU bench shape: memory and step time
    python experiments/bench/lora_memory.py --preset llama-3.1-8b --pairs 16 --prompt 256 \
        --response 768 --abstract --dtype bfloat16 --remat full   # from shapes only
    ... --kinds lora,lora_int8,lora_nf4      # QLoRA: the base's projections in int8 / NF4
    ... --kinds lora_nf4+embed               # and the (untied) input embedding in NF4
    python experiments/bench/lora_memory.py --state_table   # README's bytes-per-parameter rows

Both sides run the trainer's step (``step.make_train_step``, donated state, sigmoid loss,
AdamW, scored-only chunked log-probs, the reference forward each step):
  full   every parameter trained: float32 master weights, gradients and AdamW moments, plus
         the frozen reference stored in bfloat16 (``model.ref_param_dtype=bfloat16``);
  lora   rank ``--rank`` adapters on every projection (float32, with their AdamW moments)
         over one frozen base in ``--base_dtype`` (bfloat16 by default), which is also the
         reference (adapters off); ``lora_int8`` / ``lora_nf4``: the same with the base's
         projections quantised (``model.lora.base_quant``, ``dpo_jax/models/quant.py``).
Memory is XLA's buffer assignment of the compiled step (``compiled.memory_analysis()``):
arguments (the state and batch), temporaries, and the estimated peak arguments + outputs -
aliased (donated) + temporaries. Step times: the configurations alternate step by step after
``--warmup`` steps each; medians of ``--steps``. ``--abstract`` compiles from ShapeDtypeStructs only, so an 8B
model is sized on a CPU host without allocating it. Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

from bench_dpo import SCORED_CHUNKED, add_batch_args, make_batch, model_config

from dpo_jax import lora as lora_lib
from dpo_jax import losses as losses_lib
from dpo_jax.config import base_config
from dpo_jax.logprobs import max_scored_tokens
from dpo_jax.models import Model
from dpo_jax.optim import OptimConfig, make_optimizer
from dpo_jax.state import Frozen, TrainState, cast_floats
from dpo_jax.step import StepConfig, make_train_step

GiB = 2**30


def _state(kind: str, cfg, rank: int, base_dtype: str, tx, abstract: bool):
    """(model, TrainState) of ``kind`` ('full' or 'lora'), abstract or allocated."""
    bf16 = jnp.dtype("bfloat16")
    make = (lambda f: lambda *a: jax.eval_shape(f, *a)) if abstract else jax.jit
    if kind == "full":
        model = Model(cfg)
        params = make(model.init)(jax.random.key(0))
        ref = make(lambda p: cast_floats(p, bf16))(params)
    else:
        quant = kind.split("_")[1].split("+")[0] if "_" in kind else "none"
        model = lora_lib.LoraModel(dataclasses.replace(cfg, param_dtype=base_dtype),
                                   lora_lib.LoraConfig(rank=rank, alpha=float(rank),
                                                       base_quant=quant,
                                                       quant_embedding=kind.endswith("+embed")))
        ref = make(lambda k: model.quantize_base(model.init(k)))(jax.random.key(0))
        params = make(model.init_adapters)(jax.random.key(1))
    opt = make(tx.init)(params)
    step = jnp.zeros((), jnp.int32)
    return model, TrainState(step=step, trainable=params, opt_state=opt,
                             frozen=Frozen.of(params, ref))


def _bytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def measure(kind: str, args) -> dict:
    cfg = model_config(args.preset, dtype=args.dtype, remat=args.remat,
                       attention_impl=args.attention_impl or None,
                       attention_chunk=args.attention_chunk)
    c = base_config()
    c.optim.update(name="adamw", lr=1e-4, warmup_steps=0, max_grad_norm=0.0)
    tx, schedule = make_optimizer(OptimConfig.from_config(c.optim), 1000)
    loss_cfg = losses_lib.loss_config_from(c.loss)
    model, state = _state(kind, cfg, args.rank, args.base_dtype, tx, args.abstract)
    batch_np = make_batch(args.pairs, args.prompt, args.response, cfg.vocab_size)
    max_scored = max_scored_tokens(batch_np["loss_mask"])
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    step_fn = jax.jit(make_train_step(model, loss_cfg, tx, schedule,
                                      StepConfig(logprobs=SCORED_CHUNKED)),
                      donate_argnums=0, static_argnums=2)
    t = time.perf_counter()
    compiled = step_fn.lower(state, batch, max_scored).compile()
    out = {"kind": kind, "preset": args.preset, "pairs": args.pairs,
           "tokens": args.prompt + args.response, "dtype": args.dtype, "remat": args.remat,
           "attention_impl": args.attention_impl or "xla",
           "rank": args.rank if kind.startswith("lora") else None,
           "base_dtype": args.base_dtype if kind.startswith("lora") else cfg.param_dtype,
           "base_quant": kind.split("_")[1] if "_" in kind else None,
           "compile_s": round(time.perf_counter() - t, 1),
           "trained_params": sum(x.size for x in jax.tree.leaves(state.trainable)),
           "state_GiB": {name: round(_bytes(tree) / GiB, 3) for name, tree in (
               ("params", state.trainable), ("ref_params", state.frozen.tree),
               ("opt_state", state.opt_state))}}
    mem = compiled.memory_analysis()
    out.update(args_GiB=round(mem.argument_size_in_bytes / GiB, 3),
               temp_GiB=round(mem.temp_size_in_bytes / GiB, 3),
               peak_est_GiB=round((mem.argument_size_in_bytes + mem.output_size_in_bytes
                                   - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / GiB, 3))
    runner = {"state": state, "step": lambda s: compiled(s, batch), "times": []}
    return out, runner


def time_steps(rows, runners, args) -> None:
    """Time the configurations' steps in alternating rounds (one step of each per round), so
    a shared machine's load falls on all of them alike; medians into ``rows``."""
    for i in range(args.warmup + args.steps):
        for r in runners:
            t = time.perf_counter()
            r["state"], metrics = r["step"](r["state"])
            jax.block_until_ready(metrics)
            if i >= args.warmup:
                r["times"].append(time.perf_counter() - t)
    for out, r in zip(rows, runners):
        median = statistics.median(r["times"])
        out.update(step_s_median=round(median, 4), step_s_all=[round(x, 4) for x in r["times"]],
                   tokens_per_s=round(2 * args.pairs * (args.prompt + args.response) / median))


def state_table(presets=("gpt2-large", "pythia-2.8b", "llama-3.1-8b"), rank: int = 16) -> str:
    """Markdown rows: a LoRA state's bytes per base parameter (the frozen base as held, bfloat16
    or quantised, + 16 bytes per adapter parameter: float32 value, gradient and AdamW's two
    moments) and its total for each preset, from the abstract trees (no allocation)."""
    from dpo_jax.models import param_count, preset
    rows = []
    for quant, emb in (("none", False), ("int8", False), ("nf4", False), ("nf4", True)):
        cells, per = [], []
        for name in presets:
            cfg = dataclasses.replace(preset(name), param_dtype="bfloat16")
            model = lora_lib.LoraModel(cfg, lora_lib.LoraConfig(rank=rank, base_quant=quant,
                                                                quant_embedding=emb))
            total = _bytes(model.abstract_base()) + 16 * sum(
                x.size for x in jax.tree.leaves(model.abstract_adapters()))
            per.append(total / param_count(cfg))
            cells.append(f"{total / 1e9:.2f} GB")
        rows.append(f"| {quant}{' + embedding' if emb else ''} | {min(per):.3f}-{max(per):.3f} | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_args(p)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--base_dtype", default="bfloat16", help="the LoRA base's storage dtype")
    p.add_argument("--dtype", default="float32", help="compute dtype (both sides)")
    p.add_argument("--remat", default="none", help="per-layer remat (both sides)")
    p.add_argument("--attention_impl", default="", help="'' (XLA), chunked or cudnn (both)")
    p.add_argument("--attention_chunk", type=int, default=512, help="query rows per block")
    p.add_argument("--abstract", action="store_true", help="compile from shapes only")
    p.add_argument("--steps", type=int, default=5, help="timed steps (0: memory only)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kinds", default="full,lora")
    p.add_argument("--state_table", action="store_true", help="print the README's rows, exit")
    args = p.parse_args()
    if args.state_table:
        print(state_table(rank=args.rank))
        return
    rows, runners = zip(*(measure(kind, args) for kind in args.kinds.split(",")))
    if not args.abstract and args.steps:
        time_steps(rows, runners, args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for out in rows:
        print(json.dumps(dict(out, load_avg_1min=load)), flush=True)


if __name__ == "__main__":
    main()
