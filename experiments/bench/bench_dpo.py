"""Time the trainer's jitted DPO step on the current backend, optionally next to PyTorch.

The step is the one ``Run`` jits (``dpo_jax.step.make_train_step``, donated state), on a random
batch laid out like the PyTorch baseline's (shared prompt, response tokens scored). Prints one
JSON line per measurement and a table. Same invocation, same environment for both sides:

  python experiments/bench/bench_dpo.py --preset gpt2-cpu-bench --pairs 8 --prompt 64 \
      --response 64 --configs same_math,best --torch
  python experiments/bench/bench_dpo.py --sweep            # length x vocab growth, small shape

Configurations (``--configs``, comma separated; see VARIANTS):
  same_math  dense full-vocab log-softmax at every position, online bf16-stored reference
             forward each step (what pytorch_dpo_step.py does)
  best       precomputed reference log-probs, scored-only + chunked log-probs
  same_math_tuned_scan / best_tuned_scan  the same with this CPU's speed switches (reference
             head tiled for the forward-only pass, remat dots_saveable in the layer scan);
             same_math_tuned / best_tuned unroll the layers instead
  and single switches on top of same_math: scored, precomputed, bf16, remat_full,
  remat_dots, remat_dots_nb (dots_no_batch), no_donate, same_math_tiled(_ref),
  same_math_unrolled; bf16_remat_dots_nb, bf16_remat_full; best_chunked_attn (best +
  query-blocked attention); bf16_cudnn and best_bf16_cudnn (GPU: cuDNN fused attention).
  NAME+shared (e.g. best+shared, best_tuned_scan+shared): NAME with prefix-shared pairs
  (data.prefix_sharing, dpo_jax/data/prefix.py): one row [prompt, chosen, rejected] per pair,
  its length rounded up to a multiple of 16 as the pipeline's buckets are; same pairs, so
  ``first_loss`` matches NAME's. ``--hh N``: the first N pairs of the shared HH file
  (GPT-2 tokenizer, the pipeline's truncation and auto buckets) instead of random tokens; each
  configuration then runs every batch shape of that epoch and reports the epoch's time.
FLOPs/token = 8N + 16 L d T (policy train + reference forward, as pytorch_dpo_step.py counts),
for every configuration, so tokens/s and MFU compare the same nominal work; ``mfu_executed``
counts only what the configuration runs (scored-only head, no reference forward when
precomputed), which is the honest chip-utilisation number for "best".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from dpo_jax import losses as losses_lib  # noqa: E402
from dpo_jax.config import base_config  # noqa: E402
from dpo_jax.data import batching, prefix  # noqa: E402
from dpo_jax.logprobs import DENSE, LogprobConfig, max_scored_tokens  # noqa: E402
from dpo_jax.models import Model, matmul_param_count, preset  # noqa: E402
from dpo_jax.optim import OptimConfig, make_optimizer  # noqa: E402
from dpo_jax.state import Frozen, TrainState  # noqa: E402
from dpo_jax.step import StepConfig, sequence_stats, make_train_step  # noqa: E402

# The PyTorch baseline lives beside the repository, in ../shared/bench/.
TORCH_SCRIPT = os.path.join(os.path.dirname(REPO), "shared", "bench", "pytorch_dpo_step.py")
# Shapes named like pytorch_dpo_step.py's CONFIGS: (our preset, overrides).
SHAPES = {
    "gpt2-cpu-bench": ("gpt2", dict(n_layer=4, d_model=256, n_head=4, d_ff=1024, vocab_size=50257,
                                    max_len=512)),
    "gpt2-tiny": ("gpt2", dict(n_layer=2, d_model=128, n_head=4, d_ff=512, max_len=1024)),
    "sweep-small": ("gpt2", dict(n_layer=2, d_model=128, n_head=4, d_ff=512, max_len=8192)),
}
SCORED_CHUNKED = LogprobConfig(scored_only=True, seq_chunk=128, vocab_chunk=None)
# The same log-probs evaluated in cache-sized tiles (rows x seq_chunk positions x vocab_chunk
# logits: 16 x 32 x 4096 float32 = 8 MiB at the CPU shape), each tile's logsumexp online.
ALL_TILED = LogprobConfig(scored_only=False, seq_chunk=32, vocab_chunk=4096)
SCORED_TILED = LogprobConfig(scored_only=True, seq_chunk=32, vocab_chunk=4096)
# name -> (model overrides, logprob config, precomputed reference, donate[, forward-only
# logprob config: the reference forward's / precompute's tiling, default as the policy's])
VARIANTS = {
    "same_math": ({}, DENSE, False, True),
    "best": ({}, SCORED_CHUNKED, True, True),
    "scored": ({}, SCORED_CHUNKED, False, True),
    "precomputed": ({}, DENSE, True, True),
    "bf16": (dict(dtype="bfloat16"), DENSE, False, True),
    "best_bf16": (dict(dtype="bfloat16"), SCORED_CHUNKED, True, True),
    "remat_full": (dict(remat="full"), DENSE, False, True),
    "remat_dots": (dict(remat="dots_saveable"), DENSE, False, True),
    "remat_dots_nb": (dict(remat="dots_no_batch"), DENSE, False, True),
    "bf16_remat_dots_nb": (dict(dtype="bfloat16", remat="dots_no_batch"), DENSE, False, True),
    "bf16_remat_full": (dict(dtype="bfloat16", remat="full"), DENSE, False, True),
    "no_donate": ({}, DENSE, False, False),
    # same math (full vocabulary at every position, reference forward each step), evaluated
    # in tiles: everywhere (the policy's backward then recomputes its logits), or only in the
    # reference's forward (the policy's head dense, as PyTorch's)
    "same_math_tiled": ({}, ALL_TILED, False, True),
    "same_math_tiled_ref": ({}, DENSE, False, True, ALL_TILED),
    # best, with the one-time reference pass tiled (the step itself is best's)
    "best_tiled_ref": ({}, SCORED_CHUNKED, True, True, SCORED_TILED),
    # layers unrolled instead of lax.scan (same numbers; compile time grows with depth)
    "same_math_unrolled": (dict(scan_layers=False), DENSE, False, True),
    # same math with this CPU's speed switches: reference head tiled, layers unrolled
    "same_math_tuned": (dict(scan_layers=False), DENSE, False, True, ALL_TILED),
    "best_tuned": (dict(scan_layers=False), SCORED_CHUNKED, True, True, SCORED_TILED),
    # the layer scan kept, with remat dots_saveable: XLA:CPU's scan backward is slow when it
    # stores every elementwise intermediate; recomputing them from the saved matmul outputs
    # is cheaper (body value-and-grad 0.44 -> 0.33 s, like unrolling)
    "same_math_tuned_scan": (dict(remat="dots_saveable"), DENSE, False, True, ALL_TILED),
    "best_tuned_scan": (dict(remat="dots_saveable"), SCORED_CHUNKED, True, True, SCORED_TILED),
    # query-blocked, rematerialised attention (dpo_jax.models.layers.chunked_attention): the
    # [heads, T, T] scores are no longer the memory wall at long T
    "best_chunked_attn": (dict(attention_impl="chunked", attention_chunk=512), SCORED_CHUNKED,
                          True, True),
    # GPU: cuDNN fused attention (bf16)
    "bf16_cudnn": (dict(dtype="bfloat16", attention_impl="cudnn"), DENSE, False, True),
    "best_bf16_cudnn": (dict(dtype="bfloat16", attention_impl="cudnn"), SCORED_CHUNKED, True,
                        True),
}


def model_config(name: str, **overrides):
    """A pytorch_dpo_step.py shape name or a dpo_jax preset, with overrides."""
    base, shape = SHAPES.get(name, (name, {}))
    return preset(base, **{**shape, **overrides})


def matmul_ceiling(dtype, n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of one jitted n x n matmul on the default device (the MFU denominator)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


SHARED = "+shared"  # configuration-name suffix: prefix-shared pairs
SHARED_MULTIPLE = 16  # shared rows are padded to this multiple (data.bucket_multiple's default)


def bench_optimizer():
    """``(tx, schedule, loss_cfg)`` of every benchmarked step: AdamW at TRL's lr 1e-6, no
    warmup, no clipping; the default loss (sigmoid, beta 0.1; a MoE model's router loss from
    its config)."""
    c = base_config()
    c.optim.name, c.optim.lr, c.optim.warmup_steps, c.optim.max_grad_norm = "adamw", 1e-6, 0, 0.0
    tx, schedule = make_optimizer(OptimConfig.from_config(c.optim), 1000)
    return tx, schedule, losses_lib.loss_config_from(c.loss)


def compiled_memory(compiled, out: dict):
    """Adds XLA's compiled temporary and argument sizes (MiB) of ``compiled`` to ``out``;
    returns its ``memory_analysis()`` (None where the backend gives none)."""
    mem = compiled.memory_analysis()
    if mem is not None:
        out["compiled_temp_MiB"] = round(mem.temp_size_in_bytes / 2**20, 1)
        out["compiled_args_MiB"] = round(mem.argument_size_in_bytes / 2**20, 1)
    return mem


def split_config(name: str) -> tuple[str, bool]:
    """``'best+shared'`` -> ``('best', True)``; ``'best'`` -> ``('best', False)``."""
    if name.endswith(SHARED):
        return name[: -len(SHARED)], True
    return name, False


def make_batch(pairs: int, prompt: int, response: int, vocab: int, seed: int = 1,
               shared: bool = False):
    """Random [2B, T] batch, chosen rows then rejected, shared prompt, response tokens scored;
    ``shared``: the same pairs as B prefix-shared rows (``dpo_jax.data.prefix``)."""
    rng = np.random.default_rng(seed)
    T = prompt + response
    ids = rng.integers(0, vocab, (2 * pairs, T), dtype=np.int32)
    ids[pairs:, :prompt] = ids[:pairs, :prompt]
    weight = np.ones((pairs,), np.float32)
    if shared:
        items = [{"prompt": ids[i, :prompt], "chosen": ids[i, prompt:],
                  "rejected": ids[pairs + i, prompt:]} for i in range(pairs)]
        length = int(prefix.unit_lengths(batching.pair_lengths(items)).max())
        return dict(prefix.layout(items, 0, [batching.round_up(length, SHARED_MULTIPLE)]),
                    pair_weight=weight)
    mask = np.zeros((2 * pairs, T), np.float32)
    mask[:, prompt:] = 1.0
    return {"input_ids": ids, "positions": np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape).copy(),
            "segment_ids": np.ones_like(ids), "loss_mask": mask, "pair_weight": weight}


def hh_batches(num_pairs: int, batch_pairs: int, shared: bool) -> list[tuple[dict, int, int]]:
    """The first ``num_pairs`` pairs of the shared HH file (``harmless-base-test``) tokenised
    with the shared GPT-2 tokenizer (the pipeline's default truncation, max_length 512), as the
    eval pipeline batches them (auto buckets; ``shared``: prefix-shared): one ``(batch, count,
    nominal tokens)`` per distinct batch shape, the batch the first of that shape, count the
    batches of that shape, nominal tokens the unshared layout's real tokens of all of them."""
    from dpo_jax.data import PreferencePipeline, default_data_config, load_tokenizer
    from dpo_jax.data.errors import BadRows
    from dpo_jax.data.loading import load_raw_pairs
    from dpo_jax.data.testing import data_root
    from dpo_jax.data.tokenize import PairTokenizer

    root = data_root(REPO)
    c = default_data_config()
    c.source, c.tokenizer = "hh", str(root / "gpt2_tokenizer")
    c.path = str(root / "hh_rlhf" / "harmless-base-test.jsonl.gz")
    c.on_bad_row, c.prefix_sharing = "skip", shared
    bad = BadRows("skip")
    raw = load_raw_pairs(c, "test", bad)[:num_pairs]
    pairs, _ = PairTokenizer(load_tokenizer(c.tokenizer), c).encode(raw, bad)
    pipe = PreferencePipeline(pairs, c, train=False, global_batch_size=batch_pairs,
                              pad_id=50256)
    shapes: dict[tuple, list] = {}
    for i, batch in enumerate(pipe):
        idx = np.arange(i * batch_pairs, min((i + 1) * batch_pairs, len(pairs)))
        tokens = int(batching.seq_lengths_of(batching.pair_lengths([pairs[j] for j in idx])).sum())
        entry = shapes.setdefault(batch["input_ids"].shape, [batch, 0, 0, 0])
        entry[1] += 1
        entry[2] += tokens
        entry[3] += int((batch["segment_ids"] > 0).sum())
    return [tuple(v) for v in shapes.values()]


def bench_hh(a, variant: str, ceilings: dict, cache: dict) -> list[dict]:
    """``variant`` over every batch shape of the first ``a.hh`` HH pairs (``hh_batches``): one
    row per shape (``batches`` of it in the epoch) and an ``epoch`` row whose ``epoch_s`` is
    the sum over shapes of batches x median step time."""
    shared = split_config(variant)[1]
    if shared not in cache:
        cache[shared] = hh_batches(a.hh, a.pairs, shared)
    rows, epoch_s, nominal, real, padded = [], 0.0, 0, 0, 0
    for batch, count, tokens, real_tokens in cache[shared]:
        L = batch["input_ids"].shape[1]
        r = bench_variant(a.preset, variant, a.pairs, 0, L, a.steps, a.warmup, ceilings,
                          batch_np=batch, nominal_tokens=tokens // count,
                          scored_steps=a.scored_steps_per_octave)
        r.update(shape=f"{a.preset} hh{a.hh}", batches=count)
        rows.append(r)
        epoch_s += count * r["step_s_median"]
        nominal, real, padded = nominal + tokens, real + real_tokens, padded + count * batch[
            "input_ids"].size
    rows.append(dict(shape=f"{a.preset} hh{a.hh}", config=variant, epoch=True, pairs=a.pairs,
                     epoch_s=round(epoch_s, 3), tokens_per_s=round(nominal / epoch_s),
                     nominal_tokens=nominal, layout_real_tokens=real, layout_padded_tokens=padded,
                     compiled_temp_MiB=max(r.get("compiled_temp_MiB", 0) for r in rows)))
    return rows


def _peak_bytes():
    """Peak device bytes so far in this process (None where the backend keeps no stats, e.g.
    CPU); cumulative over the configurations run before, so the largest config should go last."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def bench_variant(shape: str, variant: str, pairs: int, prompt: int, response: int, steps: int,
                  warmup: int, ceilings: dict, run_steps: bool = True,
                  max_temp_bytes: float | None = None, abstract: bool = False,
                  batch_np: dict | None = None, nominal_tokens: int | None = None,
                  scored_steps: int = 1) -> dict:
    """One configuration: compile (XLA memory analysis), then time `steps` steps after
    `warmup`, unless run_steps is False or the step's XLA temp memory exceeds max_temp_bytes
    (then the row is compiled only). abstract=True compiles from shapes alone (no parameter
    or optimiser memory is allocated): a model too large for this host's memory can still
    be sized. batch_np: a given batch instead of make_batch's (its nominal_tokens: the
    unshared layout's real tokens of its pairs). scored_steps: max_scored_tokens'
    steps_per_octave (1: the trainer's power-of-two bound)."""
    run_steps = run_steps and not abstract
    base, shared = split_config(variant)
    overrides, lp_cfg, precomputed, donate, *fwd_lp = VARIANTS[base]
    cfg = model_config(shape, **overrides)
    model = Model(cfg)
    tx, schedule, loss_cfg = bench_optimizer()
    step_cfg = StepConfig(logprobs=lp_cfg, forward_logprobs=fwd_lp[0] if fwd_lp else None)
    to_bf16 = lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)
    if abstract:
        params = model.abstract_params()
        ref_params = jax.eval_shape(to_bf16, params)
    else:
        params = jax.jit(model.init)(jax.random.key(0))
        ref_params = jax.jit(to_bf16)(params)
    if batch_np is None:
        batch_np = make_batch(pairs, prompt, response, cfg.vocab_size, shared=shared)
    max_scored = (max_scored_tokens(batch_np["loss_mask"], steps_per_octave=scored_steps)
                  if lp_cfg.scored_only else None)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    out = dict(shape=shape, config=variant, backend=jax.default_backend(), pairs=pairs,
               matmul_params=matmul_param_count(cfg), vocab=cfg.vocab_size,
               seq=prompt + response, prompt=prompt, dtype=cfg.dtype, remat=cfg.remat,
               logprobs=dataclasses.asdict(lp_cfg), precomputed_ref=precomputed, donate=donate,
               forward_logprobs=dataclasses.asdict(step_cfg.forward_logprobs),
               prefix_shared=shared, rows=list(batch_np["input_ids"].shape),
               max_scored=max_scored,
               real_tokens=int((batch_np["segment_ids"] > 0).sum()))
    # the reference's forward-only log-probs (the precompute pass of `best`)
    ref_stats = lambda p, b: sequence_stats(model, p, b, step_cfg, max_scored, forward_only=True)
    if precomputed:  # the step carries the reference results: shapes first, values if it runs
        shapes = jax.eval_shape(ref_stats, ref_params, batch)
        ref_logps, ref_lengths = (jnp.zeros(s.shape, s.dtype)
                                  for s in (shapes.logps, shapes.lengths))
        batch = dict(batch, ref_logps=ref_logps, ref_lengths=ref_lengths)
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=params,
                       frozen=None if precomputed else Frozen(reference=ref_params),
                       opt_state=(jax.eval_shape(tx.init, params) if abstract
                                  else jax.jit(tx.init)(params)))
    step_fn = jax.jit(make_train_step(model, loss_cfg, tx, schedule, step_cfg),
                      donate_argnums=0 if donate else (), static_argnums=2)
    t = time.perf_counter()
    compiled = step_fn.lower(state, batch, max_scored).compile()
    out["compile_s"] = round(time.perf_counter() - t, 2)
    mem = compiled_memory(compiled, out)
    if mem is not None:
        # live at once: arguments (donated state aliases the new state), outputs, temporaries
        out["compiled_peak_est_GiB"] = round((mem.argument_size_in_bytes + mem.output_size_in_bytes
                                              - mem.alias_size_in_bytes
                                              + mem.temp_size_in_bytes) / 2**30, 2)
        if max_temp_bytes and mem.temp_size_in_bytes > max_temp_bytes:
            run_steps = False
    if not run_steps:
        out["compiled_only"] = True
        return out
    if precomputed:  # one reference pass over the data (timed: amortised over an epoch below)
        fwd = jax.jit(ref_stats)
        t = time.perf_counter()
        jax.block_until_ready(fwd(ref_params, batch))
        out["ref_precompute_compile_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        stats = jax.block_until_ready(fwd(ref_params, batch))
        ref_logps, ref_lengths = stats.logps, stats.lengths
        out["ref_precompute_s_per_batch"] = round(time.perf_counter() - t, 4)
        batch = dict(batch, ref_logps=ref_logps, ref_lengths=ref_lengths)
    del ref_params
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)  # the executable measured above
        losses.append(float(metrics["loss"]))  # blocks: the step is done
        if i >= warmup:
            times.append(time.perf_counter() - t)
    T = prompt + response
    # the same nominal tokens for both layouts (the unshared rows' real tokens), so tokens/s
    # compares pair throughput
    tokens = nominal_tokens or 2 * pairs * T
    n = matmul_param_count(cfg)
    flops_tok = 8 * n + 16 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
    # FLOPs this configuration executes (the nominal count above assumes the LM head at every
    # position and a reference forward each step), per column of the rows it runs (prefix-
    # shared rows: fewer, longer ones): head at max_scored of a row's columns when scored-only,
    # no reference forward when precomputed.
    head = cfg.vocab_size * cfg.d_model
    rows, width = batch_np["input_ids"].shape
    frac = (max_scored / width) if lp_cfg.scored_only else 1.0
    attn = 4 * cfg.n_layer * cfg.n_head * cfg.head_dim * width
    executed = 3 * (2 * (n - head) + 2 * head * frac + attn)
    if not precomputed:
        executed += 2 * (n - head) + 2 * head * frac + attn
    med = statistics.median(times)
    q = np.percentile(times, [25, 75])
    ceiling = ceilings["bfloat16" if cfg.dtype == "bfloat16" else "float32"]
    out.update(first_loss=round(losses[0], 5), losses=losses, step_s_median=round(med, 6),
               step_s_min=round(min(times), 6), step_s_max=round(max(times), 6),
               step_s_iqr=[round(float(x), 4) for x in q], steps=steps, warmup=warmup,
               tokens_per_s=round(tokens / med), flops_per_token=flops_tok,
               achieved_tflops=round(flops_tok * tokens / med / 1e12, 4),
               mfu=round(flops_tok * tokens / med / ceiling, 4),
               executed_flops_per_token=round(executed),
               mfu_executed=round(executed * rows * width / med / ceiling, 4),
               peak_bytes=_peak_bytes())
    if precomputed:  # the reference pass amortised over one epoch (each pair seen once)
        out["tokens_per_s_one_epoch"] = round(tokens / (med + out["ref_precompute_s_per_batch"]))
    return out


