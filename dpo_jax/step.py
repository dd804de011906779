"""The DPO training and evaluation steps: pure functions of (state, batch).

One policy forward runs chosen and rejected rows together (the reference implementation's
``concatenated_forward``); the reference forward runs under ``stop_gradient`` on a frozen second
parameter tree. Gradient accumulation splits the pairs into equal strided micro-batches inside
the jitted step and sums exactly-normalised gradients, so the update equals the big batch's.

Batch layout (see ARCHITECTURE.md): rows of the *global* batch are ``[chosen_0..B-1,
rejected_0..B-1]``; each host holds a contiguous block of those rows.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from dpo_jax import eval_metrics
from dpo_jax import losses as losses_lib
from dpo_jax import lora as lora_lib
from dpo_jax.logprobs import scored_counts, sequence_logps
from dpo_jax.optim import apply_gradients
from dpo_jax.state import TrainState
from dpo_jax.step_config import StepConfig  # noqa: F401  (re-exported: step.StepConfig)


def sequence_stats(model, params, batch, cfg: StepConfig, max_scored, forward_only=False,
                   loss_cfg: losses_lib.LossConfig | None = None, with_wpo=False,
                   router_aux=False):
    """Per-sequence (logps, lengths), each ``[2B]`` in block layout, and with ``with_wpo`` a
    third: WPO's per-token mean aligned log-prob. forward_only (no gradient will be taken)
    evaluates the head with ``cfg.forward_logprobs``. ``loss_cfg.ld_alpha`` (LD-DPO) weights
    the tokens past the shorter response of each pair. router_aux (mixture-of-experts models):
    ``(those, the router's load-balancing loss of this forward)``."""
    # prefix-shared rows (data.prefix_sharing) carry branch ids: the mask is derived from them
    branch = {} if "branch_ids" not in batch else {"branch_ids_BL": batch["branch_ids"]}
    aux = {"router_aux": True} if router_aux else {}
    h = model.hidden(params, batch["input_ids"], batch["positions"], batch["segment_ids"],
                     **branch, **aux)
    h, aux = h if router_aux else (h, None)
    w, b = model.unembedding(params, caller_applies_softcap=True)
    seq_index = batch.get("seq_index")
    num_seqs = None if seq_index is None else _num_slots(batch) * batch["pair_weight"].shape[0]
    ld = {}
    if loss_cfg is not None and loss_cfg.ld_alpha is not None:
        chosen, rejected = _pairs(scored_counts(batch["loss_mask"], seq_index, num_seqs))
        shared = jnp.minimum(chosen, rejected)
        ld = dict(ld_shared_S=jnp.concatenate([shared, shared]), ld_alpha=loss_cfg.ld_alpha)
    out = sequence_logps(
        h, batch["input_ids"], batch["loss_mask"], w, b,
        cfg.forward_logprobs if forward_only else cfg.logprobs,
        max_scored=max_scored, seq_index_RL=seq_index, num_seqs=num_seqs, with_wpo=with_wpo,
        softcap=model.cfg.final_logit_softcap, **ld,
    )
    if with_wpo:
        logps, lengths, wpo_sums = out
        out = logps, lengths, wpo_sums / jnp.maximum(lengths, 1.0)
    return (out, aux) if router_aux else out


def _pairs(x_S):
    chosen, rejected = jnp.split(x_S, 2)
    return chosen, rejected


# Per-example arrays of a batch (leading axis B); every other array is laid out slot-major
# over the K response slots (rows, or [K B] stored reference log-probs).
_PER_EXAMPLE_KEYS = ("pair_weight", "slot_rank", "desirable")


def _num_slots(batch) -> int:
    """K, the response slots per example: a ranked batch's ``slot_rank`` [B, K] gives it; a pair
    (or an unpaired example: its completion and its mismatched KL completion) has 2."""
    return batch["slot_rank"].shape[1] if "slot_rank" in batch else 2


def _slots(x_S, K: int):
    """``[K B]`` slot-major per-sequence values -> ``[B, K]`` (K = 2: the columns of _pairs)."""
    return x_S.reshape(K, -1).T


def _reference_or_own(own, reference, at_start):
    """``reference`` (a thunk computing it, or arrays) except at the start, where the policy's
    own statistics ``own`` stand for it (see ``StepConfig.reference_is_initial_policy``); no
    gradient flows through either. ``at_start``: a traced bool, or None (never the start)."""
    own = jax.lax.stop_gradient(own)
    if at_start is None:
        return jax.lax.stop_gradient(reference() if callable(reference) else reference)
    if callable(reference):  # skip the reference forward at the start
        return jax.lax.stop_gradient(jax.lax.cond(at_start, lambda: own, reference))
    return jax.tree.map(lambda a, b: jnp.where(at_start, a, b), own,
                        jax.lax.stop_gradient(reference))


def ranked_terms(model, loss_cfg, params, ref_params, batch, cfg: StepConfig, max_scored,
                 policy_forward_only=False, at_start=None):
    """``pair_terms`` for ranked lists (``slot_rank`` [B, K] in the batch; -1 = empty slot):
    the K responses of each prompt in one forward, ``losses.listwise_loss`` over ``[B, K]``.
    LD-DPO, WPO and stored reference log-probs read pairs only (ValueError)."""
    if loss_cfg.ld_alpha is not None or loss_cfg.use_weighting or "ref_logps" in batch:
        raise ValueError("ranked lists: loss.ld_alpha, loss.use_weighting and "
                         "logprobs.precompute_reference are for pairs; unset them")
    K, rank_BK = _num_slots(batch), batch["slot_rank"]
    mask_BK = (rank_BK >= 0).astype(jnp.float32)
    logps, lengths = sequence_stats(model, params, batch, cfg, max_scored,
                                    forward_only=policy_forward_only)
    ref_logps = jnp.zeros_like(logps)
    if ref_params is not None:
        ref_logps = _reference_or_own(logps, lambda: sequence_stats(
            model, ref_params, batch, cfg, max_scored, forward_only=True)[0], at_start)
    out = losses_lib.listwise_loss(loss_cfg, _slots(logps, K), _slots(ref_logps, K), mask_BK,
                                   rank_BK, batch["pair_weight"])
    return losses_lib.ranked_stats(_slots(logps, K), _slots(lengths, K), mask_BK), out


def _stats(logps, lengths, wpo_logps=None) -> losses_lib.SequenceStats:
    chosen_logps, rejected_logps = _pairs(logps)
    chosen_lengths, rejected_lengths = _pairs(lengths)
    chosen_wpo, rejected_wpo = (None, None) if wpo_logps is None else _pairs(wpo_logps)
    return losses_lib.SequenceStats(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        chosen_wpo_logps=chosen_wpo, rejected_wpo_logps=rejected_wpo,
    )


def pair_terms(model, loss_cfg, params, ref_params, batch, cfg: StepConfig, max_scored,
               policy_forward_only=False, key=None, at_start=None):
    """Policy/reference statistics and the loss output for one (micro-)batch.

    LD-DPO (``loss_cfg.ld_alpha``) weights both models' log-probs, so it refuses stored
    reference log-probs (``ref_logps`` in the batch, plain sums); WPO reads the policy only.
    Ranked lists (``slot_rank`` in the batch) go to :func:`ranked_terms`; unpaired examples
    (``desirable`` [B] in the batch: chosen = the completion, rejected = its mismatched KL
    completion) to ``losses.kto_loss``. ``at_start`` (a traced bool; None = never): the step
    is the run's first and the reference is the initial policy
    (``StepConfig.reference_is_initial_policy``), so the policy's log-probs are the
    reference's."""
    # LoRA (dpo_jax/lora.py): params are adapters over the frozen base ref_params, which with
    # the adapters off is the reference (key: the adapters' dropout key, None = no dropout)
    params = lora_lib.join(ref_params, params, key)
    if not losses_lib.needs_reference(loss_cfg):
        ref_params = None
    router_aux = loss_cfg.router_aux_loss_coef > 0
    if router_aux and ("slot_rank" in batch or "desirable" in batch):
        raise ValueError("loss.router_aux_loss_coef adds the router loss to paired preference "
                         "losses, not to ranked lists or KTO; set it to 0")
    if "slot_rank" in batch:
        return ranked_terms(model, loss_cfg, params, ref_params, batch, cfg, max_scored,
                            policy_forward_only, at_start)
    policy = sequence_stats(model, params, batch, cfg, max_scored,
                            forward_only=policy_forward_only, loss_cfg=loss_cfg,
                            with_wpo=loss_cfg.use_weighting, router_aux=router_aux)
    policy, aux = policy if router_aux else (policy, None)
    own = policy[:2]  # (logps, lengths): what the reference's are when it is the policy
    policy = _stats(*policy)
    reference = None
    if "ref_logps" in batch:  # precomputed once over the dataset
        if loss_cfg.ld_alpha is not None:
            raise ValueError("loss.ld_alpha (LD-DPO) weights the reference's tokens too; stored "
                             "reference log-probs are plain sums: set "
                             "logprobs.precompute_reference=False")
        reference = _stats(*_reference_or_own(
            own, (batch["ref_logps"], batch["ref_lengths"]), at_start))
    elif ref_params is not None:
        reference = _stats(*_reference_or_own(own, lambda: sequence_stats(
            model, ref_params, batch, cfg, max_scored, forward_only=True, loss_cfg=loss_cfg),
            at_start))
    weights = batch["pair_weight"]
    if "desirable" in batch:
        return policy, losses_lib.kto_loss(loss_cfg, policy, reference, batch["desirable"],
                                           weights)
    out = losses_lib.preference_loss(loss_cfg, policy, reference, weights=weights)
    if router_aux:  # TRL: loss + router_aux_loss_coef * aux_loss, logged as aux_loss
        out = out.replace(losses=out.losses + loss_cfg.router_aux_loss_coef * aux,
                          extras={**out.extras, "aux_loss": aux})
    return policy, out


def _weighted_sums(policy, out, weights) -> dict[str, jax.Array]:
    """Sums weighted by pair_weight; divided by the weight total they are the plotted means."""
    w = weights.astype(jnp.float32)
    sums = {
        "loss": jnp.sum(w * out.losses),
        "rewards/chosen": jnp.sum(w * out.chosen_rewards),
        "rewards/rejected": jnp.sum(w * out.rejected_rewards),
        "rewards/margins": jnp.sum(w * (out.chosen_rewards - out.rejected_rewards)),
        "rewards/accuracies": jnp.sum(w * (out.chosen_rewards > out.rejected_rewards)),
        "logps/chosen": jnp.sum(w * policy.chosen_logps),
        "logps/rejected": jnp.sum(w * policy.rejected_logps),
    }
    for k, v in out.extras.items():
        sums[k] = jnp.sum(w * v) if jnp.ndim(v) else v * jnp.sum(w)
    return sums


def _micro(batch, n: int, j):
    """Micro-batch j of n: examples j, j+n, j+2n, ... (strided, so row sharding is kept), with
    their K response slots."""

    K = _num_slots(batch)

    def split(x, paired_rows: bool):
        lead = (K,) if paired_rows else ()
        x = x.reshape(*lead, -1, n, *x.shape[1:])
        x = jax.lax.dynamic_index_in_dim(x, j, axis=len(lead) + 1, keepdims=False)
        return x.reshape(-1, *x.shape[len(lead) + 1:])

    return {
        k: split(v, paired_rows=k not in _PER_EXAMPLE_KEYS) for k, v in batch.items()
    }


def sync_reference(ref_params, params, step, every: int, alpha: float):
    """TR-DPO's reference update (Gorbatovski et al. 2024, Eq. 5-6; TRL SyncRefModelCallback):
    when ``step % every == 0``, ``alpha * params + (1 - alpha) * ref_params`` in float32, stored
    in the reference's dtype (``alpha = 1``: a hard copy); else ``ref_params`` unchanged. Pure and
    jittable; each leaf keeps its sharding (elementwise)."""

    def mix(p, r):
        if alpha == 1.0:
            return p.astype(r.dtype)
        return (alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32)).astype(r.dtype)

    return jax.lax.cond(step % every == 0, lambda: jax.tree.map(mix, params, ref_params),
                        lambda: ref_params)


