"""Supervised fine-tuning (``config.task='sft'``) and the Unlikelihood baseline, on the DPO loop.

SFT changes only the loss (token-mean NLL) and the batches (single sequences instead of
pairs); the state, the loop, checkpoints and resume are the shared ones (``dpo_jax/loop.py``).

Objectives (``config.sft.objective``):
  * ``nll``: mean negative log-likelihood over scored tokens of the whole global batch; scored
    tokens are the response (``sft.target='response'``: Preferred-FT when the data is the chosen
    side of a preference file) or every token after the first (``'text'``: LM pretraining).
  * ``unlikelihood``: the paper's Unlikelihood baseline (Welleck et al. 2019 token-level
    unlikelihood applied to dispreferred responses): on preference pairs,
    ``mean_t[-log p(y_w,t)] + alpha * mean_t[-log(1 - p(y_l,t))]`` with token means over the
    batch's chosen / rejected response tokens and ``1 - p`` clamped at 1e-5 as in Welleck et
    al.'s code. Batches are the DPO pipeline's (chosen rows then rejected rows).

SFT data (``config.sft.source``): ``'preference'`` -- (prompt, chosen) of ``config.data`` (any
source of the DPO pipeline, including the synthetic task); ``'tokens'`` -- jsonl(.gz) files of
pre-tokenised ``{"prompt": [ids], "response": [ids]}`` rows (``sft.train_path``/``eval_path``;
``prompt`` may be absent), which is how the IMDb pipeline feeds reviews.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from dpo_jax import evaluation
from dpo_jax import loop
from dpo_jax import lora as lora_lib
from dpo_jax import lora_base
from dpo_jax import preference_data
from dpo_jax import sharding as shard_lib
from dpo_jax import state as state_lib
from dpo_jax.config import read_config
from dpo_jax import batch_format
from dpo_jax.batch_format import BatchFormat
from dpo_jax.sft_config import SFTConfig, add_sft_config  # noqa: F401  (re-exported)
from dpo_jax.data.text import TextPipeline, load_examples
from dpo_jax.logprobs import compact_scored, token_logps
from dpo_jax.models import moe
from dpo_jax.optim import Objective, make_update
from dpo_jax.workdir import RunDir, opens_workdir

UL_MIN_ONE_MINUS_P = 1e-5


# ------------------------------------------------------------------------------- math
def _slots(batch, fmt: BatchFormat):
    """``(mask [R, L-1], slot [R, L-1])`` of the batch's scored tokens: ``slot`` is each
    token's sequence slot (``seq_index`` in packed batches, else the row)."""
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    seq_index, _ = fmt.seq_index(batch)
    if seq_index is not None:
        return mask, seq_index[:, 1:]
    rows, length = mask.shape
    return mask, jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], (rows, length))


