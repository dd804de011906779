"""Sampling and the frontier evaluation of the IMDb pipeline, and what each run cost.

Why saved checkpoints rather than an eval hook in the training loop: a frontier point needs
samples, ground-truth rewards and a reference forward, none of which belong in a training step;
evaluating the checkpoints every run saves (every ``imdb.eval_every`` steps) gives the same
points, and a rerun recomputes none of them.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.data.io import read_jsonl, write_jsonl
from dpo_jax.proj.imdb import frontier as frontier_lib
from dpo_jax.proj.imdb.experiment import Experiment
from dpo_jax.proj.imdb.kl import kl_estimate
from dpo_jax.proj.imdb.text import clean_review
from dpo_jax.sampling import Samples, SamplingConfig, generate, sequence_mask
from dpo_jax.metrics import WandbSink


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020; exact for distinct
    rewards), the x-coordinate of a Best-of-N point."""
    return math.log(n) - (n - 1) / n


def sample(exp: Experiment, params, prompts: list[dict], k: int, rng: jax.Array,
           ref_params=None) -> list[dict]:
    """``k`` completions per prompt row (``prompt``, ``prompt_ids``), ``k`` consecutive rows per
    prompt: text, token ids (EOS dropped), ground-truth ``reward``, the summed policy log-prob
    ``policy_logp`` and, with ``ref_params``, the reference's ``ref_logp`` of the completion
    and ``completion_tokens``, the tokens it sums over (the completion with its EOS, if any).
    Batches have the fixed shape [imdb.sample_batch, imdb.max_prefix_tokens]: one compile."""
    c, tok = exp.imdb, exp.tokenizer
    eos = int(tok.eos_token_id)
    cfg = SamplingConfig(max_new_tokens=int(c.max_new_tokens), temperature=float(c.temperature),
                         stop_ids=(eos,), pad_id=eos)
    rows = [p for p in prompts for _ in range(k)]
    B, P = int(c.sample_batch), int(c.max_prefix_tokens)
    out = []
    for start in range(0, len(rows), B):
        chunk = rows[start:start + B]
        ids_BP = np.zeros((B, P), np.int32)
        lens_B = np.ones((B,), np.int32)
        for i, r in enumerate(chunk):
            ids_BP[i, :len(r["prompt_ids"])] = r["prompt_ids"]
            lens_B[i] = len(r["prompt_ids"])
        s = generate(exp.model, params, ids_BP, lens_B, jax.random.fold_in(rng, start), cfg)
        mask_BT, tokens_BT = np.asarray(s.completion_mask_BT), np.asarray(s.tokens_BT)
        policy_B = np.asarray(s.logps_BT).sum(1)
        if ref_params is not None:
            seg_BT = sequence_mask(s, jnp.asarray(lens_B))
            ref_B = np.asarray(exp.score(ref_params, s.tokens_BT, seg_BT)
                               * s.completion_mask_BT).sum(1)
        for i, r in enumerate(chunk):
            comp = [int(t) for t, m in zip(tokens_BT[i], mask_BT[i]) if m > 0 and t != eos]
            row = {"prompt": r["prompt"], "prompt_ids": list(r["prompt_ids"]),
                   "completion": tok.decode(comp), "completion_ids": comp,
                   "policy_logp": float(policy_B[i])}
            if ref_params is not None:
                row["ref_logp"] = float(ref_B[i])
                row["completion_tokens"] = int(mask_BT[i].sum())
            out.append(row)
    rewards = exp.reward([r["prompt"] for r in out], [r["completion"] for r in out])
    for r, v in zip(out, rewards):
        r["reward"] = float(v)
    return out


def proxy_scores(exp: Experiment, rows: list[dict]) -> np.ndarray:
    """The learned reward model's scores [len(rows)] of sampled rows, through the reward
    function PPO optimised (``exp.proxy_reward``), to set PPO's proxy against the ground
    truth."""
    eos = int(exp.tokenizer.eos_token_id)
    T = int(exp.imdb.max_prefix_tokens) + int(exp.imdb.max_new_tokens) + 1
    B = int(exp.imdb.sample_batch)
    out = []
    for start in range(0, len(rows), B):
        chunk = rows[start:start + B]
        ids_BT = np.full((B, T), eos, np.int32)
        mask_BT = np.zeros((B, T), np.float32)
        mask_BT[len(chunk):, 0] = 1  # filler rows: any valid position
        for i, r in enumerate(chunk):
            # completion_ids hold no EOS (the sampler's, if any, was dropped): restore it
            seq = list(r["prompt_ids"]) + list(r["completion_ids"]) + [eos]
            ids_BT[i, :len(seq)] = seq
            mask_BT[i, len(r["prompt_ids"]):len(seq)] = 1
        samples = Samples(tokens_BT=jnp.asarray(ids_BT), completion_mask_BT=jnp.asarray(mask_BT),
                          logps_BT=jnp.zeros((B, T)), lengths_B=jnp.zeros((B,), jnp.int32))
        out.append(np.asarray(exp.proxy_reward(samples))[:len(chunk)])
    return np.concatenate(out)


