"""``config.task='online_dpo'``: online and iterative DPO on the shared loop.

Offline DPO learns from pairs sampled once; here the pairs come from the policy being trained
(online AI feedback, Guo et al. 2024; iterative DPO, Xiong et al. 2024). One loop step:

1. a batch of ``B`` prompts (``train.batch_size``) from the prompt stream;
2. ``k = online.samples_per_prompt`` completions per prompt from the sampling policy with the
   KV-cache sampler (``dpo_jax.sampling.generate``: one jitted program, batch-sharded over the
   run's mesh, no host round trip per token);
3. each completion scored by the reward function (``online.reward`` or the task's
   ``reward_fn=``); per prompt the best-scored completion is chosen and the worst rejected; a
   prompt whose completions all score the same is a tie and its pair weighs 0 (dropped, the
   batch keeps its shape);
4. the ``B`` pairs batched in the pipeline's layout (``dpo_jax.data.batching``) and one DPO step
   with any loss of ``dpo_jax/losses`` against the fixed reference (``dpo_jax.step``).

``online.iterations = 0`` samples from the current policy at every step (online DPO);
``iterations = n >= 1`` splits ``train.steps`` into ``n`` rounds of equal length and samples
round ``r``'s pairs from the policy as it was when the round began (iterative DPO: new pairs
from the latest policy each round). That policy is saved once per round in
``WORKDIR/rounds/<r>``, so a run resumed mid-round samples from the same parameters.

Exact resume: the sampling key is ``fold_in(key(seed + 1), step)`` with ``step`` the
:class:`OnlineProgress` item of every checkpoint (with the cumulative pair counts); the prompt
stream's position is the ``data`` item.

Metrics per step, besides the DPO step's: ``online/reward`` (mean score of all samples),
``online/reward_chosen`` / ``online/reward_rejected``, ``online/length`` (mean completion
tokens, through the first stop token: ``online.stop_ids``, by default the data's end tokens),
``online/truncated`` (fraction of completions that ran to ``max_new_tokens`` without one), ``online/ties`` (fraction of prompts dropped as ties; ``online/ties_total`` since the
start), ``online/pair_tokens`` (real tokens of the step's pairs, prompt counted twice, ties
included: what the policy and reference forwards of the DPO step process), ``objective/kl`` (mean over samples of the summed ``log pi - log pi_ref`` of the sampled
tokens, from the sampler's log-probs and one reference forward; only when the loss reads a
reference) and ``online/round``. Evaluation: the DPO eval over the held-out preference pairs
(``rewards/accuracies``...) and, with ``eval.sample_every``, samples and ``eval/win_rate``
(``dpo_jax/evaluation.py``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpo_jax import batch_format
from dpo_jax import data as data_lib
from dpo_jax import evaluation
from dpo_jax import loop
from dpo_jax import losses as losses_lib
from dpo_jax import preference_data
from dpo_jax import sharding as shard_lib
from dpo_jax import state as state_lib
from dpo_jax.config import read_config
from dpo_jax.data import batching
from dpo_jax.data.prompts import PromptStream, load_prompts
from dpo_jax.models import Model
from dpo_jax.online_config import (OnlineConfig, default_online_config,  # noqa: F401
                                   read_online)
from dpo_jax.sampling import completion_kl, generate
from dpo_jax.step import make_eval_step, make_train_step
from dpo_jax.train_state import Frozen
from dpo_jax.workdir import RunDir, opens_workdir

SAMPLE_SEED_OFFSET = 1  # training samples use key(seed + 1) folded with the step


# ----------------------------------------------------------------------------- pairs


def preference_pairs(prompts: list[np.ndarray], completions: list[np.ndarray],
                     scores_N: np.ndarray, k: int):
    """Pairs from ``k`` scored completions per prompt (``completions`` and ``scores_N``
    prompt-major: completion ``j`` of prompt ``i`` at ``i * k + j``).

    Returns ``(pairs, pair_weight [B] float32, chosen_scores [B], rejected_scores [B])``: per
    prompt the first best-scored completion is chosen and the first worst-scored rejected;
    when all ``k`` score the same the prompt is a tie, its pair (completions 0 and 1) weighs 0.
    Raises ValueError when the counts disagree."""
    B = len(prompts)
    if len(completions) != B * k or np.size(scores_N) != B * k:
        raise ValueError(f"{len(completions)} completions and {np.size(scores_N)} scores for "
                         f"{B} prompts x {k} samples")
    scores_BK = np.asarray(scores_N, np.float64).reshape(B, k)
    pairs, weight = [], np.ones(B, np.float32)
    best, worst = np.argmax(scores_BK, axis=1), np.argmin(scores_BK, axis=1)
    for i in range(B):
        hi, lo = int(best[i]), int(worst[i])
        if scores_BK[i, hi] == scores_BK[i, lo]:
            hi, lo, weight[i] = 0, 1, 0.0
        pairs.append({"prompt": np.asarray(prompts[i], np.int32),
                      "chosen": np.asarray(completions[i * k + hi], np.int32),
                      "rejected": np.asarray(completions[i * k + lo], np.int32)})
    return (pairs, weight, scores_BK[np.arange(B), best].astype(np.float32),
            scores_BK[np.arange(B), worst].astype(np.float32))


def pair_tokens(pairs) -> int:
    """Real tokens the DPO step's forwards run over ``pairs`` (dicts of token arrays
    ``prompt``, ``chosen``, ``rejected``): the prompt once before each response."""
    return sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)


def pair_batch(pairs, pair_weight_B: np.ndarray, length: int, pad_id: int,
               process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's block of the global batch of ``pairs`` in the pipeline's layout
    (ARCHITECTURE.md, unpacked rows of ``length`` tokens: chosen rows, then rejected)."""
    seqs = batching.sequences(pairs)
    plan = batching.plan_unpacked(np.asarray([len(t) for t, _ in seqs]), [length])
    rows = plan.rows // process_count
    start, stop = process_index * rows, (process_index + 1) * rows
    batch = batching.materialise(plan, dict(enumerate(seqs)), start, stop, pad_id)
    B = len(pairs) // process_count
    batch["pair_weight"] = pair_weight_B[process_index * B:(process_index + 1) * B]
    return batch


