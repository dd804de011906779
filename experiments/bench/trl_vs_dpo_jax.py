"""dpo_jax against TRL's DPOTrainer on a real model and real pairs, in one invocation.

    python experiments/bench/trl_vs_dpo_jax.py --steps 5 --warmup 2 --out runs/trl_vs_dpo_jax
    python experiments/bench/trl_vs_dpo_jax.py --smoke --out runs/trl_smoke   # 2 short steps each

Model: SmolLM2-135M-Instruct (``dpo_jax.models.local.local_model(SMOLLM2)``, ``$DPO_JAX_MODELS``),
float32. Data: the train split of ``configs/hh.py`` (real HH pairs under ``data_root()``, the
dialogue rendered by the model's chat template, prompt + response <= 256 tokens, eval held out
by prompt), tokenised ONCE here by dpo_jax; the first ``8 * (warmup + steps)`` train pairs in
file order, 8 per step, the same pairs in the same order for every configuration (TRL receives
the token ids as its own tokenised columns ``prompt_ids / chosen_ids / rejected_ids`` and a
sequential sampler, so both sides score exactly the same tokens). Sigmoid DPO, beta 0.1; every
configuration uses TRL's DPOConfig optimizer defaults (AdamW, lr 1e-6, linear decay to 0 over
the run's steps, no warmup, weight decay 0, clipping 1.0; dpo_jax: ``optim.defaults='auto'``).

Configurations (``--configs``), each in its own subprocess, so each reports its own peak RSS
(``ru_maxrss`` of the child):
  trl_default      TRL DPOTrainer as a user runs it: a reference model forward every step
  trl_precompute   ``precompute_ref_log_probs=True`` (the precompute pass timed separately)
  jax_same_math    dpo_jax, policy + reference forward every step, plain chosen/rejected rows
  jax_default      dpo_jax as ``configs/hh.py`` runs it (stored reference + prefix sharing)
  jax_best         jax_default + speed settings that keep the numbers (see BEST below)

Timing: a step = one optimizer update on 8 pairs, measured around the update (TRL: a
``TrainerCallback`` from ``on_step_begin`` to ``on_step_end``; dpo_jax: the jitted step until
its outputs are ready). dpo_jax compiles every batch shape before the timed loop (the compile
time is reported), so no step pays a compile. The median over the steps after ``--warmup``;
tokens/s = mean real tokens per timed step (prompt + chosen + prompt + rejected, the same for
every configuration) / median step time.

Agreement: every configuration reports the chosen and rejected log-probs of the first batch
under the initial parameters, computed by its own code path before training (TRL:
``DPOTrainer.compute_ref_log_probs`` with the policy; dpo_jax: ``step.sequence_stats``), and
the first step's loss (0.6931 = log 2, policy = reference). The table gives the largest
relative difference of those log-probs against ``trl_default``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

CONFIGS = ("trl_default", "trl_precompute", "jax_same_math", "jax_default", "jax_best")
PAIRS_PER_STEP = 8
# jax_best on top of configs/hh.py (numerics-free switches: same log-probs, same updates)
BEST = {
    # prefix-shared units packed several to a row (segment ids): fewer padded columns
    "data.packing": True,
    "logprobs.forward_seq_chunk": 32,  # the one-time reference pass in cache-sized tiles
    "logprobs.forward_vocab_chunk": 4096,
}


# ----------------------------------------------------------------------------- the table


def summarize(results: list[dict]) -> list[dict]:
    """One row per configuration result: the median step, tokens/s, peak RSS and the speed
    ratios ``vs_trl_default`` / ``vs_trl_best`` (TRL's time / this one's: > 1 is faster than
    TRL; ``trl_best`` is the faster of the TRL rows), the same ratios of the summed timed steps
    (``total_s``, ``vs_trl_default_total`` / ``vs_trl_best_total``: every configuration
    trains on the same batches, so the sums compare equal work, where a median of few steps
    of different lengths swings with the batch order), and ``max_rel_logp_diff``: the largest
    ``|logp - logp_trl| / |logp_trl|`` over the first batch's chosen and rejected log-probs
    against ``trl_default``'s (None when either side has none). Results with an ``error`` keep
    it and get no ratios."""
    ok = [r for r in results if not r.get("error")]
    trl = [r for r in ok if r["config"].startswith("trl_")]
    ref = next((r for r in ok if r["config"] == "trl_default"), None)
    t_default = ref["median_step_s"] if ref else None
    t_best = min((r["median_step_s"] for r in trl), default=None)
    total = {r["config"]: sum(r["step_s"][r["warmup"]:]) for r in ok}
    sums_default = total[ref["config"]] if ref else None
    sums_best = min((total[r["config"]] for r in trl), default=None)
    timed = {len(r["step_s"]) - r["warmup"] for r in ok}
    if len(timed) > 1:
        raise ValueError(f"configurations timed different numbers of steps {sorted(timed)}: "
                         "their sums do not compare")
    rows = []
    for r in results:
        row = {"config": r["config"]}
        if r.get("error"):
            row["error"] = r["error"]
            row["peak_rss_gib"] = r.get("peak_rss_gib")
            rows.append(row)
            continue
        med = r["median_step_s"]
        row.update(
            median_step_s=med, min_step_s=min(r["step_s"][r["warmup"]:]),
            max_step_s=max(r["step_s"][r["warmup"]:]),
            tokens_per_s=r["tokens_per_step"] / med, peak_rss_gib=r["peak_rss_gib"],
            vs_trl_default=t_default / med if t_default else None,
            vs_trl_best=t_best / med if t_best else None,
            total_s=total[r["config"]],
            vs_trl_default_total=sums_default / total[r["config"]] if sums_default else None,
            vs_trl_best_total=sums_best / total[r["config"]] if sums_best else None,
            first_loss=r["losses"][0] if r.get("losses") else None,
            setup_s=r.get("setup_s"), compile_s=r.get("compile_s"),
            precompute_s=r.get("precompute_s"),
            max_rel_logp_diff=_max_rel_diff(r, ref),
        )
        rows.append(row)
    return rows


def _max_rel_diff(r: dict, ref: dict | None) -> float | None:
    if ref is None or not r.get("first_logps") or not ref.get("first_logps"):
        return None
    worst = 0.0
    for side in ("chosen", "rejected"):
        a, b = r["first_logps"][side], ref["first_logps"][side]
        if len(a) != len(b):
            raise ValueError(f"{r['config']}: {len(a)} first-batch {side} log-probs against "
                             f"trl_default's {len(b)}")
        worst = max([worst] + [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)])
    return worst


def markdown(rows: list[dict]) -> str:
    """The rows of :func:`summarize` as a markdown table."""

    def f(x, spec):
        return "" if x is None else format(x, spec)

    lines = ["| configuration | s/step median [min, max] | tokens/s | peak RSS GiB | "
             "vs TRL default | vs TRL best | timed steps' sum s (vs TRL default / best) | "
             "first loss | max rel. diff of first-batch log-probs vs TRL | "
             "one-time s (compile / precompute) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['config']} | error: {r['error']} | | {f(r.get('peak_rss_gib'), '.2f')}"
                         " | | | | | | |")
            continue
        once = " / ".join(f(r.get(k), ".1f") or "-" for k in ("compile_s", "precompute_s"))
        lines.append(
            f"| {r['config']} | {r['median_step_s']:.2f} [{r['min_step_s']:.2f}, "
            f"{r['max_step_s']:.2f}] | {r['tokens_per_s']:.0f} | {r['peak_rss_gib']:.2f} | "
            f"{f(r['vs_trl_default'], '.2f')}{'x' * bool(r['vs_trl_default'])} | "
            f"{f(r['vs_trl_best'], '.2f')}{'x' * bool(r['vs_trl_best'])} | "
            f"{r['total_s']:.1f}{_pair(r['vs_trl_default_total'], r['vs_trl_best_total'])} | "
            f"{f(r['first_loss'], '.4f')} | {f(r['max_rel_logp_diff'], '.1e')} | {once} |")
    return "\n".join(lines)


def _pair(a: float | None, b: float | None) -> str:
    return "" if a is None else f" ({a:.2f}x / {b:.2f}x)"


# ----------------------------------------------------------------------------- shared data


def hh_config(steps: int, overrides: dict | None = None):
    """``configs/hh.py``'s config with ``train.steps = steps`` and dotted ``overrides``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hh_config", os.path.join(REPO, "configs", "hh.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("")
    c.train.steps = steps
    for key, value in (overrides or {}).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def prepare_pairs(n_pairs: int, max_length: int | None, path: str) -> dict:
    """Tokenise ``configs/hh.py``'s train split with dpo_jax and store its first ``n_pairs``
    pairs (file order) at ``path`` (.npz); ``max_length`` (smoke mode) keeps only pairs whose
    prompt + longer response fits it. Returns a summary."""
    import numpy as np

    from dpo_jax.config import read_config
    from dpo_jax.preference_data import load_pairs

    c = hh_config(1)
    rc = read_config(c)
    pairs, stats, tokenizer = load_pairs(rc, ["train"], rc.model)
    items = pairs["train"]
    if max_length:
        items = [p for p in items
                 if len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) <= max_length]
    if len(items) < n_pairs:
        raise ValueError(f"{n_pairs} pairs needed, the train split has {len(items)}")
    items = items[:n_pairs]
    arrays = {f"{i}_{k}": np.asarray(p[k], np.int32) for i, p in enumerate(items)
              for k in ("prompt", "chosen", "rejected")}
    np.savez(path, n=np.asarray(n_pairs), pad_id=np.asarray(tokenizer.pad_token_id
                                                          if tokenizer.pad_token_id is not None
                                                          else tokenizer.eos_token_id), **arrays)
    lengths = [len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in items]
    return {"pairs": n_pairs, "longest": max(lengths), "mean_tokens_per_pair":
            float(np.mean([2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"])
                           for p in items]))}


