"""Samples and win rates during evaluation, for any task (the ``eval`` block:
``dpo_jax/eval_config.py``, read once by ``config.read_config`` into ``rc.eval``).

At evaluation points whose step is a multiple of ``eval.sample_every`` (and at the last step),
:class:`SampleEvaluator` draws one completion per held-out prompt from the current policy with
the run's KV-cache sampler (one jitted program, batch-sharded over the run's mesh), decodes it
and appends ``{"step", "model", "prompt", "completion", "reward"}`` rows to
``WORKDIR/samples.jsonl`` and the text to TensorBoard (``tb/samples``). The reference's
completions (the model the run starts from) are drawn once, at construction, and written at
step 0. The prompts are the eval split's training prompts (the same tokens). Returned metrics (the loop logs them as ``eval/...``):

* ``samples/length``: mean generated tokens per completion, through the first stop token
  (``eval.stop_ids``, by default the data's end tokens; nothing after it is counted or scored);
* ``samples/truncated``: the fraction of completions that ran to ``eval.max_new_tokens``
  without a stop token (each row of ``samples.jsonl`` says it too: ``"stopped": false``);
* ``samples/reward``, ``samples/reference_reward``: mean judge score of the policy's and the
  reference's completions (only with a judge);
* ``win_rate``, ``win_rate_se``: the fraction of prompts where the policy's completion scores
  above the reference's (ties count one half) and its standard error (only with a judge).

A judge is a reward function ``fn(samples) -> float32 [B]`` (``dpo_jax.ppo.rewards``):
``eval.judge='synthetic'`` (the synthetic task's true reward), a ``task='reward'`` run's workdir
(its Bradley-Terry model), or any function a caller passes as ``judge=`` (e.g. the IMDb
sentiment classifier through ``rewards.text_reward``). Nothing here reaches the network.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np

from dpo_jax import sharding as shard_lib
from dpo_jax.data.config import DataConfig
from dpo_jax.data.prompts import load_prompts
from dpo_jax.eval_config import EvalConfig, read_eval  # noqa: F401  (re-exported)
from dpo_jax.ppo import rewards
from dpo_jax.ppo.rewards import to_host
from dpo_jax.sampling import Samples, generate
from dpo_jax.data.tokenize import load_tokenizer


# ----------------------------------------------------------------------------- pure parts


def win_rate(policy_scores_N: np.ndarray, reference_scores_N: np.ndarray) -> tuple[float, float]:
    """``(rate, standard error)``: the mean over prompts of 1 (policy above reference), 1/2 (a
    tie) or 0, and ``std(ddof=1) / sqrt(N)`` of those outcomes (0 for one prompt).
    Raises ValueError for empty or mismatched score arrays."""
    p, r = np.asarray(policy_scores_N, np.float64), np.asarray(reference_scores_N, np.float64)
    if p.shape != r.shape or p.ndim != 1 or p.size == 0:
        raise ValueError(f"win_rate needs two equal non-empty [N] arrays, got {p.shape} and "
                         f"{r.shape}")
    outcome_N = np.where(p > r, 1.0, np.where(p == r, 0.5, 0.0))
    se = float(np.std(outcome_N, ddof=1) / np.sqrt(p.size)) if p.size > 1 else 0.0
    return float(outcome_N.mean()), se


def select_prompts(prompts: list[np.ndarray], n: int, seed: int) -> list[np.ndarray]:
    """``min(n, len(prompts))`` prompts drawn without replacement by ``seed`` (the same on every
    process and every run with that seed)."""
    order = np.random.default_rng(seed).permutation(len(prompts))[:n]
    return [np.asarray(prompts[int(i)], np.int32) for i in order]


def padded_prompts(prompts: list[np.ndarray], rows: int, pad_id: int):
    """``(ids [rows, P] int32, lengths [rows] int32)``, right-padded; rows past the prompts
    repeat prompt 0 (dropped after sampling)."""
    width = max(len(x) for x in prompts)
    ids = np.full((rows, width), pad_id, np.int32)
    lengths = np.zeros(rows, np.int32)
    for r in range(rows):
        x = prompts[r] if r < len(prompts) else prompts[0]
        ids[r, :len(x)], lengths[r] = x, len(x)
    return ids, lengths




def global_rows(x_np: np.ndarray, mesh) -> jax.Array:
    """A numpy array that every process holds whole, as a global array sharded by rows over the
    mesh's batch axes (rows must divide by their size)."""
    sharding = shard_lib.batch_sharding(mesh, x_np.ndim)
    return jax.make_array_from_callback(x_np.shape, sharding, lambda idx: x_np[idx])


