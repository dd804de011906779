"""The DPO training and evaluation steps: pure functions of (state, batch).

One policy forward runs chosen and rejected rows together (the reference implementation's
``concatenated_forward``); the reference forward runs under ``stop_gradient`` on a frozen second
parameter tree. The update is the shared step builder's (``optim.make_update``): gradient
accumulation splits the pairs into equal strided micro-batches inside the jitted step and sums
gradients normalised by the whole batch's weight, so the update equals the big batch's. The
batch layout is a ``batch_format.BatchFormat`` fixed when the step is built.

Batch layout (see ARCHITECTURE.md): rows of the *global* batch are ``[chosen_0..B-1,
rejected_0..B-1]``; each host holds a contiguous block of those rows.
"""

from __future__ import annotations

from typing import Callable

import flax
import jax
import jax.numpy as jnp
from dpo_jax import batch_format
from dpo_jax import diagnostics
from dpo_jax import eval_metrics
from dpo_jax import losses as losses_lib
from dpo_jax import lora as lora_lib
from dpo_jax.batch_format import BatchFormat
from dpo_jax.logprobs import scored_counts, sequence_logps
from dpo_jax.models import moe
from dpo_jax.optim import Objective, make_update
from dpo_jax.train_state import Frozen, TrainState
from dpo_jax.step_config import StepConfig  # noqa: F401  (re-exported: step.StepConfig)


@flax.struct.dataclass
class SeqStats:
    """One forward's per-sequence statistics, each float32 ``[S]`` in block layout (``S = K B``,
    slot-major: chosen then rejected for pairs)."""

    logps: jax.Array  # summed log-probs of the scored tokens (LD-DPO: weighted)
    lengths: jax.Array  # scored tokens
    wpo_logps: jax.Array | None = None  # WPO's per-token mean aligned log-prob (with_wpo)
    router_aux: jax.Array | None = None  # f32 []: the router's load-balancing loss (router_aux)
    hidden_sums: jax.Array | None = None  # f32 [S, D]: with_hidden (logprobs.sequence_logps)
    routing: jax.Array | None = None  # int32 [L, R, T, K]: sorted top-k experts (routing)


def sequence_stats(model, params, batch, cfg: StepConfig, max_scored, forward_only=False,
                   loss_cfg: losses_lib.LossConfig | None = None, with_wpo=False,
                   router_aux=False, fmt: BatchFormat | None = None,
                   rng: jax.Array | None = None, with_hidden: bool = False,
                   routing=False) -> SeqStats:
    """:class:`SeqStats` of ``params`` on ``batch`` (laid out as ``fmt``; None: as its arrays
    say, :func:`batch_format.infer`). forward_only (no gradient will be taken) evaluates the head
    with ``cfg.forward_logprobs``. ``loss_cfg.ld_alpha`` (LD-DPO) weights the tokens past the
    shorter response of each pair; ``with_wpo`` fills ``wpo_logps``, ``router_aux``
    (mixture-of-experts models) ``router_aux``, ``with_hidden`` ``hidden_sums`` (the CHES
    score's sums, ``dpo_jax.diagnostics``), ``routing`` each layer's sorted top-k experts.
    ``rng``: LoRA's dropout key (None: none)."""
    fmt = fmt or batch_format.infer(batch)
    kwargs = dict(fmt.hidden_kwargs(batch), **({"router_aux": True} if router_aux else {}),
                  **({"routing": True} if routing else {}),
                  **({} if rng is None else {"dropout_rng": rng}))
    h = model.hidden(params, batch["input_ids"], batch["positions"], batch["segment_ids"],
                     **kwargs)
    h, aux, routes = h if routing else (*(h if router_aux else (h, None)), None)
    w, b = model.unembedding(params, caller_applies_softcap=True)
    seq_index, num_seqs = fmt.seq_index(batch)
    ld = {}
    if loss_cfg is not None and loss_cfg.ld_alpha is not None:
        chosen, rejected = _pairs(scored_counts(batch["loss_mask"], seq_index, num_seqs))
        shared = jnp.minimum(chosen, rejected)
        ld = dict(ld_shared_S=jnp.concatenate([shared, shared]), ld_alpha=loss_cfg.ld_alpha)
    out = sequence_logps(
        h, batch["input_ids"], batch["loss_mask"], w, b,
        cfg.forward_logprobs if forward_only else cfg.logprobs,
        max_scored=max_scored, seq_index_RL=seq_index, num_seqs=num_seqs, with_wpo=with_wpo,
        softcap=model.cfg.final_logit_softcap, with_hidden=with_hidden, **ld,
    )
    wpo = None if out.wpo_sums is None else out.wpo_sums / jnp.maximum(out.counts, 1.0)
    return SeqStats(out.sums, out.counts, wpo, aux, out.hidden_sums, routes)