def run_torch(script: str, shape: str, pairs: int, prompt: int, response: int, steps: int,
              warmup: int, device: str) -> dict:
    """pytorch_dpo_step.py in a subprocess with this process's environment; its JSON row."""
    cmd = [sys.executable, script, "--device", device, "--models", shape, "--pairs", str(pairs),
           "--seq", str(prompt + response), "--prompt", str(prompt), "--steps", str(steps),
           "--warmup", str(warmup), "--compile", ""]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not rows:
        return dict(config="pytorch", error=proc.stderr[-2000:], cmd=" ".join(cmd))
    return dict(rows[-1], config="pytorch", cmd=" ".join(cmd))


def run_isolated(a, variant: str, ceilings: dict) -> dict:
    """One configuration in a fresh process (same flags, same MFU ceilings): device peak
    memory is otherwise a high-water mark over every configuration run before it."""
    cmd = [sys.executable, os.path.abspath(__file__), "--preset", a.preset,
           "--pairs", str(a.pairs), "--prompt", str(a.prompt), "--response", str(a.response),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--configs", variant,
           "--ceilings", f"{ceilings['float32']},{ceilings['bfloat16']}",
           "--scored_steps_per_octave", str(a.scored_steps_per_octave)]
    if a.abstract:
        cmd.append("--abstract")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ),
                              timeout=a.isolate_timeout)
    except subprocess.TimeoutExpired:
        return dict(shape=a.preset, config=variant, error=f"timeout after {a.isolate_timeout} s")
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if row.get("config") == variant:
                return row
    return dict(shape=a.preset, config=variant, error=(proc.stderr or proc.stdout)[-2000:])


