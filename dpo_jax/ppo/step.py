"""The PPO update: pure functions, jitted once by the PPO task with shardings.

``make_ppo_step`` returns ``train_step(state, batch, max_scored=None) -> (state, metrics)`` (the
same signature as the DPO step, so ``loop.jit_train_step`` jits it). One call is one PPO
iteration on one rollout batch (Ziegler et al. 2019; Stiennon et al. 2020):

1. forward passes of the policy (log-probs, values: the rollout-time "old" quantities) and of the
   frozen reference over the sampled sequences;
2. per-token rewards ``-beta KL_t`` plus the reward score on the last token; GAE; whitening;
3. ``epochs`` passes of ``minibatches`` clipped policy + value updates, rows reshuffled per epoch.

``state.trainable`` is ``{"decoder", "value_head"}`` (policy and value function share the
trunk); ``state.frozen.reference`` is the frozen reference decoder. The batch holds the rollout:
``tokens [B, T]``, ``completion_mask [B, T]``, ``prompt_lengths [B]``, ``scores [B]`` and the
scalar ``kl_coef``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpo_jax import eval_metrics
from dpo_jax.batch_format import BatchFormat
from dpo_jax.models import project
from dpo_jax.optim import Objective, make_update
from dpo_jax.ppo import core
from dpo_jax.ppo.config import PPOConfig  # noqa: F401  (re-exported: ppo.step.PPOConfig)
from dpo_jax.train_state import TrainState


def completion_view(batch, n: int):
    """Indices of the hidden states that predict each completion token, the tokens, the mask:
    each ``[B, N]`` (completion token i of row b sits at column ``prompt_len_b + i``)."""
    i = jnp.arange(n, dtype=jnp.int32)[None, :]
    cols = batch["prompt_lengths"].astype(jnp.int32)[:, None] + i
    tokens = jnp.take_along_axis(batch["tokens"], cols, axis=1)
    mask = jnp.take_along_axis(batch["completion_mask"], cols, axis=1).astype(jnp.float32)
    return cols - 1, tokens, mask


def _hidden(decoder, dparams, batch):
    tokens = batch["tokens"]
    B, T = tokens.shape
    t = jnp.arange(T, dtype=jnp.int32)
    real = batch["prompt_lengths"][:, None] + jnp.sum(batch["completion_mask"] > 0, axis=1)[:, None]
    seg = (t[None, :] < real).astype(jnp.int32)
    return decoder.hidden(dparams, tokens, jnp.broadcast_to(t, (B, T)), seg)


def forward(model, params, batch, n: int, with_values: bool = True, detach_value: bool = False):
    """(token log-probs [B, N], values [B, N] or None, logits [B, N, V]) of the completions.

    ``model`` is a RewardModel-style wrapper when ``with_values``; else a plain decoder Model
    and ``params`` its params (the reference)."""
    decoder = model.decoder if with_values else model
    dparams = params["decoder"] if with_values else params
    idx, targets, _ = completion_view(batch, n)
    h = _hidden(decoder, dparams, batch)
    h_BND = jnp.take_along_axis(h, idx[..., None], axis=1)
    logits = project(h_BND, *decoder.unembedding(dparams, caller_applies_softcap=True),
                     softcap=decoder.cfg.final_logit_softcap)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
    h_value = jax.lax.stop_gradient(h_BND) if detach_value else h_BND
    values = model.head(params, h_value) if with_values else None
    return logp, values, logits


ROLLOUT = BatchFormat("rollout")


def ppo_objective(model, cfg: PPOConfig) -> Objective:
    """The clipped policy + value loss of one minibatch as a :class:`dpo_jax.optim.Objective`:
    every masked mean (losses and statistics) is a masked sum over the WHOLE minibatch's
    completion tokens, so micro-batches add up to it."""
    n = cfg.max_new_tokens

    def loss(params, frozen, mb, rng, total):
        del frozen, rng  # the reference is read before the updates; nothing stochastic
        logp, values, logits = forward(model, params, mb, n, detach_value=cfg.detach_value_head)
        mask = mb["mask"]
        share = jnp.sum(mask) / total  # this micro-batch's part of the minibatch's tokens
        pg, pg_stats = core.policy_loss(logp, mb["old_logp"], mb["advantages"], mask, cfg.clip)
        vf, vf_stats = core.value_loss(values, mb["old_values"], mb["returns"], mask, cfg.vf_clip)
        stats = {"policy/loss": pg, "value/loss": vf,
                 "policy/entropy": core.entropy(jax.lax.stop_gradient(logits), mask),
                 "policy/clipfrac": pg_stats["clipfrac"], "policy/approx_kl": pg_stats["approx_kl"],
                 "value/clipfrac": vf_stats["vf_clipfrac"]}
        stats = {k: v * share for k, v in stats.items()}
        out = stats["policy/loss"] + cfg.vf_coef * stats["value/loss"]
        return out, {**stats, "loss": out}

    return Objective(loss=loss, totals=lambda mb: jnp.maximum(jnp.sum(mb["mask"]), 1e-8))


def make_ppo_step(model, tx, schedule, cfg: PPOConfig, on_nonfinite: str = "error",
                  grad_accum: int = 1):
    """PPO iteration as one function; see the module docstring. ``schedule`` counts optimizer
    updates (``epochs * minibatches`` per iteration); ``on_nonfinite``: see
    :func:`dpo_jax.optim.apply_gradients` (applied per minibatch update). Each minibatch update
    is the shared step builder's (:func:`dpo_jax.optim.make_update`), accumulating
    ``grad_accum`` strided micro-batches of its rows."""
    n = cfg.max_new_tokens
    minibatch_update = make_update(ppo_objective(model, cfg), tx, schedule,
                                   grad_accum=grad_accum, split=ROLLOUT.split,
                                   on_nonfinite=on_nonfinite)

    def train_step(state: TrainState, batch, max_scored=None):
        del max_scored
        B = batch["tokens"].shape[0]
        if B % cfg.minibatches:
            raise ValueError(f"rollout batch {B} not divisible by {cfg.minibatches} minibatches")
        _, _, mask = completion_view(batch, n)
        old_logp, old_values, _ = jax.lax.stop_gradient(forward(model, state.trainable, batch, n))
        ref_logp, _, _ = jax.lax.stop_gradient(
            forward(model.decoder, state.frozen.reference, batch, n, with_values=False))
        rewards, kl = core.kl_penalty_rewards(old_logp, ref_logp, batch["scores"], mask,
                                              batch["kl_coef"])
        adv, returns = core.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = core.whiten(adv, mask)
        rollout = dict(batch, mask=mask, old_logp=old_logp, old_values=old_values * mask,
                       advantages=adv, returns=returns)
        del rollout["kl_coef"], rollout["scores"]

        rng = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
        perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(rng, e), B))(
            jnp.arange(cfg.epochs))
        mb_rows = perms.reshape(cfg.epochs * cfg.minibatches, B // cfg.minibatches)

        def update(carry, rows):
            mb = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), rollout)
            carry, stats = minibatch_update(carry, mb)
            del stats["loss"]  # policy/loss + vf_coef * value/loss, logged as its terms
            return carry, stats

        inner = TrainState(step=state.step * cfg.epochs * cfg.minibatches,
                           trainable=state.trainable, opt_state=state.opt_state)
        inner, stats = jax.lax.scan(update, inner, mb_rows)
        params, opt_state = inner.trainable, inner.opt_state
        metrics = {k: jnp.max(v) if k == "nonfinite" else jnp.mean(v) for k, v in stats.items()}
        seq_kl = jnp.sum(kl, axis=1)
        metrics.update({
            "env/reward_mean": jnp.mean(batch["scores"]),
            "env/reward_std": jnp.std(batch["scores"]),
            "objective/kl": jnp.mean(seq_kl),
            "objective/kl_coef": batch["kl_coef"],
            "objective/non_score_reward": jnp.mean(jnp.sum(rewards * mask, axis=1) - batch["scores"]),
            "value/explained_variance": core.explained_variance(old_values, returns, mask),
            "value/mean": core.masked_mean(old_values, mask),
            "returns/mean": core.masked_mean(returns, mask),
            "completion/length": jnp.mean(jnp.sum(mask, axis=1)),
            # prompt + completion tokens of this rollout batch (compute accounting)
            "rollout/tokens": jnp.sum(batch["prompt_lengths"]) + jnp.sum(mask),
        })
        new_state = state.replace(step=state.step + 1, trainable=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_ppo_eval_step(model, n: int):
    """``(trainable, frozen, batch, max_scored) -> {name: (numerator, denominator)}``
    (``dpo_jax.eval_metrics``) of the state's ``trainable`` and ``frozen.reference``, each a mean over rollouts weighted by ``weight``: reward,
    sequence KL (sum over the completion of log pi - log pi_ref) and length of sampled
    completions, for the reward/KL frontier."""

    def eval_step(trainable, frozen, batch, max_scored=None):
        del max_scored
        _, _, mask = completion_view(batch, n)
        logp, _, _ = forward(model, trainable, batch, n)
        ref_logp, _, _ = forward(model.decoder, frozen.reference, batch, n, with_values=False)
        w = batch["weight"].astype(jnp.float32)
        return eval_metrics.over({"reward": jnp.sum(w * batch["scores"]),
                                  "kl": jnp.sum(w * jnp.sum((logp - ref_logp) * mask, axis=1)),
                                  "length": jnp.sum(w * jnp.sum(mask, axis=1))}, jnp.sum(w))

    return eval_step
