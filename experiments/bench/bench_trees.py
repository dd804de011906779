"""Preference trees (issue 31) against the same branch points unrolled into independent pairs,
and block skipping in the chunked attention, timed as train steps.

Two shapes:

* ``turns``: synthetic conversations of ``--turns`` turns (a first user turn of
  ``--first`` tokens, then per turn an assistant answer of ``--answer`` tokens with one
  rejected alternative of the same length and a user turn of ``--user`` tokens), a branch point
  at every turn, ``--trees`` conversations per batch. Unrolled: each branch point a pair with
  its full history, one sequence per row (bucket = the longest) or packed (``+packed``); trees:
  one tree per row (``dpo_jax.data.trees``).
* ``prefix``: ``--pairs`` pairs, prompt ``--prompt`` tokens, responses ``--response`` (the
  prefix-sharing bench shape 384 / 64): unshared rows, prefix-shared rows, and the shared rows
  with the chunked attention with and without block skipping.

Every configuration runs the same step (``make_train_step``: sigmoid loss, AdamW, stored
reference log-probs, the scored-only chunked LM head), first-loss printed so the layouts can be
seen to agree; reported: columns per batch (real), XLA's compiled temp memory, median step time
over ``--steps`` steps after ``--warmup``. Output: one JSON line per configuration.

    python experiments/bench/bench_trees.py --shape turns
    python experiments/bench/bench_trees.py --shape prefix
    python experiments/bench/bench_trees.py --shape prefix --attention_only   # one layer
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

from dpo_jax import losses as losses_lib  # noqa: E402
from dpo_jax.config import base_config  # noqa: E402
from dpo_jax.data import batching, prefix, trees  # noqa: E402
from dpo_jax.logprobs import LogprobConfig, max_scored_tokens  # noqa: E402
from dpo_jax.models import Model, preset  # noqa: E402
from dpo_jax.optim import OptimConfig, make_optimizer  # noqa: E402
from dpo_jax.state import TrainState  # noqa: E402
from dpo_jax.step import StepConfig, make_train_step  # noqa: E402

# bench_dpo.py's CPU shape: GPT-2 layout, 4 layers, d_model 256, GPT-2's vocabulary
MODEL = dict(n_layer=4, d_model=256, n_head=4, d_ff=1024, vocab_size=50257, max_len=1024)
ATTENTION = {"xla": {}, "chunked": dict(attention_impl="chunked", attention_chunk=128),
             "chunked_noskip": dict(attention_impl="chunked", attention_chunk=128,
                                    attention_skip_blocks=False)}


def conversations(n: int, turns: int, first: int, answer: int, user: int, vocab: int, seed=0):
    rng = np.random.default_rng(seed)
    tok = lambda k: rng.integers(3, vocab, k).astype(np.int32)  # noqa: E731
    out = []
    for _ in range(n):
        history, bps = tok(first), []
        for t in range(turns):
            chosen, rejected = tok(answer), tok(answer)
            bps.append(trees.BranchPoint(history, [chosen, rejected], depth=t))
            history = np.concatenate([history, chosen, tok(user)])
        out.append(bps)
    return out


def pair_rows(pairs: list[dict], packing: bool, pack_length: int) -> dict:
    """Unrolled pairs as the pipeline lays them out: 2B sequences, one per row (bucket = the
    longest, rounded to 16) or first-fit-decreasing packed (with seq_index)."""
    lengths = batching.pair_lengths(pairs)
    seq = batching.seq_lengths_of(lengths)
    bucket = batching.round_up(int(seq.max()), 16)
    plan = batching.make_plan(seq, [bucket], packing, pack_length, 1)
    seqs = dict(enumerate(batching.sequences(pairs)))
    out = batching.materialise(plan, seqs, 0, plan.rows, 0)
    out["pair_weight"] = np.ones(len(pairs), np.float32)
    return out


def tree_rows(tree_bps) -> dict:
    built = [trees.build(t) for t in tree_bps]
    length = batching.round_up(max(trees.unit_length(t) for t in built), 16)
    out = trees.layout(built, 0, buckets=[length])
    del out["bp_index"]
    out["pair_weight"] = np.ones(sum(map(len, tree_bps)), np.float32)
    return out


def prefix_rows(pairs: list[dict]) -> dict:
    length = batching.round_up(int(prefix.unit_lengths(batching.pair_lengths(pairs)).max()), 16)
    out = prefix.layout(pairs, 0, [length])
    out["pair_weight"] = np.ones(len(pairs), np.float32)
    return out


def run(name: str, batch_np: dict, attention: str, steps: int, warmup: int) -> dict:
    model = Model(preset("gpt2", **MODEL, **ATTENTION[attention]))
    c = base_config()
    c.optim.name, c.optim.lr, c.optim.warmup_steps, c.optim.max_grad_norm = "adamw", 1e-6, 0, 0.0
    tx, schedule = make_optimizer(OptimConfig.from_config(c.optim), 1000)
    loss_cfg = losses_lib.loss_config_from(c.loss)
    step_cfg = StepConfig(logprobs=LogprobConfig(scored_only=True, seq_chunk=128,
                                                 vocab_chunk=None))
    B = len(batch_np["pair_weight"])
    rng = np.random.default_rng(3)  # stored reference log-probs (no reference forward)
    batch_np = dict(batch_np, ref_logps=rng.normal(-60, 5, 2 * B).astype(np.float32),
                    ref_lengths=np.zeros(2 * B, np.float32))
    params = jax.jit(model.init)(jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=params, frozen=None,
                       opt_state=jax.jit(tx.init)(params))
    max_scored = max_scored_tokens(batch_np["loss_mask"])
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    step = jax.jit(make_train_step(model, loss_cfg, tx, schedule, step_cfg),
                   static_argnums=2, donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, max_scored).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times, first_loss = [], None
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        loss = float(metrics["loss"])
        if i == 0:
            first_loss = loss
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return dict(config=name, attention=attention, rows=list(batch_np["input_ids"].shape),
                columns=int(batch_np["input_ids"].size),
                real_columns=int((batch_np["segment_ids"] > 0).sum()), branch_points=B,
                first_loss=round(first_loss, 6), compile_s=round(compile_s, 1),
                temp_MiB=None if mem is None else round(mem.temp_size_in_bytes / 2**20, 1),
                step_s_median=round(statistics.median(times), 4),
                step_s_all=[round(t, 4) for t in times], load_1min=os.getloadavg()[0])


def attention_only(batch_np: dict, tree_key: str, chunk: int, reps: int) -> list[dict]:
    """Value and gradient (q, k, v) of one attention layer at the model's heads over
    ``batch_np``'s rows: the XLA path on the materialised mask, the chunked path without and
    with block skipping; the three interleaved ``reps`` times (median seconds each), so the
    CPU's load drifts alike over all."""
    from dpo_jax.models.layers import (MetaMask, block_mask, branch_tree, chunked_attention,
                                       token_meta)

    R, T = batch_np["input_ids"].shape
    N, Dh = MODEL["n_head"], MODEL["d_model"] // MODEL["n_head"]
    tree = (branch_tree(jnp.asarray(batch_np["branch_ids"])) if tree_key == "branch_ids"
            else (jnp.asarray(batch_np["tree_lo"]), jnp.asarray(batch_np["tree_hi"])))
    meta = token_meta(jnp.asarray(batch_np["segment_ids"]), jnp.asarray(batch_np["positions"]),
                      tree)
    q, k, v = (jax.random.normal(jax.random.key(i), (R, T, N, Dh)) for i in range(3))
    fns = {"xla": lambda q, k, v: jax.nn.dot_product_attention(
               q, k, v, mask=block_mask(meta, meta)),
           "chunked_noskip": lambda q, k, v: chunked_attention(
               q, k, v, MetaMask(meta), chunk, skip_empty=False),
           "chunked": lambda q, k, v: chunked_attention(q, k, v, MetaMask(meta), chunk)}
    grads = {n: jax.jit(jax.value_and_grad(lambda q, k, v, f=f: jnp.sum(jnp.sin(f(q, k, v))),
                                           argnums=(0, 1, 2))) for n, f in fns.items()}
    times: dict[str, list[float]] = {n: [] for n in fns}
    values = {n: float(jax.block_until_ready(g(q, k, v))[0]) for n, g in grads.items()}
    for _ in range(reps):
        for n, g in grads.items():
            t = time.perf_counter()
            jax.block_until_ready(g(q, k, v))
            times[n].append(time.perf_counter() - t)
    return [dict(attention=n, rows=[R, T], heads=N, head_dim=Dh, chunk=chunk,
                 value=round(values[n], 4), s_median=round(statistics.median(times[n]), 4),
                 s_all=[round(t, 4) for t in times[n]], load_1min=os.getloadavg()[0])
            for n in fns]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("turns", "prefix"), default="turns")
    p.add_argument("--trees", type=int, default=2)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--first", type=int, default=64)
    p.add_argument("--answer", type=int, default=48)
    p.add_argument("--user", type=int, default=32)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--prompt", type=int, default=384)
    p.add_argument("--response", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--configs", default="")
    p.add_argument("--attention_only", action="store_true",
                   help="time one attention layer's value and gradient instead of the step: "
                        "XLA (materialised mask), chunked without and with block skipping")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args()
    vocab = MODEL["vocab_size"]
    if a.shape == "turns":
        tree_bps = conversations(a.trees, a.turns, a.first, a.answer, a.user, vocab)
        pairs = [{"prompt": bp.history, "chosen": bp.responses[0],
                  "rejected": bp.responses[1]} for t in tree_bps for bp in t]
        longest = max(len(x["prompt"]) + len(x["chosen"]) for x in pairs)
        pack = batching.round_up(2 * longest, 16)
        configs = {"unrolled": (lambda: pair_rows(pairs, False, 0), "xla"),
                   "unrolled+packed": (lambda: pair_rows(pairs, True, pack), "xla"),
                   "tree": (lambda: tree_rows(tree_bps), "xla"),
                   "unrolled+chunked": (lambda: pair_rows(pairs, False, 0), "chunked"),
                   "tree+chunked": (lambda: tree_rows(tree_bps), "chunked"),
                   "tree+chunked_noskip": (lambda: tree_rows(tree_bps), "chunked_noskip")}
    else:
        rng = np.random.default_rng(1)
        pairs = [{"prompt": rng.integers(3, vocab, a.prompt).astype(np.int32),
                  "chosen": rng.integers(3, vocab, a.response).astype(np.int32),
                  "rejected": rng.integers(3, vocab, a.response).astype(np.int32)}
                 for _ in range(a.pairs)]
        configs = {"unshared": (lambda: pair_rows(pairs, False, 0), "xla"),
                   "shared": (lambda: prefix_rows(pairs), "xla"),
                   "unshared+chunked": (lambda: pair_rows(pairs, False, 0), "chunked"),
                   "shared+chunked": (lambda: prefix_rows(pairs), "chunked"),
                   "shared+chunked_noskip": (lambda: prefix_rows(pairs), "chunked_noskip")}
    if a.attention_only:
        name = "tree" if a.shape == "turns" else "shared"
        key = "tree_lo" if a.shape == "turns" else "branch_ids"
        for row in attention_only(configs[name][0](), key if key == "branch_ids" else "tree",
                                  a.chunk, a.reps):
            print(json.dumps(dict(shape=a.shape, layout=name, **row)), flush=True)
        return
    names = [n for n in a.configs.split(",") if n] or list(configs)
    for name in names:
        make, attention = configs[name]
        print(json.dumps(dict(shape=a.shape, **run(name, make(), attention, a.steps,
                                                    a.warmup))), flush=True)


if __name__ == "__main__":
    main()