# ----------------------------------------------------------------------------- host state


class OnlineProgress:
    """Host state saved with every checkpoint (item ``online``): the step that keys the
    sampler, and the pairs formed and dropped as ties so far."""

    def __init__(self):
        self.step, self.pairs, self.ties = 0, 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "pairs": self.pairs, "ties": self.ties}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step, self.pairs, self.ties = int(state["step"]), int(state["pairs"]), int(state["ties"])


class RoundPolicy:
    """Iterative DPO's sampling policy: the parameters at the start of the current round,
    copied there and written to ``directory/<round>`` (read back when a run resumes mid-round)."""

    def __init__(self, directory: str, steps_per_round: int, shardings):
        self.directory, self.steps_per_round = os.path.abspath(directory), steps_per_round
        self.round, self.params = -1, None
        self._copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)
        self._shardings = shardings

    def params_at(self, state, step: int):
        """The sampling parameters for ``step`` (0-based), given the state before that step."""
        import orbax.checkpoint as ocp

        r = step // self.steps_per_round
        if r != self.round or self.params is None:
            path = os.path.join(self.directory, str(r))
            checkpointer = ocp.StandardCheckpointer()
            if step % self.steps_per_round == 0:
                self.params = self._copy(state.trainable)
                checkpointer.save(path, self.params, force=True)
                checkpointer.wait_until_finished()
            else:
                self.params = checkpointer.restore(
                    path, state_lib.abstract(state.trainable, self._shardings))
            checkpointer.close()
            self.round = r
        return self.params


# ----------------------------------------------------------------------------- the task