def make_train_step(model, loss_cfg, tx, schedule, cfg: StepConfig, on_nonfinite: str = "error"):
    """``train_step(state, batch, max_scored) -> (state, metrics)``; jit it with shardings.

    ``metrics`` holds the weighted means of the loss terms plus ``grad_norm``, ``lr`` and
    ``nonfinite`` (:func:`dpo_jax.optim.apply_gradients`). With ``cfg.ref_sync_every`` > 0
    (TR-DPO) the returned state's reference is :func:`sync_reference` of the updated policy
    after every ``ref_sync_every``-th update; the loss must read a reference and the state must
    hold its parameters (not precomputed log-probs), else ValueError."""
    if cfg.ref_sync_every and not losses_lib.needs_reference(loss_cfg):
        raise ValueError(f"ref_sync_every={cfg.ref_sync_every} (TR-DPO) with the reference-free "
                         f"loss {list(loss_cfg.names)}: there is no reference to update")
    if cfg.grad_accum > 1 and losses_lib.uses_batch_statistics(loss_cfg):
        raise ValueError(
            f"loss {list(loss_cfg.names)} uses batch statistics, so accumulating micro-batches would "
            "change it; set optim.grad_accum=1"
        )

    def loss_fn(params, ref_params, batch, total_weight, max_scored, key=None, at_start=None):
        policy, out = pair_terms(model, loss_cfg, params, ref_params, batch, cfg, max_scored,
                                 key=key, at_start=at_start)
        sums = _weighted_sums(policy, out, batch["pair_weight"])
        return sums["loss"] / total_weight, sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch, max_scored=None):
        total_weight = jnp.maximum(jnp.sum(batch["pair_weight"]), 1e-9)
        n = cfg.grad_accum
        at_start = state.step == 0 if cfg.reference_is_initial_policy else None
        if n == 1:
            grads, sums = grad_fn(state.params, state.ref_params, batch, total_weight, max_scored,
                                  lora_lib.step_key(model, state.step), at_start)
        else:
            if "seq_index" in batch:
                raise ValueError("gradient accumulation with packed or prefix-shared batches "
                                 "is not supported: set optim.grad_accum=1, or data.packing "
                                 "and data.prefix_sharing to False")

            def body(carry, j):
                g_acc, s_acc = carry
                g, s = grad_fn(state.params, state.ref_params, _micro(batch, n, j),
                               total_weight, max_scored, lora_lib.step_key(model, state.step, j),
                               at_start)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            _, zeros_s = jax.eval_shape(
                lambda p, r, b, w: grad_fn(p, r, b, w, max_scored),
                state.params, state.ref_params, _micro(batch, n, 0), total_weight,
            )
            zeros_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros_s)
            (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), jnp.arange(n))
        metrics = {k: v / total_weight for k, v in sums.items()}
        new_state, update_metrics = apply_gradients(state, grads, metrics["loss"], tx, schedule,
                                                    on_nonfinite)
        if cfg.ref_sync_every:
            if state.ref_params is None:
                raise ValueError("ref_sync_every > 0 (TR-DPO) needs the reference parameters in "
                                 "the state; precomputed reference log-probs cannot be updated")
            new_state = new_state.replace(ref_params=sync_reference(
                state.ref_params, new_state.params, new_state.step, cfg.ref_sync_every,
                cfg.ref_mixup_alpha))
        return new_state, {**metrics, **update_metrics}

    return train_step