def sft_perplexity(logps: np.ndarray, tokens: np.ndarray) -> float:
    """Token-level perplexity ``exp(-sum(logps) / sum(tokens))`` of texts whose summed log-probs
    under the SFT model are ``logps`` [N] (nats) over ``tokens`` [N] tokens each: the fluency
    measure of samples (and of real reviews' continuations, :func:`real_fluency`) as text the
    SFT model finds likely. Raises ValueError when no token is scored."""
    n = float(np.sum(tokens))
    if n <= 0:
        raise ValueError("sft_perplexity: no scored token")
    return float(np.exp(-np.sum(logps, dtype=np.float64) / n))


def point(method: str, setting: str, step: int, rows: list[dict]) -> dict:
    """One frontier point from sampled rows: Monte-Carlo sequence KL(pi || pi_SFT) and mean
    ground-truth reward, each with its standard error, and ``sft_ppl``, the samples'
    perplexity under the SFT model (:func:`sft_perplexity`, their fluency)."""
    ref = np.array([r["ref_logp"] for r in rows])
    kl = kl_estimate(np.array([r["policy_logp"] for r in rows]), ref)
    rewards = np.array([r["reward"] for r in rows])
    return {"method": method, "setting": setting, "step": int(step), "kl": kl.mean,
            "kl_stderr": kl.stderr, "mean_reward": float(rewards.mean()),
            "reward_stderr": float(rewards.std(ddof=1) / math.sqrt(len(rows))),
            "sft_ppl": sft_perplexity(ref, np.array([r["completion_tokens"] for r in rows]))}


def continuations(exp: Experiment, prompts: list[dict], n: int) -> list[dict]:
    """For each test prefix row (``source`` = ``test:i``, the i-th test review), the review's own
    next ``n`` tokens after the prefix, EOS appended when the review ends within them:
    ``{"prompt_ids", "completion_ids"}`` (ids include that EOS). Rows whose review does not
    re-tokenize to the same prefix ids, or that have no continuation, are left out."""
    texts = exp.texts("test", exp.imdb.max_test_reviews)
    eos = int(exp.tokenizer.eos_token_id)
    out = []
    for p in prompts:
        split, idx = p["source"].split(":")
        if split != "test":
            raise ValueError(f"continuations: prefix row {p['source']!r} is not a test review")
        ids = exp.tokenizer.encode(clean_review(texts[int(idx)]), add_special_tokens=False)
        P = len(p["prompt_ids"])
        if [int(t) for t in ids[:P]] != [int(t) for t in p["prompt_ids"]] or len(ids) == P:
            continue
        cont = [int(t) for t in ids[P:P + n]] + ([eos] if len(ids) <= P + n else [])
        out.append({"prompt_ids": list(p["prompt_ids"]), "completion_ids": cont[:n]})
    return out


def real_fluency(exp: Experiment, params, prompts: list[dict]) -> dict:
    """The perplexity under the SFT model (``params``) of the real test reviews' continuations
    of the frontier's prefixes, ``imdb.max_new_tokens`` tokens each: the fluency the samples'
    ``sft_ppl`` is read against. ``{"sft_ppl", "rows", "tokens"}``."""
    rows = continuations(exp, prompts, int(exp.imdb.max_new_tokens))
    T = int(exp.imdb.max_prefix_tokens) + int(exp.imdb.max_new_tokens)
    B, logps, tokens = int(exp.imdb.sample_batch), [], []
    for start in range(0, len(rows), B):
        chunk = rows[start:start + B]
        ids_BT = np.zeros((B, T), np.int32)
        seg_BT = np.zeros((B, T), np.int32)
        mask_BT = np.zeros((B, T), np.float32)
        for i, r in enumerate(chunk):
            seq = r["prompt_ids"] + r["completion_ids"]
            ids_BT[i, :len(seq)] = seq
            seg_BT[i, :len(seq)] = 1
            mask_BT[i, len(r["prompt_ids"]):len(seq)] = 1
        lp_BT = np.asarray(exp.score(params, jnp.asarray(ids_BT), jnp.asarray(seg_BT)))
        logps.append((lp_BT * mask_BT).sum(1)[:len(chunk)])
        tokens.append(mask_BT.sum(1)[:len(chunk)])
    logps_N, tokens_N = np.concatenate(logps), np.concatenate(tokens)
    return {"sft_ppl": sft_perplexity(logps_N, tokens_N), "rows": len(rows),
            "tokens": int(tokens_N.sum())}