@opens_workdir
def train_and_evaluate(config: ml_collections.ConfigDict, run: RunDir, *, reward_fn=None,
                       interrupt_after: int | None = None) -> dict[str, Any]:
    """Train an online (or iterative) DPO run; called as ``train_and_evaluate(config,
    workdir)``, returns its summary. ``reward_fn(samples) -> float32 [N]`` replaces
    ``online.reward`` (e.g. an experiment's text classifier through
    ``dpo_jax.ppo.rewards.text_reward``). Raises ValueError for a precomputed reference (the
    pairs are new every step) and for the settings :func:`read_online` refuses."""
    rc = read_config(config)
    oc: OnlineConfig = rc.task_block
    loss_cfg = rc.loss
    if rc.precompute_reference:
        raise ValueError("task 'online_dpo' samples new pairs every step, so their reference "
                         "log-probs cannot be precomputed; set logprobs.precompute_reference="
                         "False")
    model = Model(rc.model)
    needs_ref = losses_lib.needs_reference(loss_cfg)
    setup = state_lib.setup(rc, model, reference=needs_ref)
    mesh, reference = setup.mesh, Frozen.tree_of(setup.frozen)
    reward_fn = reward_fn or evaluation.build_judge(oc.reward, rc.data, mesh, rc.mesh_rules,
                                                    oc.sampling.stop_ids, field="online.reward")
    # the eval samples are judged by the reward the run trains on, unless eval.judge names one
    samples_eval = evaluation.sample_evaluator(
        rc, workdir=run.path, model=model, mesh=mesh,
        reference_params=setup.trainable if reference is None else reference,
        judge=None if rc.eval.judge else reward_fn)
    state = setup.initial_state()

    prompts = load_prompts("train", prompt_file=oc.prompt_file, eval_prompt_file="",
                           max_prompts=oc.max_prompts, data_cfg=rc.data)
    width = oc.prompt_width or max(len(x) for x in prompts)
    train_data = PromptStream(prompts, train=True, global_batch_size=rc.train.batch_size,
                              width=width, seed=rc.seed, pad_id=oc.sampling.pad_id,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
    eval_data = (preference_data.preference_streams(rc, ("eval",), model_cfg=model.cfg,
                                                    mesh=mesh)
                 if rc.train.eval_every else {})
    length = batching.round_up(width + oc.sampling.max_new_tokens, 8)
    if model.cfg.position == "learned" and length > model.cfg.max_len:
        length = width + oc.sampling.max_new_tokens  # generate refuses anything longer

    k, cfg = oc.samples_per_prompt, oc.sampling
    scored_only = rc.step.logprobs.scored_only
    train_step = loop.host_step(loop.jit_train_step(
        make_train_step(model, loss_cfg, setup.tx, setup.schedule, rc.step,
                        rc.train.on_nonfinite, fmt=batch_format.BatchFormat("pairs")), state),
        mesh, scored_only)

    @jax.jit
    def sample(params, ids_BP, lengths_B, rng):
        ids, lengths = jnp.repeat(ids_BP, k, axis=0), jnp.repeat(lengths_B, k, axis=0)
        return generate(model, params, ids, lengths, rng, cfg), lengths

    sequence_kl = jax.jit(lambda ref, samples, lengths_N: jnp.mean(
        completion_kl(model, ref, samples, lengths_N)))

    progress = OnlineProgress()
    rounds = (RoundPolicy(run.file("rounds"), rc.train.steps // oc.iterations, setup.shardings)
              if oc.iterations else None)
    key = jax.random.key(rc.seed + SAMPLE_SEED_OFFSET)

    def step_fn(state, prompts_np):
        t0 = time.time()
        step = progress.step
        policy = rounds.params_at(state, step) if rounds else state.trainable
        prompts_dev = data_lib.to_global(prompts_np, shard_lib.batch_shardings(prompts_np, mesh))
        samples, lengths_N = sample(policy, prompts_dev["prompt_ids"],
                                    prompts_dev["prompt_lengths"], jax.random.fold_in(key, step))
        scores_N = evaluation.to_host(reward_fn(samples))
        host_prompts = evaluation.to_host(prompts_dev["prompt_ids"])
        host_lengths = evaluation.to_host(prompts_dev["prompt_lengths"])
        prompt_list = [host_prompts[i, :host_lengths[i]] for i in range(len(host_lengths))]
        pairs, weight_B, chosen_B, rejected_B = preference_pairs(
            prompt_list, evaluation.completions(samples, len(scores_N)), scores_N, k)
        batch = pair_batch(pairs, weight_B, length, cfg.pad_id, jax.process_index(),
                           jax.process_count())
        ties = int(np.sum(weight_B == 0))
        metrics = {"online/reward": float(np.mean(scores_N)),
                   "online/pair_tokens": float(pair_tokens(pairs)),
                   "online/reward_chosen": float(np.mean(chosen_B)),
                   "online/reward_rejected": float(np.mean(rejected_B)),
                   "online/length": float(np.mean(evaluation.to_host(samples.lengths_B))),
                   "online/truncated": float(1.0 - np.mean(evaluation.to_host(samples.stopped_B))),
                   "online/ties": ties / len(weight_B),
                   "online/round": float(step // (rc.train.steps // oc.iterations)
                                         if oc.iterations else 0)}
        if state.frozen is not None:
            metrics["objective/kl"] = sequence_kl(state.frozen.reference, samples, lengths_N)
        state, step_metrics = train_step(state, batch)
        progress.step += 1
        progress.pairs += len(weight_B) - ties
        progress.ties += ties
        metrics["online/ties_total"] = float(progress.ties)
        metrics["iteration_s"] = time.time() - t0
        return state, {**step_metrics, **metrics}

    eval_step = make_eval_step(model, loss_cfg, rc.step, fmt=batch_format.for_run(rc.data))
    evaluate = loop.evaluator(lambda s, b, n: eval_step(s.trainable, s.frozen, b, n),
                              eval_data.get("eval"), mesh, scored_only)
    return loop.train(
        run, state, cfg=rc.train, mesh=mesh, step_fn=step_fn, train_data=train_data,
        evaluate=evaluation.with_samples(evaluate, samples_eval),
        host_states={"online": progress},
        count_tokens=lambda b: b["prompt_ids"].size * k + b["prompt_ids"].shape[0] * k
        * cfg.max_new_tokens,
        report=lambda: {"online": progress.state_dict(),
                        "data": {"train": train_data.stats,
                                 **{s: p.stats for s, p in eval_data.items()}}},
        interrupt_after=interrupt_after)