def load_stored_pairs(path: str) -> tuple[list[dict], int]:
    import numpy as np

    with np.load(path) as f:
        n, pad = int(f["n"]), int(f["pad_id"])
        return [{k: f[f"{i}_{k}"] for k in ("prompt", "chosen", "rejected")}
                for i in range(n)], pad


def step_tokens(pairs: list[dict], steps: int) -> list[int]:
    """Real tokens per step: prompt + chosen + prompt + rejected over its 8 pairs."""
    out = []
    for s in range(steps):
        chunk = pairs[s * PAIRS_PER_STEP:(s + 1) * PAIRS_PER_STEP]
        out.append(sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"])
                       for p in chunk))
    return out


def _finish(name: str, a, step_s: list[float], losses: list[float], tokens: list[int],
            extra: dict) -> dict:
    timed = step_s[a.warmup:]
    return dict(config=name, step_s=step_s, warmup=a.warmup, median_step_s=statistics.median(timed),
                tokens_per_step=statistics.mean(tokens[a.warmup:len(step_s)]), losses=losses,
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **extra)


# ----------------------------------------------------------------------------- TRL child


def run_trl(name: str, a) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_jax.models.local import SMOLLM2, local_model

    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    pairs, _ = load_stored_pairs(a.pairs_file)
    total = a.warmup + a.steps
    path = local_model(SMOLLM2)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = None
    if name == "trl_default":  # what DPOTrainer(model=path) builds: a second copy
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = Dataset.from_dict({k + "_ids": [p[k].tolist() for p in pairs]
                            for k in ("prompt", "chosen", "rejected")})

    class Pretokenised(DPOTrainer):
        """The pairs are dpo_jax's token ids already: TRL's own columns, no re-tokenising."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class Timer(TrainerCallback):
        def __init__(self):
            self.step_s, self.t = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.t)

    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"), per_device_train_batch_size=PAIRS_PER_STEP,
        gradient_accumulation_steps=1, max_steps=total, learning_rate=1e-6,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.1, loss_type=["sigmoid"], max_length=None, disable_dropout=True,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        fp16=False, dataloader_num_workers=0, seed=0, remove_unused_columns=False,
        train_sampling_strategy="sequential",
        precompute_ref_log_probs=name == "trl_precompute",
        precompute_ref_batch_size=PAIRS_PER_STEP)
    timer = Timer()
    t1 = time.perf_counter()
    trainer = Pretokenised(model=model, ref_model=ref, args=cfg, train_dataset=ds,
                           processing_class=tok, callbacks=[timer])
    precompute_s = time.perf_counter() - t1 if name == "trl_precompute" else None
    setup_s = time.perf_counter() - t0
    # first batch's log-probs under the initial policy, by TRL's own scoring path
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS_PER_STEP)])
    batch = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    model.eval()
    with torch.no_grad():
        chosen, rejected = trainer.compute_ref_log_probs(model, batch)
    torch.set_num_threads(a.threads)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return _finish(name, a, timer.step_s, losses, step_tokens(pairs, total), dict(
        setup_s=setup_s, precompute_s=precompute_s,
        first_logps={"chosen": chosen.tolist(), "rejected": rejected.tolist()},
        versions={"trl": trl.__version__, "torch": torch.__version__,
                  "transformers": transformers.__version__,
                  "torch_threads": torch.get_num_threads()}))


# ----------------------------------------------------------------------------- dpo_jax child


def jax_overrides(name: str, best_set: list[str] = ()) -> dict:
    """configs/hh.py overrides of a dpo_jax configuration; ``best_set`` ("key=value", the value
    read as a Python literal) changes ``jax_best``'s switches (A/B runs of one switch)."""
    if name == "jax_same_math":  # plain rows, a reference forward every step
        return {"data.prefix_sharing": False, "logprobs.precompute_reference": False,
                "data.buckets": "128,192,256"}
    if name == "jax_default":
        return {}
    if name == "jax_best":
        import ast

        out = dict(BEST)
        for item in best_set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--best_set {item!r}: expected key=value")
            out[key] = ast.literal_eval(value)
        return out
    raise ValueError(f"unknown dpo_jax configuration {name!r}; expected one of {CONFIGS[2:]}")