def completions(samples: Samples, n: int) -> list[np.ndarray]:
    """The generated tokens (through the first stop token, included) of the first ``n`` rows,
    on the host."""
    tokens, mask = to_host(samples.tokens_BT), to_host(samples.completion_mask_BT)
    return [tokens[i][mask[i] > 0] for i in range(n)]


def token_decoder(data_cfg: DataConfig) -> Callable[[list[int]], str]:
    """Token ids -> text: the data's tokenizer, or space-separated ids for a tokenised source
    (the synthetic task) or data without a tokenizer."""
    if data_cfg.tokenised or not data_cfg.tokenizer:
        return lambda ids: " ".join(str(int(t)) for t in ids)
    tok = load_tokenizer(data_cfg.tokenizer)
    return lambda ids: tok.decode(list(ids), skip_special_tokens=True)


def build_judge(judge: str, data: DataConfig, mesh, mesh_rules, stop_ids, *,
                field: str = "eval.judge"):
    """The reward function ``judge`` names: '' -> None, a true reward's name
    (``rewards.TRUE_REWARDS``: 'synthetic', the synthetic task's, built from ``data``), else a
    ``task='reward'`` run's workdir (its model restored on ``mesh`` under ``mesh_rules``; a
    completion cut at the length bound is scored with ``stop_ids[0]`` appended). Raises
    ValueError naming ``field`` for anything else."""
    if not judge:
        return None
    if judge in rewards.TRUE_REWARDS:
        return rewards.TRUE_REWARDS[judge](data)
    if not os.path.exists(os.path.join(judge, "config.json")):
        raise ValueError(f"{field}={judge!r}: expected '', one of "
                         f"{sorted(rewards.TRUE_REWARDS)} or a task='reward' run's workdir (no "
                         "config.json there); pass any other judge as a function")
    return rewards.reward_model_from_run(judge, mesh, mesh_rules, stop_ids)


# ----------------------------------------------------------------------------- the evaluator


