"""Reward modelling (``config.task='reward'``): a decoder with a scalar head, Bradley-Terry loss.

The RLHF baseline DPO is compared against first fits a reward model on the same preference
pairs (the paper's Eq. 2): ``L = -log sigmoid(r(x, y_w) - r(x, y_l))``, where ``r`` is a scalar
head on the final hidden state of the last response token (the EOS the pipeline appends). The
same wrapper (decoder + ``value_head``) is PPO's policy-with-value-head, and
``RewardModel.score`` is the reward PPO optimises and a judge for any samples.

Parameters are ``{"decoder": <Model params>, "value_head": {"kernel": [D], "bias": []}}``. The
head starts at zero, so every initial reward is exactly 0 and the initial loss exactly ln 2; the
trunk receives gradient from the second update on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dpo_jax import batch_format
from dpo_jax import eval_metrics
from dpo_jax import loop
from dpo_jax import preference_data
from dpo_jax import state as state_lib
from dpo_jax.config import read_config
from dpo_jax.batch_format import BatchFormat
from dpo_jax.models import Model, moe
from dpo_jax.optim import Objective, make_update
from dpo_jax.workdir import RunDir, opens_workdir
from dpo_jax import checkpoint as ckpt_lib

Params = dict[str, Any]


class RewardModel:
    """A :class:`~dpo_jax.models.Model` plus a scalar head; same init/abstract_params/
    logical_axes interface as Model, so the shared state and checkpoint code apply unchanged."""

    def __init__(self, decoder: Model):
        self.decoder = decoder
        self.config = decoder.cfg

    def init_head(self, rng: jax.Array | None = None) -> Params:
        del rng  # zero init: see the module docstring
        dtype = jnp.dtype(self.config.param_dtype)
        return {"kernel": jnp.zeros((self.config.d_model,), dtype), "bias": jnp.zeros((), dtype)}

    def init(self, rng: jax.Array) -> Params:
        return {"decoder": self.decoder.init(rng), "value_head": self.init_head()}

    def abstract_params(self) -> Params:
        return jax.eval_shape(self.init, jax.random.key(0))

    def logical_axes(self) -> Params:
        return {"decoder": self.decoder.logical_axes(),
                "value_head": {"kernel": ("embed",), "bias": ()}}

    @staticmethod
    def head(params: Params, h_BLD: jax.Array) -> jax.Array:
        """Scalar head on hidden states, float32 ``[B, L]``."""
        hp = params["value_head"]
        return jnp.einsum("...d,d->...", h_BLD.astype(jnp.float32),
                          hp["kernel"].astype(jnp.float32)) + hp["bias"].astype(jnp.float32)

    def hidden(self, params: Params, ids_BL, positions_BL, segment_ids_BL,
               router_aux: bool = False) -> jax.Array:
        """The decoder's hidden states (``router_aux``: and its router loss, Model.hidden)."""
        return self.decoder.hidden(params["decoder"], ids_BL, positions_BL, segment_ids_BL,
                                   router_aux=router_aux)

    def score(self, params: Params, tokens_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
        """Reward ``[B]`` of right-padded rows ``prompt + response``: the head at each row's last
        masked (response) token. Tokens after that one are treated as padding."""
        B, T = tokens_BT.shape
        t = jnp.arange(T, dtype=jnp.int32)
        last = jnp.max(jnp.where(mask_BT > 0, t[None, :], 0), axis=1)
        seg = (t[None, :] <= last[:, None]).astype(jnp.int32)
        pos = jnp.broadcast_to(t, (B, T))
        h = self.hidden(params, tokens_BT, pos, seg)
        h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        return self.head(params, h_last)


def last_scored_hidden(h_RLD: jax.Array, loss_mask_RL: jax.Array, seq_index_RL=None,
                       num_seqs: int | None = None) -> jax.Array:
    """Hidden state at each sequence's last scored token: ``[R, D]`` unpacked (one sequence per
    row), ``[num_seqs, D]`` packed (slot from ``seq_index``)."""
    R, L, D = h_RLD.shape
    t = jnp.arange(L, dtype=jnp.int32)
    if seq_index_RL is None:
        last = jnp.max(jnp.where(loss_mask_RL > 0, t[None, :], 0), axis=1)
        return jnp.take_along_axis(h_RLD, last[:, None, None], axis=1)[:, 0]
    flat = (jnp.arange(R, dtype=jnp.int32)[:, None] * L + t[None, :]).reshape(-1)
    slot = jnp.where(loss_mask_RL > 0, seq_index_RL, num_seqs).reshape(-1)
    last = jax.ops.segment_max(jnp.where(slot < num_seqs, flat, -1), slot,
                               num_segments=num_seqs + 1)[:num_seqs]
    return h_RLD.reshape(R * L, D)[jnp.maximum(last, 0)]


def bradley_terry(chosen_B: jax.Array, rejected_B: jax.Array) -> jax.Array:
    """Per-pair loss ``-log sigmoid(r_w - r_l)`` (the paper's Eq. 2), float32."""
    return -jax.nn.log_sigmoid(chosen_B.astype(jnp.float32) - rejected_B.astype(jnp.float32))


def pair_rewards(model: RewardModel, params: Params, batch, fmt: BatchFormat | None = None,
                 router_aux: bool = False) -> tuple[jax.Array, ...]:
    """(r chosen, r rejected), each ``[B]``, for a pipeline batch laid out as ``fmt`` (pairs,
    packed or not; None: as its arrays say); ``router_aux`` (mixture-of-experts decoders)
    appends the forward's router load-balancing loss (float32 [])."""
    fmt = fmt or batch_format.infer(batch)
    h = model.hidden(params, batch["input_ids"], batch["positions"], batch["segment_ids"],
                     router_aux=router_aux)
    h, aux = h if router_aux else (h, None)
    seq_index, num_seqs = fmt.seq_index(batch)
    r = model.head(params, last_scored_hidden(h, batch["loss_mask"], seq_index, num_seqs))
    return (*jnp.split(r, 2), aux) if router_aux else tuple(jnp.split(r, 2))


def _sums(chosen, rejected, weights) -> dict[str, jax.Array]:
    w = weights.astype(jnp.float32)
    return {
        "loss": jnp.sum(w * bradley_terry(chosen, rejected)),
        "accuracy": jnp.sum(w * (chosen > rejected)),
        "margin": jnp.sum(w * (chosen - rejected)),
        "rewards/chosen": jnp.sum(w * chosen),
        "rewards/rejected": jnp.sum(w * rejected),
    }


def reward_objective(model: RewardModel, fmt: BatchFormat | None = None,
                     router_coef: float = 0.0) -> Objective:
    """The Bradley-Terry :class:`dpo_jax.optim.Objective`: sums over pairs divided by the whole
    batch's ``pair_weight`` total (nothing frozen). ``router_coef`` > 0 (mixture-of-experts
    decoders, ``models.moe.router_aux_coef``): each pair's loss plus ``coef * aux_loss`` of
    the forward, ``aux_loss`` logged, as the DPO step (TRL 1.16's RewardTrainer adds no router
    loss)."""

    def loss(params, frozen, batch, rng, total):
        del frozen, rng  # no frozen tree, nothing stochastic
        chosen, rejected, *aux = pair_rewards(model, params, batch, fmt, router_coef > 0)
        w = batch["pair_weight"]
        sums = _sums(chosen, rejected, w)
        if aux:
            # this micro-batch's aux weighted by its pairs (divided by the total below)
            sums["aux_loss"] = jnp.sum(w.astype(jnp.float32)) * aux[0]
            sums["loss"] = sums["loss"] + router_coef * sums["aux_loss"]
        metrics = {k: v / total for k, v in sums.items()}
        return metrics["loss"], metrics

    return Objective(loss=loss,
                     totals=lambda batch: jnp.maximum(jnp.sum(batch["pair_weight"]), 1e-9))


def make_reward_train_step(model: RewardModel, tx, schedule, on_nonfinite: str = "error",
                           grad_accum: int = 1, fmt: BatchFormat | None = None,
                           router_coef: float = 0.0):
    """``(state, batch, max_scored) -> (state, metrics)``: one Bradley-Terry update by the
    shared step builder (``grad_accum`` strided micro-batches of pairs; ``fmt``: the batches'
    layout, None = as the first batch's arrays say; ``router_coef``: :func:`reward_objective`)."""

    def train_step(state, batch, max_scored=None):
        del max_scored  # the head reads one hidden state per sequence; no LM head here
        layout = fmt or batch_format.infer(batch)
        return make_update(reward_objective(model, layout, router_coef), tx, schedule,
                           grad_accum=grad_accum, split=layout.split,
                           on_nonfinite=on_nonfinite)(state, batch)

    return train_step


def make_reward_eval_step(model: RewardModel):
    """``(params, batch) -> {name: (numerator, denominator)}`` (``dpo_jax.eval_metrics``):
    ``loss``, ``accuracy``, ``margin``, ``rewards/chosen``, ``rewards/rejected``, each a mean
    over pairs weighted by ``pair_weight``."""

    def eval_step(params, batch):
        w = batch["pair_weight"]
        return eval_metrics.over(_sums(*pair_rewards(model, params, batch), w),
                                 jnp.sum(w.astype(jnp.float32)))

    return eval_step


def init_params(model: RewardModel, shardings, sources) -> Params:
    """Decoder parameters from ``sources`` (e.g. the SFT run), a zero head."""
    decoder = state_lib.init_policy(model.decoder, shardings["decoder"], sources)
    head = jax.jit(model.init_head, out_shardings=shardings["value_head"])()
    return {"decoder": decoder, "value_head": head}


def restore_reward_model(run_dir: str, model: RewardModel, shardings) -> Params:
    """A trained reward model's params (``{"decoder", "value_head"}``) from its run directory."""
    return ckpt_lib.restore_params(run_dir, state_lib.abstract(model.abstract_params(), shardings))


@opens_workdir
def train_and_evaluate(config: ml_collections.ConfigDict, run: RunDir, *,
                       interrupt_after: int | None = None) -> dict[str, Any]:
    """Bradley-Terry reward-model training on the preference pipeline (``config.task='reward'``),
    called as ``train_and_evaluate(config, workdir)``; ``config.init.policy`` (e.g. the SFT run)
    initialises the decoder, the head starts at 0."""
    rc = read_config(config)
    model = RewardModel(Model(rc.model))
    setup = state_lib.setup(rc, model, init=init_params)
    mesh, state = setup.mesh, setup.initial_state()
    data = preference_data.preference_streams(rc, rc.train.splits, model_cfg=model.config,
                                              mesh=mesh)

    train_step = loop.jit_train_step(
        make_reward_train_step(model, setup.tx, setup.schedule, rc.train.on_nonfinite,
                               rc.optim.grad_accum, batch_format.for_run(rc.data),
                               moe.router_aux_coef(rc.loss.router_aux_loss_coef, model.config)),
        state)
    eval_step = make_reward_eval_step(model)
    return loop.train(
        run, state, cfg=rc.train, mesh=mesh, step_fn=loop.host_step(train_step, mesh, False),
        train_data=data["train"],
        evaluate=loop.evaluator(lambda s, b, n: eval_step(s.trainable, b), data.get("eval"), mesh,
                                False),
        report=lambda: {"data": {k: s.stats for k, s in data.items()}},
        interrupt_after=interrupt_after)