def frontier_points(exp: Experiment, name: str, method: str, setting: str) -> None:
    """``runs/NAME/frontier_points.jsonl``: one point per saved checkpoint of run ``name`` on the
    held-out test prefixes (PPO points also carry ``proxy_reward``, the learned reward model's
    mean score, when the pipeline trained one), and the last checkpoint's samples in
    ``runs/NAME/test_samples.jsonl``."""
    run_dir = exp.workdir / "runs" / name
    ref = exp.restore(exp.workdir / "sft")
    prompts = read_jsonl(exp.workdir / "prefixes_test.jsonl")
    ppo = method.startswith("ppo")
    points, rows = [], []
    for step in exp.checkpoint_steps(run_dir):
        params = exp.restore(run_dir, step, head=ppo)
        if ppo:
            params = params["decoder"]
        rows = sample(exp, params, prompts, int(exp.imdb.eval_samples_per_prefix),
                      jax.random.key(1000 + step), ref_params=ref)
        points.append(point(method, setting, step, rows))
        if ppo and (exp.workdir / "reward_model" / "summary.json").exists():
            proxy = proxy_scores(exp, rows)
            for r, v in zip(rows, proxy):
                r["proxy_reward"] = float(v)
            points[-1]["proxy_reward"] = float(proxy.mean())
    write_jsonl(rows, run_dir / "test_samples.jsonl")
    write_jsonl(points, run_dir / "frontier_points.jsonl")


def sft_and_best_of_n(exp: Experiment) -> None:
    """``sft_frontier_points.jsonl``: SFT's own point (KL 0 up to Monte-Carlo noise) and
    Best-of-n of its samples for n in ``imdb.best_of_n``; one sample per prefix in
    ``sft_test_samples.jsonl``; ``real_fluency.json``: the perplexity of the real reviews'
    continuations under SFT (:func:`real_fluency`)."""
    ref = exp.restore(exp.workdir / "sft")
    prompts = read_jsonl(exp.workdir / "prefixes_test.jsonl")
    k = max([int(exp.imdb.eval_samples_per_prefix)] + [int(n) for n in exp.imdb.best_of_n])
    rows = sample(exp, ref, prompts, k, jax.random.key(999), ref_params=ref)
    points = [point("sft", "", 0, rows)]
    rewards_NK = np.array([r["reward"] for r in rows]).reshape(len(prompts), k)
    ref_NK = np.array([r["ref_logp"] for r in rows]).reshape(len(prompts), k)
    tokens_NK = np.array([r["completion_tokens"] for r in rows]).reshape(len(prompts), k)
    for n in exp.imdb.best_of_n:
        pick_N = rewards_NK[:, :int(n)].argmax(axis=1)
        best_N = np.take_along_axis(rewards_NK, pick_N[:, None], 1)[:, 0]
        points.append({"method": "best_of_n", "setting": f"n={int(n)}", "step": 0,
                       "kl": best_of_n_kl(int(n)), "kl_stderr": 0.0,
                       "mean_reward": float(best_N.mean()),
                       "reward_stderr": float(best_N.std(ddof=1) / math.sqrt(len(best_N))),
                       "sft_ppl": sft_perplexity(
                           np.take_along_axis(ref_NK, pick_N[:, None], 1),
                           np.take_along_axis(tokens_NK, pick_N[:, None], 1))})
    write_jsonl(rows[::k], exp.workdir / "sft_test_samples.jsonl")
    fluency = exp.workdir / "real_fluency.json.tmp"
    fluency.write_text(json.dumps(real_fluency(exp, ref, prompts), indent=2))
    fluency.replace(exp.workdir / "real_fluency.json")
    write_jsonl(points, exp.workdir / "sft_frontier_points.jsonl")


def write_frontier(exp: Experiment, names: list[str]) -> list[dict]:
    """``frontier.csv`` and ``frontier.png`` from SFT's points and those of runs ``names``;
    returns the points as the CSV holds them."""
    points = read_jsonl(exp.workdir / "sft_frontier_points.jsonl")
    for name in names:
        points += read_jsonl(exp.workdir / "runs" / name / "frontier_points.jsonl")
    frontier_lib.write_frontier(points, exp.workdir, kl_max=float(exp.imdb.plot_kl_max) or None)
    return [dict(p.__dict__) for p in frontier_lib.read_frontier_csv(exp.workdir / "frontier.csv")]