def _pairs(x_S):
    chosen, rejected = jnp.split(x_S, 2)
    return chosen, rejected


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
                 policy_forward_only=False, at_start=None, fmt: BatchFormat | None = None,
                 rng=None):
    """``pair_terms`` for ranked lists (``slot_rank`` [B, K] in the batch; -1 = empty slot):
    the K responses of each prompt in one forward, ``losses.listwise_loss`` over ``[B, K]``.
    LD-DPO, WPO and stored reference log-probs read pairs only (ValueError)."""
    fmt = fmt or batch_format.infer(batch)
    if loss_cfg.ld_alpha is not None or loss_cfg.use_weighting or fmt.stored_reference:
        raise ValueError("ranked lists: loss.ld_alpha, loss.use_weighting and "
                         "logprobs.precompute_reference are for pairs; unset them")
    K, rank_BK = fmt.num_slots(batch), batch["slot_rank"]
    mask_BK = (rank_BK >= 0).astype(jnp.float32)
    coef = moe.router_aux_coef(loss_cfg.router_aux_loss_coef, model.cfg)
    policy = sequence_stats(model, params, batch, cfg, max_scored,
                            forward_only=policy_forward_only, fmt=fmt, rng=rng,
                            router_aux=coef > 0)
    logps, lengths = policy.logps, policy.lengths
    ref_logps = jnp.zeros_like(logps)
    if ref_params is not None:
        ref_logps = _reference_or_own(logps, lambda: sequence_stats(
            model, ref_params, batch, cfg, max_scored, forward_only=True, fmt=fmt).logps,
            at_start)
    out = with_router_loss(losses_lib.listwise_loss(
        loss_cfg, _slots(logps, K), _slots(ref_logps, K), mask_BK, rank_BK,
        batch["pair_weight"]), coef, policy.router_aux)
    return losses_lib.ranked_stats(_slots(logps, K), _slots(lengths, K), mask_BK), out


def _stats(s: SeqStats) -> losses_lib.SequenceStats:
    chosen_logps, rejected_logps = _pairs(s.logps)
    chosen_lengths, rejected_lengths = _pairs(s.lengths)
    chosen_wpo, rejected_wpo = (None, None) if s.wpo_logps is None else _pairs(s.wpo_logps)
    return losses_lib.SequenceStats(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        chosen_wpo_logps=chosen_wpo, rejected_wpo_logps=rejected_wpo,
    )