def run_jax(name: str, a) -> dict:
    import jax
    import numpy as np

    from dpo_jax import data as data_lib
    from dpo_jax import lora as lora_lib
    from dpo_jax import losses as losses_lib
    from dpo_jax import loop
    from dpo_jax import reference as ref_lib
    from dpo_jax import state as state_lib
    from dpo_jax.config import read_config
    from dpo_jax.step import make_train_step, sequence_stats

    pairs, pad_id = load_stored_pairs(a.pairs_file)
    total = a.warmup + a.steps
    t0 = time.perf_counter()
    config = hh_config(total, jax_overrides(name, a.best_set))
    rc = read_config(config)
    loss_cfg = losses_lib.loss_config_from(config.loss)
    model = lora_lib.make_model(rc.model, rc.lora)
    setup = state_lib.setup(rc, model, reference=True)
    mesh = setup.mesh
    scored_only = rc.step.logprobs.scored_only
    setup_s = time.perf_counter() - t0

    def pipeline(stored=None):
        return data_lib.PreferencePipeline(list(pairs), rc.data, train=False,
                                           global_batch_size=PAIRS_PER_STEP, pad_id=pad_id,
                                           reference=stored)

    # first batch's log-probs under the initial parameters (the reference's forward path)
    first = next(iter(pipeline()))
    b, n = loop.device_batch(first, mesh, scored_only)
    logps = jax.device_get(jax.jit(lambda p, b, n: sequence_stats(
        model, p, b, rc.step, n, forward_only=True).logps, static_argnums=2)(setup.trainable, b, n))
    first_logps = {"chosen": logps[:PAIRS_PER_STEP].tolist(),
                   "rejected": logps[PAIRS_PER_STEP:].tolist()}
    precompute_s = None
    if rc.precompute_reference:
        t = time.perf_counter()
        got = ref_lib.compute_pair_logps(model, setup.frozen.tree, {"train": pairs}, rc.data,
                                         rc.step, mesh, PAIRS_PER_STEP, pad_id)
        precompute_s = time.perf_counter() - t
        batches = list(pipeline(got["train"]))
        setup = setup._replace(frozen=None)  # the stored log-probs replace the reference forward
    else:
        batches = list(pipeline())
    state, tx, schedule = setup.initial_state(), setup.tx, setup.schedule
    del setup
    step = loop.jit_train_step(make_train_step(model, loss_cfg, tx, schedule, rc.step,
                                               rc.train.on_nonfinite), state)
    device = [loop.device_batch(bt, mesh, scored_only) for bt in batches[:total]]
    t = time.perf_counter()
    compiled = {}
    for bt, bound in device:  # every shape compiled before the timed loop
        key = (bt["input_ids"].shape, bound)
        if key not in compiled:
            compiled[key] = step.lower(state, bt, bound).compile()
    compile_s = time.perf_counter() - t
    memory = {}
    for key, c in compiled.items():
        m = c.memory_analysis()
        if m is not None:
            memory[str(key)] = {name: getattr(m, f"{name}_size_in_bytes") / 2**20
                                for name in ("temp", "argument", "output")
                                if hasattr(m, f"{name}_size_in_bytes")}
    step_s, losses = [], []
    for bt, bound in device:
        t = time.perf_counter()
        state, metrics = compiled[(bt["input_ids"].shape, bound)](state, bt)
        jax.block_until_ready(metrics)
        step_s.append(time.perf_counter() - t)
        losses.append(float(metrics["loss"]))
    return _finish(name, a, step_s, losses, step_tokens(pairs, total), dict(
        setup_s=setup_s, compile_s=compile_s, precompute_s=precompute_s,
        first_logps=first_logps, compiled_MiB=memory,  # XLA's memory statistics per shape
        shapes=sorted({str(k) for k in compiled}),
        versions={"jax": jax.__version__, "backend": jax.default_backend()}))


