"""Supervised fine-tuning (``config.task='sft'``) and the Unlikelihood baseline, on the DPO loop.

Why a subclass of ``train.Run``: the mesh, sharded init/restore, the jit-once step, the
one-step-late metrics, eval, checkpoints and resume are the same for every task; SFT only
changes the loss (token-mean NLL) and the batches (single sequences instead of pairs).

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
import optax

from dpo_jax import sharding as shard_lib
from dpo_jax import train as train_lib
from dpo_jax.data.text import (TextPipeline, load_examples, read_token_examples,
                              write_token_examples)
from dpo_jax.logprobs import compact_scored, token_logps

UL_MIN_ONE_MINUS_P = 1e-5


def add_sft_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the ``sft`` block to a base config and select the SFT task (returns ``c``)."""
    c.task = "sft"
    c.sft = ml_collections.ConfigDict()
    c.sft.objective = "nll"  # nll | unlikelihood
    c.sft.target = "response"  # response (prompt tokens unscored) | text (all tokens scored)
    c.sft.source = "preference"  # preference: (prompt, chosen) of config.data | tokens: jsonl
    c.sft.train_path = ""  # tokens source: jsonl(.gz) of {"prompt": [..], "response": [..]}
    c.sft.eval_path = ""  # tokens source: held-out file ('' = no eval data)
    c.sft.unlikelihood_alpha = 1.0  # weight of the unlikelihood term on rejected tokens
    return c


# ------------------------------------------------------------------------------- math
def scored_token_logps(model, params, batch, lp_cfg, num_scored):
    """Per-token log-probs of scored tokens: (logps [R,S], mask [R,S], slot [R,S]).

    ``slot`` is the sequence slot of each token: ``seq_index`` in packed batches, else the row.
    """
    h = model.hidden(params, batch["input_ids"], batch["positions"], batch["segment_ids"])
    w, b = model.unembedding(params)
    h, targets = h[:, :-1], batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    rows, length = targets.shape
    if "seq_index" in batch:
        slot = batch["seq_index"][:, 1:]
    else:
        slot = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], (rows, length))
    if lp_cfg.scored_only:
        width = length if num_scored is None else min(num_scored, length)
        order, mask = compact_scored(mask, width)
        h = jnp.take_along_axis(h, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        slot = jnp.take_along_axis(slot, order, axis=1)
    logps = token_logps(h, targets, w, b, lp_cfg) * mask
    return logps, mask, jnp.where(mask > 0, slot, 0)


def nll_sums(model, params, batch, lp_cfg, num_scored) -> dict[str, jax.Array]:
    """Weighted sums over scored tokens: ``nll`` (of -log p) and ``tokens``."""
    logps, mask, slot = scored_token_logps(model, params, batch, lp_cfg, num_scored)
    w = batch["example_weight"][slot] * mask
    return {"nll": -jnp.sum(w * logps), "tokens": jnp.sum(w)}


def unlikelihood_sums(model, params, batch, lp_cfg, num_scored) -> dict[str, jax.Array]:
    """Sums for the Unlikelihood loss on a preference batch (slots < B are chosen)."""
    logps, mask, slot = scored_token_logps(model, params, batch, lp_cfg, num_scored)
    B = batch["pair_weight"].shape[0]
    w = batch["pair_weight"][slot % B] * mask
    chosen = (slot < B).astype(jnp.float32)
    one_minus_p = jnp.maximum(-jnp.expm1(logps), UL_MIN_ONE_MINUS_P)
    return {"nll": -jnp.sum(w * chosen * logps), "tokens": jnp.sum(w * chosen),
            "ul": -jnp.sum(w * (1 - chosen) * jnp.log(one_minus_p)),
            "rejected_p": jnp.sum(w * (1 - chosen) * jnp.exp(logps)),
            "rejected_tokens": jnp.sum(w * (1 - chosen))}


def ratios(sums: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """Token means from sums: nll, ppl, loss (+ ul terms). Works on jax or python numbers."""
    exp = jnp.exp if isinstance(sums["nll"], jax.Array) else math.exp
    nll = sums["nll"] / jnp.maximum(sums["tokens"], 1e-9)
    out = {"nll": nll, "ppl": exp(nll), "loss": nll}
    if "ul" in sums:
        rej = jnp.maximum(sums["rejected_tokens"], 1e-9)
        out["ul"] = sums["ul"] / rej
        out["rejected_token_p"] = sums["rejected_p"] / rej
        out["loss"] = nll + alpha * out["ul"]
    return out


def make_sft_train_step(model, objective: str, alpha: float, tx, schedule, lp_cfg):
    """``train_step(state, batch, num_scored) -> (state, metrics)`` minimising the token mean."""
    sums_fn = unlikelihood_sums if objective == "unlikelihood" else nll_sums

    def loss_fn(params, batch, num_scored):
        sums = sums_fn(model, params, batch, lp_cfg, num_scored)
        out = ratios(sums, alpha)
        return out["loss"], out

    def train_step(state, batch, num_scored=None):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, num_scored)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


# ------------------------------------------------------------------------------- the task
class SFTRun(train_lib.Run):
    """``train.Run`` with the SFT / Unlikelihood objective and single-sequence batches."""

    def setup_task(self) -> None:
        s = self.config.sft
        if s.objective not in ("nll", "unlikelihood"):
            raise ValueError(f"sft.objective must be 'nll' or 'unlikelihood', got {s.objective!r}")
        if self.step_cfg.grad_accum != 1:
            raise ValueError("the SFT task does not accumulate gradients; set optim.grad_accum=1")
        self.objective, self.alpha = s.objective, float(s.unlikelihood_alpha)

    def needs_reference(self) -> bool:
        return False

    def make_train_step(self):
        return make_sft_train_step(self.model, self.objective, self.alpha, self.tx,
                                   self.schedule, self.step_cfg.logprobs)

    def make_eval_step(self):
        sums_fn = unlikelihood_sums if self.objective == "unlikelihood" else nll_sums
        lp_cfg = self.step_cfg.logprobs
        return lambda params, ref_params, batch, num_scored=None: sums_fn(
            self.model, params, batch, lp_cfg, num_scored)

    def build_data(self, split: str, global_batch_size: int):
        if self.objective == "unlikelihood":
            return super().build_data(split, global_batch_size)
        examples, pad_id = load_examples(self.config, split)
        return TextPipeline(examples, self.config.data, train=split == "train",
                            global_batch_size=global_batch_size, target=self.config.sft.target,
                            process_index=jax.process_index(),
                            process_count=jax.process_count(), seed=int(self.config.seed),
                            pad_id=pad_id,
                            row_multiple=shard_lib.num_batch_shards(self.mesh))

    def evaluate(self) -> dict[str, float]:
        """Token means over the whole held-out set (sums first, then ratios)."""
        totals: dict[str, float] = {}
        for batch_np in self.eval_data:
            batch, num_scored = self._device_batch(batch_np)
            sums = jax.device_get(self._eval_step(self.state.params, None, batch, num_scored))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return {k: float(v) for k, v in ratios(totals, self.alpha).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    return SFTRun(config, workdir).train()