class SampleEvaluator:
    """Draws, scores, writes and summarises samples; see the module docstring.

    ``model`` is the decoder that samples (``Model``); ``params_of(state)`` its parameters in a
    task's state (default ``state.trainable``); ``reference_params`` those of the model the run
    starts from, sampled once here (before any update can donate them)."""

    def __init__(self, cfg: EvalConfig, *, workdir: str, model, mesh, prompts: list[np.ndarray],
                 reference_params, total_steps: int, decode: Callable[[list[int]], str],
                 judge: Callable[[Samples], jax.Array] | None = None,
                 params_of: Callable[[Any], Any] = lambda state: state.trainable):
        self.cfg, self.model, self.mesh, self.judge = cfg, model, mesh, judge
        self.decode, self.params_of, self.total_steps = decode, params_of, int(total_steps)
        self.path = os.path.join(workdir, "samples.jsonl")
        self.tb_dir = os.path.join(workdir, "tb", "samples")
        self.prompts = select_prompts(prompts, cfg.sample_prompts, cfg.seed)
        n, shards = len(self.prompts), shard_lib.num_batch_shards(mesh)
        ids, lengths = padded_prompts(self.prompts, -(-n // shards) * shards, cfg.sampling.pad_id)
        self._ids, self._lengths = global_rows(ids, mesh), global_rows(lengths, mesh)
        self._key = jax.random.key(cfg.seed)
        self._tb = None
        self.reference = self._draw(reference_params)

    def _draw(self, params) -> dict[str, Any]:
        samples = generate(self.model, params, self._ids, self._lengths, self._key,
                           self.cfg.sampling)
        n = len(self.prompts)
        out = {"completions": completions(samples, n),
               "lengths": to_host(samples.lengths_B)[:n].astype(np.float64),
               "stopped": to_host(samples.stopped_B)[:n].astype(bool)}
        out["scores"] = (to_host(self.judge(samples))[:n].astype(np.float64)
                         if self.judge is not None else None)
        return out

    def due(self, step: int) -> bool:
        return bool(self.cfg.sample_every) and (step % self.cfg.sample_every == 0
                                                or step == self.total_steps)

    def __call__(self, state) -> dict[str, float]:
        """Samples of ``state``'s policy: written, and their metrics returned."""
        step = int(jax.device_get(state.step))
        drawn = self._draw(self.params_of(state))
        metrics = {"samples/length": float(drawn["lengths"].mean()),
                   "samples/truncated": float(1.0 - drawn["stopped"].mean())}
        if drawn["scores"] is not None:
            metrics["samples/reward"] = float(drawn["scores"].mean())
            metrics["samples/reference_reward"] = float(self.reference["scores"].mean())
            metrics["win_rate"], metrics["win_rate_se"] = win_rate(drawn["scores"],
                                                                   self.reference["scores"])
        if jax.process_index() == 0:
            self._write(step, drawn)
        return metrics

    def _rows(self, step: int, model: str, drawn) -> list[dict[str, Any]]:
        rows = []
        for i, (prompt, completion) in enumerate(zip(self.prompts, drawn["completions"])):
            row = {"step": step, "model": model, "prompt": self.decode(prompt.tolist()),
                   "completion": self.decode(completion.tolist()),
                   "stopped": bool(drawn["stopped"][i])}
            if drawn["scores"] is not None:
                row["reward"] = float(drawn["scores"][i])
            rows.append(row)
        return rows

    def _write(self, step: int, drawn) -> None:
        """Append ``step``'s rows; the first write of a process keeps only rows of earlier
        steps (a resumed run rewrites what it redoes) and the reference's."""
        if self._tb is None:
            kept = []
            if os.path.exists(self.path):
                with open(self.path) as f:
                    kept = [json.loads(x) for x in f if x.strip()]
                kept = [r for r in kept if r["model"] == "policy" and r["step"] < step]
            kept = self._rows(0, "reference", self.reference) + kept
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(self.path + ".tmp", self.path)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.tb_dir, flush_secs=30)
            by_step: dict[tuple[str, int], list] = {}
            for r in kept:
                by_step.setdefault((r["model"], r["step"]), []).append(r)
            for (model, s), rows in by_step.items():
                self._tb.add_text(f"samples/{model}", _markdown(rows), s)
        rows = self._rows(step, "policy", drawn)
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        self._tb.add_text("samples/policy", _markdown(rows), step)
        self._tb.flush()

    def close(self) -> None:
        tb, self._tb = self._tb, None
        if tb is not None:
            tb.close()


def _markdown(rows: list[dict]) -> str:
    return "\n\n".join(f"**{r['prompt']}** -> {r['completion']}"
                       + ("" if r.get("stopped", True) else " [no stop token: max_new_tokens]")
                       + (f" (reward {r['reward']:.3f})" if "reward" in r else "") for r in rows)


def sample_evaluator(rc, *, workdir: str, model, mesh, reference_params,
                     prompts: list[np.ndarray] | None = None, judge=None,
                     params_of: Callable[[Any], Any] = lambda state: state.trainable
                     ) -> SampleEvaluator | None:
    """The run's :class:`SampleEvaluator` (``rc`` a ``config.RunConfig``: its ``eval``, ``data``,
    ``train.steps`` and ``mesh_rules``), or None when ``eval.sample_every`` is 0. Prompts
    default to the distinct prompts of the data's eval split; ``judge`` (a reward function)
    overrides ``eval.judge``."""
    cfg, data_cfg = rc.eval, rc.data
    if not cfg.sample_every:
        return None
    if prompts is None:
        prompts = load_prompts("eval", prompt_file="", eval_prompt_file="", max_prompts=0,
                               data_cfg=data_cfg)
    if judge is None:
        judge = build_judge(cfg.judge, data_cfg, mesh, rc.mesh_rules, cfg.sampling.stop_ids)
    return SampleEvaluator(cfg, workdir=workdir, model=model, mesh=mesh, prompts=prompts,
                           reference_params=reference_params, total_steps=rc.train.steps,
                           decode=token_decoder(data_cfg), judge=judge, params_of=params_of)


def with_samples(evaluate: Callable[[Any], dict] | None, sampler: SampleEvaluator | None
                 ) -> Callable[[Any], dict] | None:
    """``evaluate(state)`` followed, at sample points, by the sampler's metrics."""
    if sampler is None:
        return evaluate

    def run(state) -> dict[str, float]:
        metrics = dict(evaluate(state)) if evaluate is not None else {}
        step = int(jax.device_get(state.step))
        if sampler.due(step):
            metrics.update(sampler(state))
        return metrics

    return run