# ----------------------------------------------------------------------------- parent


def _rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run_child(name: str, a, pairs_file: str, result_file: str) -> dict:
    """``name`` in its own process; killed (an error row) above ``--max_rss_gib``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--pairs_file", pairs_file,
           "--result", result_file, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--threads", str(a.threads)] + [f"--best_set={s}" for s in a.best_set]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    seen, killed = [0.0], [False]

    def watch():
        while proc.poll() is None:
            rss = _rss_gib(proc.pid)
            seen[0] = max(seen[0], rss)
            if a.max_rss_gib and rss > a.max_rss_gib:
                killed[0] = True
                proc.kill()
            time.sleep(0.2)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    rc = proc.wait()
    w.join()
    wall = time.perf_counter() - t0
    if killed[0]:
        return {"config": name, "error": f"killed above --max_rss_gib={a.max_rss_gib}",
                "peak_rss_gib": seen[0], "wall_s": wall}
    if rc != 0 or not os.path.exists(result_file):
        return {"config": name, "error": f"exit status {rc}", "peak_rss_gib": seen[0],
                "wall_s": wall}
    with open(result_file) as f:
        out = json.load(f)
    out.update(wall_s=wall, watched_rss_gib=seen[0])
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=5, help="timed steps after the warmup")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--smoke", action="store_true",
                   help="2 steps (1 warmup) of short pairs (prompt + response <= 64 tokens)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--max_rss_gib", type=float, default=0.0,
                   help="kill a configuration whose RSS passes this (0: no limit)")
    p.add_argument("--out", default="", help="directory for results.json and results.md")
    p.add_argument("--best_set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one of jax_best's config switches (repeatable), e.g. "
                        "data.pack_length_step=0")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--pairs_file", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.warmup = 1, 1
    names = [n for n in a.configs.split(",") if n]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        p.error(f"--configs: unknown {bad}; expected names from {list(CONFIGS)}")
    if a.steps < 1 or a.warmup < 0:
        p.error(f"--steps={a.steps} must be >= 1 and --warmup={a.warmup} >= 0")
    a.names = names
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.child:
        out = (run_trl if a.child.startswith("trl_") else run_jax)(a.child, a)
        with open(a.result, "w") as f:
            json.dump(out, f)
        return 0
    work = tempfile.mkdtemp(prefix="trl_vs_dpo_jax_")
    pairs_file = os.path.join(work, "pairs.npz")
    n = PAIRS_PER_STEP * (a.warmup + a.steps)
    data = prepare_pairs(n, 64 if a.smoke else None, pairs_file)
    print(f"pairs: {json.dumps(data)}", flush=True)
    results = []
    for name in a.names:
        print(f"--- {name}", flush=True)
        r = run_child(name, a, pairs_file, os.path.join(work, f"{name}.json"))
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("compiled_MiB",)}), flush=True)
    rows = summarize(results)
    table = markdown(rows)
    print(table)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        meta = {"argv": sys.argv[1:], "data": data, "machine": _machine(),
                "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows, "results": results}, f, indent=1)
        with open(os.path.join(a.out, "results.md"), "w") as f:
            f.write(table + "\n")
    return 0 if all(not r.get("error") for r in results) else 1


def _machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "load_avg": os.getloadavg()}


if __name__ == "__main__":
    sys.exit(main())