def pair_terms(model, loss_cfg, params, ref_params, batch, cfg: StepConfig, max_scored,
               policy_forward_only=False, key=None, at_start=None,
               fmt: BatchFormat | None = None, routing_by_layer=False):
    """Policy/reference statistics and the loss output for one (micro-)batch laid out as
    ``fmt`` (None: as its arrays say, :func:`batch_format.infer`).

    LD-DPO (``loss_cfg.ld_alpha``) weights both models' log-probs, so it refuses stored
    reference log-probs (``fmt.stored_reference``, plain sums); WPO reads the policy only.
    Ranked lists go to :func:`ranked_terms`; unpaired examples (``desirable`` [B]: chosen = the
    completion, rejected = its mismatched KL completion) to ``losses.kto_loss``. ``at_start``
    (a traced bool; None = never): the step is the run's first and the reference is the initial
    policy (``StepConfig.reference_is_initial_policy``), so the policy's log-probs are the
    reference's. ``key``: LoRA's dropout key for the policy forward (None: no dropout).
    ``cfg.diagnostics`` (pairs only, else ValueError) adds :func:`diagnostics.pair_extras` to
    the output's extras, from the same forward; the loss is unchanged.
    Mixture-of-experts models with a reference forward (pairs, KTO) add the routing drift to
    ``out.extras``: ``routing/agreement``, the fraction of scored tokens whose top-k experts
    are the same under policy and reference (mean over layers; 1 when the reference is the
    policy), and with ``routing_by_layer`` ``routing/agreement/layer_<i>`` per layer."""
    fmt = fmt or batch_format.infer(batch)
    diag = cfg.diagnostics
    if diag and fmt.kind != "pairs":
        raise ValueError(f"train.diagnostics=True reads preference pairs; the batches are "
                         f"{fmt.kind}: set train.diagnostics=False")
    # LoRA (dpo_jax/lora.py): params are adapters over the frozen base ref_params, which with
    # the adapters off is the reference
    params = lora_lib.join(ref_params, params)
    if not losses_lib.needs_reference(loss_cfg):
        ref_params = None
    coef = moe.router_aux_coef(loss_cfg.router_aux_loss_coef, model.cfg)
    router_aux = coef > 0
    if fmt.kind == "ranked":
        return ranked_terms(model, loss_cfg, params, ref_params, batch, cfg, max_scored,
                            policy_forward_only, at_start, fmt, key)
    drift = bool(model.cfg.n_experts) and ref_params is not None and not fmt.stored_reference
    full = sequence_stats(model, params, batch, cfg, max_scored,
                          forward_only=policy_forward_only, loss_cfg=loss_cfg,
                          with_wpo=loss_cfg.use_weighting, router_aux=router_aux, fmt=fmt,
                          rng=key, with_hidden=diag, routing=drift)
    # what the reference's are when it is the policy
    own = SeqStats(full.logps, full.lengths, routing=full.routing)
    policy = _stats(full)
    reference = None
    if fmt.stored_reference:  # precomputed once over the dataset
        if loss_cfg.ld_alpha is not None:
            raise ValueError("loss.ld_alpha (LD-DPO) weights the reference's tokens too; stored "
                             "reference log-probs are plain sums: set "
                             "logprobs.precompute_reference=False")
        reference = _stats(_reference_or_own(
            own, SeqStats(batch["ref_logps"], batch["ref_lengths"]), at_start))
    elif ref_params is not None:
        ref = _reference_or_own(own, lambda: sequence_stats(
            model, ref_params, batch, cfg, max_scored, forward_only=True, loss_cfg=loss_cfg,
            fmt=fmt, routing=drift), at_start)
        reference = _stats(ref)
    weights = batch["pair_weight"]
    if fmt.kind == "unpaired":
        out = losses_lib.kto_loss(loss_cfg, policy, reference, batch["desirable"], weights)
    else:
        out = losses_lib.preference_loss(loss_cfg, policy, reference, weights=weights)
    if drift:
        agree_L, n = moe.routing_agreement(full.routing, ref.routing, batch["loss_mask"])
        frac_L = agree_L / jnp.maximum(n, 1.0)
        extras = {"routing/agreement": jnp.mean(frac_L)}
        if routing_by_layer:
            extras.update({f"routing/agreement/layer_{i}": f for i, f in enumerate(frac_L)})
        out = out.replace(extras={**out.extras, **extras})
    if diag:
        out = out.replace(extras={**out.extras, **diagnostics.pair_extras(
            policy, reference, out, full.hidden_sums)})
    return policy, with_router_loss(out, coef, full.router_aux)


def with_router_loss(out, coef: float, aux):
    """TRL 1.16: each example's loss plus ``coef * aux_loss`` (the policy forward's router
    load-balancing loss, ``moe.load_balancing_loss``), ``aux_loss`` logged; ``out`` as it is
    when ``coef`` is 0 (``moe.router_aux_coef``)."""
    if not coef:
        return out
    return out.replace(losses=out.losses + coef * aux, extras={**out.extras, "aux_loss": aux})


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


