"""PPO math for RLHF as in Ziegler et al. (2019) / Stiennon et al. (2020): pure jnp functions.

Everything here works on completion-aligned ``[B, N]`` arrays: column ``i`` is the ``i``-th
generated token of a row and ``mask_BN`` is 1 on a prefix of each row (the tokens up to and
including EOS). Why separate from the step: each formula is small enough to check against a
direct loop in a test, and the step only wires them together.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of ``x`` over entries where ``mask`` is 1 (0 when nothing is masked in)."""
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1e-8)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance over masked-in entries (Bessel-corrected, as the standard recipe's whiten)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = jnp.sum(mask)
        var = var * n / jnp.maximum(n - 1, 1)
    return var


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / std over the masked entries; advantages are whitened per rollout batch so
    the policy step size does not depend on the reward scale (Ziegler et al.'s recipe)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty_rewards(logp_BN: jax.Array, ref_logp_BN: jax.Array, score_B: jax.Array,
                       mask_BN: jax.Array, kl_coef) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards ``-beta * (log pi - log pi_ref)``, plus the sequence score on its last
    token. Returns (rewards [B, N], per-token KL estimate [B, N]). Zero penalty when pi = ref."""
    kl = (logp_BN - ref_logp_BN) * mask_BN
    rewards = -kl_coef * kl
    last = jnp.maximum(jnp.sum(mask_BN, axis=1).astype(jnp.int32) - 1, 0)
    has_tokens = jnp.sum(mask_BN, axis=1) > 0
    bonus = jax.nn.one_hot(last, mask_BN.shape[1], dtype=rewards.dtype) * jnp.where(
        has_tokens, score_B, 0.0)[:, None]
    return rewards + bonus, kl


def gae(rewards_BN: jax.Array, values_BN: jax.Array, mask_BN: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's completion.

    ``delta_i = r_i + gamma V_{i+1} - V_i`` with ``V`` beyond the last token taken as 0 (the
    episode ends there), ``A_i = delta_i + gamma lam A_{i+1}``. Returns (advantages, returns =
    advantages + values), both 0 outside the mask.
    """
    values = values_BN * mask_BN
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = (rewards_BN + gamma * next_values - values) * mask_BN

    def step(carry, x):
        delta, m = x
        adv = (delta + gamma * lam * carry) * m
        return adv, adv

    _, adv_NB = jax.lax.scan(step, jnp.zeros(rewards_BN.shape[0], rewards_BN.dtype),
                             (deltas.T, mask_BN.T), reverse=True)
    adv = adv_NB.T
    return adv, (adv + values) * mask_BN


def policy_loss(logp_BN: jax.Array, old_logp_BN: jax.Array, adv_BN: jax.Array,
                mask_BN: jax.Array, clip: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate ``mean(max(-A r, -A clip(r, 1-eps, 1+eps)))`` over masked tokens.

    Where the clipped term is the larger one (ratio outside the range on the side that would
    keep improving the objective), the gradient is exactly zero."""
    log_ratio = (logp_BN - old_logp_BN) * mask_BN
    ratio = jnp.exp(log_ratio)
    unclipped = -adv_BN * ratio
    clipped = -adv_BN * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask_BN)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask_BN),
        "approx_kl": 0.5 * masked_mean(log_ratio ** 2, mask_BN),
    }
    return loss, stats


def value_loss(values_BN: jax.Array, old_values_BN: jax.Array, returns_BN: jax.Array,
               mask_BN: jax.Array, clip: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``0.5 mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2))``: the value
    function may not move further than ``eps`` from its rollout-time value per update."""
    clipped_values = old_values_BN + jnp.clip(values_BN - old_values_BN, -clip, clip)
    l1 = (values_BN - returns_BN) ** 2
    l2 = (clipped_values - returns_BN) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(l1, l2), mask_BN)
    return loss, {"vf_clipfrac": masked_mean((l2 > l1).astype(jnp.float32), mask_BN)}


def entropy(logits_BNV: jax.Array, mask_BN: jax.Array) -> jax.Array:
    """Mean per-token entropy of the (untempered) policy over masked tokens."""
    logp = jax.nn.log_softmax(logits_BNV.astype(jnp.float32), axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return masked_mean(ent, mask_BN)


def explained_variance(values_BN: jax.Array, returns_BN: jax.Array, mask_BN: jax.Array) -> jax.Array:
    """``1 - Var(R - V) / Var(R)`` over masked tokens: 1 for a perfect value function."""
    return 1.0 - masked_var(returns_BN - values_BN, mask_BN) / jnp.maximum(
        masked_var(returns_BN, mask_BN), 1e-8)


@dataclasses.dataclass
class KLController:
    """The KL coefficient beta. Fixed, or adaptive (Ziegler et al. 2019, Section 2.2):

    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta (1 + e * n_steps / horizon)``,
    where ``n_steps`` is the number of episodes in the rollout batch the KL was measured on.
    Host-side state (one float), saved as its own item of each checkpoint.
    """

    value: float
    target: float | None = None  # None: fixed coefficient
    horizon: int = 10000

    def state_dict(self) -> dict:
        return {"kl_coef": float(self.value)}

    def load_state_dict(self, state) -> None:
        self.value = float(state["kl_coef"])

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