def pair_metrics(policy, out, weights) -> dict[str, eval_metrics.Ratio]:
    """TRL's DPO metrics of one batch as ``{name: (numerator, denominator)}``
    (:mod:`dpo_jax.eval_metrics`): every one a mean over pairs weighted by ``pair_weight``
    ``[B]`` (padding pairs weigh 0), so each denominator is the summed weight."""
    return eval_metrics.over(_weighted_sums(policy, out, weights),
                             jnp.sum(weights.astype(jnp.float32)))


def make_eval_step(model, loss_cfg, cfg: StepConfig, extra_metrics: Callable | None = None):
    """``eval_step(params, ref_params, batch, max_scored) -> {name: (numerator, denominator)}``
    (:func:`pair_metrics`; ``dpo_jax.eval_metrics.means`` divides once over the split).
    ``extra_metrics(policy: SequenceStats | ranked stats, out: LossOutput, batch) -> {name:
    (numerator, denominator)}`` adds a task's own metrics, each with its own denominator (a
    per-token mean, an accuracy over a bucket of pairs)."""

    def eval_step(params, ref_params, batch, max_scored=None):
        policy, out = pair_terms(model, loss_cfg, params, ref_params, batch, cfg, max_scored,
                                 policy_forward_only=True)
        metrics = pair_metrics(policy, out, batch["pair_weight"])
        if extra_metrics is not None:
            metrics.update(extra_metrics(policy, out, batch))
        return metrics

    return eval_step