def log_frontier_to_wandb(config, workdir: pathlib.Path) -> bool:
    """When ``config.log.wandb_project`` is set: ``workdir/frontier.png`` as the image
    ``imdb/frontier`` of the pipeline's own W&B run (each training run streams its metrics to
    its own), from process 0 only. Returns whether it logged."""
    log = config.get("log") or {}
    if not log.get("wandb_project") or jax.process_index() != 0:
        return False
    sink = WandbSink(str(workdir), log.wandb_project, entity=log.get("wandb_entity", ""),
                     name=log.get("wandb_name", ""), config=config.to_dict())
    try:
        sink.log_image("imdb/frontier", str(workdir / "frontier.png"))
    finally:
        sink.close()
    return True


def _run_cost(run_dir: pathlib.Path, method: str, cfg, summary: dict) -> dict:
    """Optimizer steps and tokens of one finished run (see :func:`write_compute`)."""
    steps, B = int(summary["steps"]), int(cfg.train.batch_size)
    if method.startswith("ppo"):
        recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "rollout/tokens" in r]
        scale = steps / max(len(recs), 1)  # log_every > 1: extrapolate the logged mean
        seq = sum(r["rollout/tokens"] for r in recs) * scale
        return dict(steps=steps,
                    sampled_tokens=round(sum(r["completion/length"] for r in recs) * B * scale),
                    forward_tokens=round(2 * seq),  # rollout-time policy and reference
                    trained_tokens=round(seq * int(cfg.ppo.epochs)),
                    depends_on=["sft"] + (["samples", "pairs", "reward_model"]
                                          if method == "ppo" else []))
    if method in ("online_dpo", "iterative_dpo"):
        recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "online/pair_tokens" in r]
        scale = steps / max(len(recs), 1)  # each record: the mean over its log window
        k, P = int(cfg.online.samples_per_prompt), int(cfg.online.prompt_width)
        sampled = sum(r["online/length"] for r in recs) * B * k * scale
        pair = sum(r["online/pair_tokens"] for r in recs) * scale
        return dict(steps=steps, sampled_tokens=round(sampled), trained_tokens=round(pair),
                    # the DPO loss's reference forward over the pairs, and the reference
                    # forward over every sample (padded prompt + completion) for objective/kl
                    forward_tokens=round(pair + sampled + steps * B * k * P),
                    depends_on=["sft"])
    data = summary["data"]["train"]  # the train stream's stats
    if "lengths" in data:  # preference batches: prompt + chosen + rejected
        L = data["lengths"]
        p, c, r = (L[k]["mean"] for k in ("prompt", "chosen", "rejected"))
        per_pair = p + c if method == "preferred_ft" else 2 * p + c + r
    else:  # text examples (Preferred-FT: prompt + chosen)
        per_pair = data["tokens"] / max(int(data["examples"]), 1)
    return dict(steps=steps, sampled_tokens=0, trained_tokens=round(steps * B * per_pair),
                forward_tokens=round(steps * B * per_pair) if method == "dpo" else 0,
                depends_on=["sft", "samples", "pairs"])


def write_compute(exp: Experiment, variants: dict, stage_seconds: dict[str, float]) -> dict:
    """``compute.json``: what each finished run of ``variants`` (name -> (method, setting,
    config)) cost to train: wall seconds of its training stage, optimizer steps, tokens through
    the policy with gradient, no-grad forward tokens, tokens sampled during training, and the
    stages it depends on, with those stages' wall seconds. Frontier evaluation is reported
    apart (the same for every method)."""
    runs = {}
    for name, (method, setting, cfg) in variants.items():
        run_dir = exp.workdir / "runs" / name
        if not (run_dir / "summary.json").exists():
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        runs[name] = {"method": method, "setting": setting,
                      "train_wall_s": stage_seconds.get(f"train:{name}", summary.get("wall_s")),
                      "frontier_eval_s": stage_seconds.get(f"frontier:{name}"),
                      **_run_cost(run_dir, method, cfg, summary)}
    shared = {k: stage_seconds.get(k) for k in ("tokenizer", "reward", "sft_data", "sft",
                                                "samples", "pairs", "reward_model")}
    out = {"stages": shared, "runs": runs,
           "note": "wall seconds on this machine; trained_tokens = real (unpadded) tokens "
                   "through the policy with gradient (DPO: from mean pair lengths); "
                   "forward_tokens = no-grad forwards (DPO reference; PPO rollout-time "
                   "policy + reference); sampled_tokens = tokens generated during training"}
    tmp = exp.workdir / "compute.json.tmp"
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(exp.workdir / "compute.json")
    return out