def machine() -> dict:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    env = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "XLA_FLAGS", "OMP_"))}
    return dict(cpu=model, cores=os.cpu_count(), backend=jax.default_backend(),
                devices=str(jax.devices()), jax=jax.__version__, env=env,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"))


def sweep(args, ceilings) -> list[dict]:
    """Time and memory growth with length and vocabulary on a small shape (one pair)."""
    rows = []
    for vocab in map(int, args.sweep_vocabs.split(",")):
        SHAPES[f"sweep-v{vocab}"] = ("gpt2", dict(SHAPES["sweep-small"][1], vocab_size=vocab))
        for length in map(int, args.sweep_lengths.split(",")):
            for variant in args.sweep_configs.split(","):
                r = bench_variant(f"sweep-v{vocab}", variant, 1, length // 2, length // 2,
                                  args.sweep_steps, 1, ceilings,
                                  run_steps=length <= args.sweep_run_max_len,
                                  max_temp_bytes=args.max_run_temp_bytes)
                r["vocab"] = vocab
                print(json.dumps(r), flush=True)
                rows.append(r)
    return rows


def add_batch_args(p: argparse.ArgumentParser) -> None:
    """The options of the model and the random pairs a step is timed on (``model_config``,
    ``make_batch``): ``--preset``, ``--pairs``, ``--prompt`` and ``--response`` tokens."""
    p.add_argument("--preset", default="gpt2-cpu-bench")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--response", type=int, default=64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_args(p)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--configs", default="same_math,best")
    p.add_argument("--scored_steps_per_octave", type=int, default=1,
                   help="max_scored rounding (logprobs.max_scored_tokens): 1 = the trainer's "
                        "power of two; 4 = quarter steps between powers of two")
    p.add_argument("--hh", type=int, default=0,
                   help="time an epoch of the first N pairs of the shared HH file (GPT-2 "
                        "tokens) instead of random pairs of --prompt/--response tokens")
    p.add_argument("--torch", action="store_true", help="also run pytorch_dpo_step.py")
    p.add_argument("--torch_script", default=TORCH_SCRIPT)
    p.add_argument("--torch_device", default="cpu" if jax.default_backend() == "cpu" else "cuda")
    p.add_argument("--abstract", action="store_true",
                   help="compile from shapes only (memory analysis, no steps, no allocation)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep_steps", type=int, default=2)
    p.add_argument("--max_run_temp_bytes", type=float, default=6 * 2**30,
                   help="sweep: points whose step needs more XLA temp memory are compiled only")
    p.add_argument("--sweep_run_max_len", type=int, default=8192,
                   help="sweep: longer points are compiled (memory) but not timed")
    p.add_argument("--sweep_lengths", default="512,2048,8192")
    p.add_argument("--sweep_vocabs", default="50257,128256")
    p.add_argument("--sweep_configs", default="same_math,best,best_chunked_attn")
    p.add_argument("--isolate", action="store_true",
                   help="each configuration in its own process: its peak device memory is its own")
    p.add_argument("--isolate_timeout", type=float, default=600)
    p.add_argument("--ceilings", default="", help=argparse.SUPPRESS)  # f32,bf16 FLOP/s
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.hh and (a.isolate or a.sweep or a.abstract):
        p.error("--hh runs in this process, over real batches: drop --isolate/--sweep/--abstract")
    info = machine()
    print(json.dumps(info), flush=True)
    if a.ceilings:  # given by the parent of an --isolate run
        ceilings = dict(zip(("float32", "bfloat16"), map(float, a.ceilings.split(","))))
    else:
        ceilings = {"float32": matmul_ceiling(jnp.float32),
                    "bfloat16": matmul_ceiling(jnp.bfloat16)}
    info["matmul_ceiling_tflops"] = {k: round(v / 1e12, 4) for k, v in ceilings.items()}
    print(json.dumps(info["matmul_ceiling_tflops"]), flush=True)
    rows = []
    if a.sweep:
        rows = sweep(a, ceilings)
    else:
        torch_runs = 2 if a.torch and a.torch_device == "cpu" else int(a.torch)
        def torch_row():
            return run_torch(a.torch_script, a.preset, a.pairs, a.prompt, a.response, a.steps,
                             a.warmup, a.torch_device)

        def emit(r):
            print(json.dumps(r), flush=True)
            rows.append(r)

        if torch_runs:  # first, before this process's allocator holds device memory
            emit(torch_row())
        hh_cache: dict = {}
        for v in filter(None, a.configs.split(",")):
            if a.hh:
                for r in bench_hh(a, v, ceilings, hh_cache):
                    emit(r)
                continue
            if a.isolate:
                emit(run_isolated(a, v, ceilings))
                continue
            try:
                r = bench_variant(a.preset, v, a.pairs, a.prompt, a.response, a.steps, a.warmup,
                                  ceilings, abstract=a.abstract,
                                  scored_steps=a.scored_steps_per_octave)
            except Exception as e:  # e.g. out of device memory: keep the other configurations
                r = dict(shape=a.preset, config=v, error=f"{type(e).__name__}: {e}"[:2000])
            emit(r)
        if torch_runs > 1:  # again after ours: on a shared CPU the load drifts, so both sides
            # are bracketed and the ratio uses PyTorch's faster run (conservative for us)
            emit(torch_row())
    # The ceiling again at the end: a neighbour's load during the first measurement would
    # otherwise inflate MFU; the larger of the two is the device's ceiling.
    again = {"float32": matmul_ceiling(jnp.float32), "bfloat16": matmul_ceiling(jnp.bfloat16)}
    info["matmul_ceiling_tflops_end"] = {k: round(v / 1e12, 4) for k, v in again.items()}
    for r in rows:
        if "mfu" in r:
            k = "bfloat16" if r["dtype"] == "bfloat16" else "float32"
            scale = max(ceilings[k], again[k]) / ceilings[k]
            r["mfu"], r["mfu_executed"] = round(r["mfu"] / scale, 4), round(r["mfu_executed"] / scale, 4)
    print(json.dumps(info["matmul_ceiling_tflops_end"]), flush=True)
    torch_tps = max((r["tokens_per_s"] for r in rows if r["config"] == "pytorch" and "tokens_per_s" in r),
                    default=None)
    def twin_key(r):
        return split_config(r["config"])[0], r.get("shape"), bool(r.get("epoch"))

    # prefix sharing against the same configuration unshared (hh: whole-epoch rows only)
    unshared = {twin_key(r): r for r in rows
                if "batches" not in r and not split_config(r["config"])[1]}
    for r in rows:
        twin = unshared.get(twin_key(r)) if split_config(r["config"])[1] else None
        if twin and twin.get("tokens_per_s") and r.get("tokens_per_s") and "batches" not in r:
            r["speedup_vs_unshared"] = round(r["tokens_per_s"] / twin["tokens_per_s"], 3)
            if twin.get("compiled_temp_MiB"):
                r["temp_vs_unshared"] = round(r["compiled_temp_MiB"] / twin["compiled_temp_MiB"], 3)
            print(json.dumps(dict(config=r["config"], shape=r.get("shape"),
                                  speedup_vs_unshared=r["speedup_vs_unshared"],
                                  temp_vs_unshared=r.get("temp_vs_unshared"))), flush=True)
    print("\n| shape | config | seq | step s (median [min,max]) | tokens/s | MFU nominal | MFU executed | compile s | temp MiB | peak est GiB | peak GiB | vs torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (f"{r['tokens_per_s'] / torch_tps:.2f}x" if torch_tps and r.get("tokens_per_s")
                 and r["config"] != "pytorch" else "")
        med = r.get("step_s_median")
        span = (f"{med} [{r.get('step_s_min')}, {r.get('step_s_max')}]" if med else
                f"epoch {r['epoch_s']}" if r.get("epoch") else
                "error" if "error" in r else "compiled only")
        print(f"| {r.get('shape', r.get('model'))} | {r['config']} | {r.get('seq')} | {span} | "
              f"{r.get('tokens_per_s', '')} | {r.get('mfu', '')} | {r.get('mfu_executed', '')} | {r.get('compile_s', '')} | "
              f"{r.get('compiled_temp_MiB', '')} | {r.get('compiled_peak_est_GiB', '')} | "
              f"{round(r['peak_bytes'] / 2**30, 2) if r.get('peak_bytes') else ''} | {ratio} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(machine=info, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