def scored_token_logps(model, params, batch, lp_cfg, max_scored, fmt: BatchFormat | None = None,
                       rng: jax.Array | None = None, router_aux: bool = False):
    """Per-token log-probs of scored tokens: (logps [R,S], mask [R,S], slot [R,S], the
    router's load-balancing loss (float32 [], mixture-of-experts models with ``router_aux``)
    or None).

    ``slot`` is the sequence slot of each token: ``seq_index`` in packed batches, else the row.
    ``fmt``: the batch's layout (None: as its arrays say); ``rng``: LoRA's dropout key."""
    fmt = fmt or batch_format.infer(batch)
    h = model.hidden(params, batch["input_ids"], batch["positions"], batch["segment_ids"],
                     **({} if rng is None else {"dropout_rng": rng}),
                     **({"router_aux": True} if router_aux else {}))
    h, aux = h if router_aux else (h, None)
    w, b = model.unembedding(params, caller_applies_softcap=True)
    h, targets = h[:, :-1], batch["input_ids"][:, 1:]
    mask, slot = _slots(batch, fmt)
    length = targets.shape[1]
    if lp_cfg.scored_only:
        width = length if max_scored is None else min(max_scored, length)
        order, mask = compact_scored(mask, width)
        h = jnp.take_along_axis(h, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        slot = jnp.take_along_axis(slot, order, axis=1)
    logps = token_logps(h, targets, w, b, lp_cfg, softcap=model.cfg.final_logit_softcap) * mask
    return logps, mask, jnp.where(mask > 0, slot, 0), aux


def _token_weights(batch, mask, slot, objective: str):
    """(weight of each token, 1 on a chosen token) for ``objective``'s sums: NLL weighs a
    token by its sequence's ``example_weight``; Unlikelihood (a pair batch, slots < B chosen)
    by its pair's ``pair_weight``."""
    if objective != "unlikelihood":
        return batch["example_weight"][slot] * mask, None
    B = batch["pair_weight"].shape[0]
    return batch["pair_weight"][slot % B] * mask, (slot < B).astype(jnp.float32)


def _aux(aux) -> dict[str, jax.Array]:
    return {} if aux is None else {"aux_loss": aux}


def nll_sums(model, params, batch, lp_cfg, max_scored, fmt=None, rng=None, router_aux=False
             ) -> dict[str, jax.Array]:
    """Weighted sums over scored tokens: ``nll`` (of -log p) and ``tokens``; with
    ``router_aux``, the router's ``aux_loss`` of the forward (a mean, not a sum)."""
    logps, mask, slot, aux = scored_token_logps(model, params, batch, lp_cfg, max_scored, fmt,
                                                rng, router_aux)
    w = _token_weights(batch, mask, slot, "nll")[0]
    return {"nll": -jnp.sum(w * logps), "tokens": jnp.sum(w), **_aux(aux)}


def unlikelihood_sums(model, params, batch, lp_cfg, max_scored, fmt=None, rng=None,
                      router_aux=False) -> dict[str, jax.Array]:
    """Sums for the Unlikelihood loss on a preference batch (slots < B are chosen); with
    ``router_aux`` the router's ``aux_loss`` as :func:`nll_sums`."""
    logps, mask, slot, aux = scored_token_logps(model, params, batch, lp_cfg, max_scored, fmt,
                                                rng, router_aux)
    w, chosen = _token_weights(batch, mask, slot, "unlikelihood")
    one_minus_p = jnp.maximum(-jnp.expm1(logps), UL_MIN_ONE_MINUS_P)
    return {**_aux(aux), "nll": -jnp.sum(w * chosen * logps), "tokens": jnp.sum(w * chosen),
            "ul": -jnp.sum(w * (1 - chosen) * jnp.log(one_minus_p)),
            "rejected_p": jnp.sum(w * (1 - chosen) * jnp.exp(logps)),
            "rejected_tokens": jnp.sum(w * (1 - chosen))}


def token_metrics(sums: Mapping[str, Any]) -> dict[str, Any]:
    """The token means of :func:`nll_sums` / :func:`unlikelihood_sums` as ``{name: (numerator,
    denominator)}`` (``dpo_jax.eval_metrics``): ``nll`` over the scored (chosen) tokens, ``ul``
    and ``rejected_token_p`` over the rejected tokens."""
    out = {"nll": (sums["nll"], sums["tokens"])}
    if "ul" in sums:
        out["ul"] = (sums["ul"], sums["rejected_tokens"])
        out["rejected_token_p"] = (sums["rejected_p"], sums["rejected_tokens"])
    return out


def objective(means: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """From token means: ``ppl = exp(nll)`` and ``loss = nll (+ alpha * ul)``."""
    exp = jnp.exp if isinstance(means["nll"], jax.Array) else math.exp
    loss = means["nll"] + alpha * means["ul"] if "ul" in means else means["nll"]
    return {"ppl": exp(means["nll"]), "loss": loss}


def ratios(sums: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """Token means from sums: nll, ppl, loss (+ ul terms). Works on jax or python numbers."""
    means = {k: num / jnp.maximum(den, 1e-9) for k, (num, den) in token_metrics(sums).items()}
    return {**means, **objective(means, alpha)}


def sft_objective(model, objective: str, alpha: float, lp_cfg, max_scored,
                  fmt: BatchFormat | None = None, router_coef: float = 0.0) -> Objective:
    """The SFT / Unlikelihood :class:`dpo_jax.optim.Objective`: token means whose
    denominators (scored tokens, chosen and rejected ones for Unlikelihood) are the whole
    batch's, so micro-batches add up to it. ``trainable`` is the policy or its LoRA adapters
    over the frozen base. ``router_coef`` > 0 (``models.moe.router_aux_coef``): TRL 1.16's
    SFT loss ``loss + coef * aux_loss``, ``aux_loss`` logged; with gradient accumulation each
    micro-batch's aux weighted by its share of the scored tokens (TRL: by 1 / steps)."""
    sums_fn = unlikelihood_sums if objective == "unlikelihood" else nll_sums

    def totals(batch):
        mask, slot = _slots(batch, fmt or batch_format.infer(batch))
        w, chosen = _token_weights(batch, mask, jnp.where(mask > 0, slot, 0), objective)
        if chosen is None:
            return {"tokens": jnp.sum(w)}
        return {"tokens": jnp.sum(w * chosen), "rejected_tokens": jnp.sum(w * (1 - chosen))}

    def loss(trainable, frozen, batch, rng, total):
        base = None if frozen is None else frozen.lora_base
        sums = sums_fn(model, lora_lib.join(base, trainable), batch, lp_cfg, max_scored, fmt,
                       rng, router_coef > 0)
        aux = sums.pop("aux_loss", None)
        out = ratios({**sums, **total}, alpha)
        del out["ppl"]  # not a sum: from the accumulated nll (finalize)
        if aux is not None:
            out["aux_loss"] = aux * sums["tokens"] / jnp.maximum(total["tokens"], 1e-9)
            out["loss"] = out["loss"] + router_coef * out["aux_loss"]
        return out["loss"], out

    return Objective(loss=loss, totals=totals,
                     finalize=lambda m, total: {**m, "ppl": jnp.exp(m["nll"])})


def make_sft_train_step(model, objective: str, alpha: float, tx, schedule, lp_cfg,
                        on_nonfinite: str = "error", grad_accum: int = 1,
                        fmt: BatchFormat | None = None, router_coef: float = 0.0):
    """``train_step(state, batch, max_scored) -> (state, metrics)`` minimising the token mean
    (of the adapters over the frozen base ``state.frozen.lora_base`` under LoRA) with the shared step
    builder (``grad_accum`` micro-batches; ``fmt``: the batches' layout, None = as the first
    batch's arrays say; ``router_coef``: :func:`sft_objective`)."""

    def train_step(state, batch, max_scored=None):
        layout = fmt or batch_format.infer(batch)
        update = make_update(sft_objective(model, objective, alpha, lp_cfg, max_scored, layout,
                                           router_coef),
                             tx, schedule, grad_accum=grad_accum, split=layout.split,
                             on_nonfinite=on_nonfinite)
        return update(state, batch, lora_lib.step_rng(model, state.step))

    return train_step


# ------------------------------------------------------------------------------- the task
def _check(config, rc) -> None:
    if rc.precompute_reference:
        raise ValueError("logprobs.precompute_reference=True: the SFT task has no reference "
                         "model; set it to False")


@opens_workdir
def train_and_evaluate(config: ml_collections.ConfigDict, run: RunDir, *,
                       interrupt_after: int | None = None) -> dict[str, Any]:
    """Train and evaluate an SFT / Unlikelihood run; called as
    ``train_and_evaluate(config, workdir)``, returns its summary.

    Raises ValueError for settings the task cannot honour (a precomputed reference)."""
    rc = read_config(config)
    sft: SFTConfig = rc.task_block
    _check(config, rc)
    model = lora_lib.make_model(rc.model, rc.lora)  # a LoraModel when model.lora.rank > 0
    # under LoRA, trainable are the adapters and frozen.lora_base the base (dpo_jax/lora.py)
    setup = state_lib.setup(rc, model)
    mesh, state = setup.mesh, setup.initial_state()
    samples = evaluation.sample_evaluator(
        rc, workdir=run.path, model=model, mesh=mesh,
        reference_params=lora_lib.policy_of(state), params_of=lora_lib.policy_of)

    if sft.objective == "unlikelihood":
        data = preference_data.preference_streams(rc, rc.train.splits, model_cfg=model.cfg,
                                                  mesh=mesh)
    else:
        data = {}
        sizes = {"train": rc.train.batch_size, "eval": rc.train.eval_batch_size}
        for split in rc.train.splits:
            examples, pad_id = load_examples(
                split, source=sft.source, data_cfg=rc.data,
                path=sft.train_path if split == "train" else sft.eval_path)
            preference_data.check_fits(
                [{"prompt": e["prompt"], "chosen": e["response"], "rejected": e["response"]}
                 for e in examples], model.cfg, pad_id=pad_id, where=f"sft split {split!r}")
            data[split] = TextPipeline(
                examples, rc.data, train=split == "train", global_batch_size=sizes[split],
                target=sft.target, process_index=jax.process_index(),
                process_count=jax.process_count(), seed=rc.seed, pad_id=pad_id,
                row_multiple=shard_lib.num_batch_shards(mesh))

    alpha, lp_cfg = sft.unlikelihood_alpha, rc.step.logprobs
    fmt = batch_format.for_run(rc.data, kind=None if sft.objective == "unlikelihood"
                               else "sequences")
    train_step = loop.jit_train_step(
        make_sft_train_step(model, sft.objective, alpha, setup.tx, setup.schedule, lp_cfg,
                            rc.train.on_nonfinite, rc.optim.grad_accum, fmt,
                            moe.router_aux_coef(rc.loss.router_aux_loss_coef, model.cfg)), state)
    sums_fn = unlikelihood_sums if sft.objective == "unlikelihood" else nll_sums
    return loop.train(
        run, state, cfg=rc.train, mesh=mesh,
        step_fn=loop.host_step(train_step, mesh, lp_cfg.scored_only), train_data=data["train"],
        evaluate=evaluation.with_samples(loop.evaluator(
            lambda s, b, n: token_metrics(
                sums_fn(model, lora_lib.policy_of(s), b, lp_cfg, n, fmt)),
            data.get("eval"), mesh, lp_cfg.scored_only,
            derived=lambda means: objective(means, alpha)), samples),
        report=lambda: {"data": {k: s.stats for k, s in data.items()}},
        host_states=lora_base.host_states(state, rc.param_sources),
        interrupt_after=interrupt_after)