def make_train_step(model, loss_cfg, tx, schedule, cfg: StepConfig, on_nonfinite: str = "error",
                    fmt: BatchFormat | None = None):
    """``train_step(state, batch, max_scored) -> (state, metrics)``; jit it with shardings.

    The DPO family's :class:`dpo_jax.optim.Objective` (any loss of ``losses/`` on batches laid
    out as ``fmt``; None: as the first batch's arrays say) under the shared step builder
    :func:`dpo_jax.optim.make_update` (``cfg.grad_accum`` strided micro-batches, gradients
    normalised by the whole batch's ``pair_weight``). ``metrics`` holds the weighted means of
    the loss terms plus ``grad_norm``, ``lr`` and ``nonfinite``. With ``cfg.ref_sync_every`` >
    0 (TR-DPO) the returned state's reference is :func:`sync_reference` of the updated policy
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

    def build(fmt: BatchFormat, at_start, max_scored):
        def loss(params, frozen, batch, rng, total_weight):
            policy, out = pair_terms(model, loss_cfg, params, Frozen.tree_of(frozen), batch, cfg,
                                     max_scored, key=rng, at_start=at_start, fmt=fmt)
            sums = _weighted_sums(policy, out, batch["pair_weight"])
            return sums["loss"] / total_weight, sums

        objective = Objective(
            loss=loss,
            totals=lambda batch: jnp.maximum(jnp.sum(batch["pair_weight"]), 1e-9),
            finalize=lambda sums, total: {
                k: v if diagnostics.is_count(k) else v / total for k, v in sums.items()})
        return make_update(objective, tx, schedule, grad_accum=cfg.grad_accum, split=fmt.split,
                           on_nonfinite=on_nonfinite)

    def train_step(state: TrainState, batch, max_scored=None):
        layout = fmt or batch_format.infer(batch)
        layout.check(batch)
        at_start = state.step == 0 if cfg.reference_is_initial_policy else None
        new_state, metrics = build(layout, at_start, max_scored)(
            state, batch, lora_lib.step_rng(model, state.step))
        if cfg.ref_sync_every:
            if state.frozen is None or state.frozen.reference is None:
                raise ValueError("ref_sync_every > 0 (TR-DPO) needs the reference parameters in "
                                 "the state; precomputed reference log-probs cannot be updated")
            new_state = new_state.with_reference(sync_reference(
                state.frozen.reference, new_state.trainable, new_state.step,
                cfg.ref_sync_every, cfg.ref_mixup_alpha))
        return new_state, metrics

    return train_step


def pair_metrics(policy, out, weights) -> dict[str, eval_metrics.Ratio]:
    """TRL's DPO metrics of one batch as ``{name: (numerator, denominator)}``
    (:mod:`dpo_jax.eval_metrics`): every one a mean over pairs weighted by ``pair_weight``
    ``[B]`` (padding pairs weigh 0), so each denominator is the summed weight; the
    diagnostics' histogram bins (:func:`diagnostics.is_count`) are weighted counts over the
    split (denominator 0, :func:`eval_metrics.means`)."""
    total = jnp.sum(weights.astype(jnp.float32))
    return {k: (v, 0.0 if diagnostics.is_count(k) else total)
            for k, v in _weighted_sums(policy, out, weights).items()}


# Eval's per-depth metrics of preference trees: depths 0 .. TREE_DEPTHS - 2, and the last bucket
# every deeper branch point.
TREE_DEPTHS = 4


def depth_metrics(policy, out, weights, depth_B) -> dict[str, eval_metrics.Ratio]:
    """Preference trees' eval metrics per branch-point depth (``bp_depth`` [B], the turn or step
    index, ``data/tree_data.py``): ``depth_<d>/loss``, ``/rewards/accuracies`` and
    ``/rewards/margins`` as weighted means over the branch points at depth d (``depth_3``:
    depth >= 3), and ``depth_<d>/branch_points``, their summed weight (a total: 0 means the
    split has none at that depth and the means read 0)."""
    del policy  # the terms are the loss output's
    w = weights.astype(jnp.float32)
    terms = {"loss": out.losses,
             "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).astype(jnp.float32),
             "rewards/margins": out.chosen_rewards - out.rejected_rewards}
    result = {}
    for d in range(TREE_DEPTHS):
        at = (depth_B >= d) if d == TREE_DEPTHS - 1 else (depth_B == d)
        w_d = w * at
        total = jnp.sum(w_d)
        for k, v in terms.items():
            result[f"depth_{d}/{k}"] = (jnp.sum(w_d * v), total)
        result[f"depth_{d}/branch_points"] = (total, 0.0)
    return result


def make_eval_step(model, loss_cfg, cfg: StepConfig, extra_metrics: Callable | None = None,
                   fmt: BatchFormat | None = None):
    """``eval_step(trainable, frozen, batch, max_scored) -> {name: (numerator, denominator)}``
    (:func:`pair_metrics`; ``dpo_jax.eval_metrics.means`` divides once over the split):
    ``trainable`` and ``frozen`` (a ``train_state.Frozen`` or None) as a ``TrainState`` holds
    them, on batches laid out as ``fmt`` (None: as each batch's arrays say,
    :func:`batch_format.infer`; a batch of another layout is a ValueError).
    ``extra_metrics(policy: SequenceStats | ranked stats, out: LossOutput, batch) -> {name:
    (numerator, denominator)}`` adds a task's own metrics, each with its own denominator (a
    per-token mean, an accuracy over a bucket of pairs). With ``cfg.diagnostics`` the result
    also holds ``eval_metrics.PER_EXAMPLE``: :func:`diagnostics.per_pair`'s ``{name: [B]}``."""

    def eval_step(trainable, frozen: Frozen | None, batch, max_scored=None):
        layout = fmt or batch_format.infer(batch)
        layout.check(batch)
        policy, out = pair_terms(model, loss_cfg, trainable, Frozen.tree_of(frozen), batch, cfg,
                                 max_scored, policy_forward_only=True, fmt=layout,
                                 routing_by_layer=True)
        metrics = pair_metrics(policy, out, batch["pair_weight"])
        if layout.tree and "bp_depth" in batch:
            metrics.update(depth_metrics(policy, out, batch["pair_weight"], batch["bp_depth"]))
        if extra_metrics is not None:
            metrics.update(extra_metrics(policy, out, batch))
        if cfg.diagnostics:
            metrics[eval_metrics.PER_EXAMPLE] = diagnostics.per_pair(policy, out,
                                                                     batch["pair_weight"])
        return metrics

    return eval_step
