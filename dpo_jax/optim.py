"""The optimizer of every task: ``OptimConfig``, ``make_optimizer`` and the one update helper.

``apply_gradients`` is the tail of every train step (DPO, SFT, reward model, PPO): global-norm
clipping and the optimizer update (both inside the optax chain), the step counter, ``grad_norm``
(of the gradients before clipping, as TRL and the paper's code report it), ``lr``, and the
non-finite guard: a step whose loss or gradient norm is not finite is flagged in
``metrics['nonfinite']`` and, with ``on_nonfinite='skip'``, leaves parameters and optimizer
state unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

NONFINITE_POLICIES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The ``optim`` block of a run config (field meanings: ``dpo_jax/config.py``)."""

    name: str = "adamw"
    lr: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 20
    b1: float = 0.9
    b2: float = 0.999
    rms_decay: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 10.0
    grad_accum: int = 1

    @classmethod
    def from_config(cls, block, defaults: str = "offline") -> "OptimConfig":
        """The ``optim`` block; a field left unset (None) takes its value from the preset
        ``defaults`` names in :data:`OPTIM_DEFAULTS`. Raises ValueError for an unknown preset."""
        if defaults not in OPTIM_DEFAULTS:
            raise ValueError(f"optim.defaults={defaults!r}: expected 'auto' or one of "
                             f"{sorted(OPTIM_DEFAULTS)}")
        preset = OPTIM_DEFAULTS[defaults]
        values = {}
        for f in dataclasses.fields(cls):
            v = block.get(f.name)
            values[f.name] = type(f.default)(preset.get(f.name, f.default) if v is None else v)
        return cls(**values)


# Starting points of the ``optim`` block (``optim.defaults``; 'auto' picks 'hf' when
# ``model.hf_path`` names a pretrained checkpoint, else 'offline'):
# * offline: the offline default's small model trained from scratch on the synthetic task;
# * hf: TRL's DPOConfig (learning_rate 1e-6) over transformers' TrainingArguments defaults
#   (AdamW betas 0.9/0.999, eps 1e-8, weight decay 0, linear decay to 0, no warmup,
#   max_grad_norm 1.0): where a user fine-tuning a pretrained checkpoint starts.
OPTIM_DEFAULTS = {
    "offline": {"name": "adamw", "lr": 1e-3, "schedule": "constant", "warmup_steps": 20,
                "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
                "max_grad_norm": 10.0},
    "hf": {"name": "adamw", "lr": 1e-6, "schedule": "linear", "warmup_steps": 0, "b1": 0.9,
           "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "max_grad_norm": 1.0},
}


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """``(tx, schedule)``: global-norm clipping, then RMSprop (the paper's recipe), AdamW or SGD,
    under linear warmup and a constant / linear / cosine decay over ``total_steps`` updates.

    Raises ValueError for an unknown ``name`` or ``schedule``."""
    warmup, lr = cfg.warmup_steps, cfg.lr

    def ramp(step):
        # The paper's code: LambdaLR(min(1, (step + 1) / (warmup + 1))), so step 0 already moves.
        return jnp.minimum(1.0, (step + 1.0) / (warmup + 1.0)) if warmup else 1.0

    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        def decay(step):
            return 1.0
    elif cfg.schedule == "linear":
        def decay(step):
            return jnp.clip(1.0 - (step - warmup) / decay_steps, 0.0, 1.0)
    elif cfg.schedule == "cosine":
        def decay(step):
            t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
            return 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r}: expected constant, linear or cosine")

    def schedule(step):
        return lr * ramp(step) * decay(step)

    if cfg.name == "rmsprop":
        # PyTorch's RMSprop (the paper's optimizer): alpha=0.99, eps added outside the sqrt.
        base = optax.rmsprop(schedule, decay=cfg.rms_decay, eps=cfg.eps, eps_in_sqrt=False)
    elif cfg.name == "adamw":
        base = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay,
                           mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    elif cfg.name == "sgd":
        base = optax.sgd(schedule)
    else:
        raise ValueError(f"optim.name={cfg.name!r}: expected rmsprop, adamw or sgd")
    parts = [base]
    if cfg.max_grad_norm > 0:
        parts.insert(0, optax.clip_by_global_norm(cfg.max_grad_norm))
    return optax.chain(*parts), schedule


def all_finite(tree) -> jax.Array:
    """bool []: every floating leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def apply_gradients(state, grads, loss, tx: optax.GradientTransformation, schedule: Callable,
                    on_nonfinite: str = "error") -> tuple[Any, dict[str, jax.Array]]:
    """One optimizer update of ``state`` (a :class:`dpo_jax.state.TrainState`).

    Returns ``(new_state, {"grad_norm", "lr", "nonfinite"})``; ``nonfinite`` is 1.0 when ``loss``,
    the gradient norm or an updated parameter is NaN/inf. With ``on_nonfinite='skip'`` such an update is dropped
    (parameters and optimizer state kept, the step counter still advances); with ``'error'`` it
    is applied and the loop stops the run before anything is checkpointed."""
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"train.on_nonfinite={on_nonfinite!r}: expected one of {NONFINITE_POLICIES}")
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    params = optax.apply_updates(state.trainable, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)
    if on_nonfinite == "skip":
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        params, opt_state = keep(params, state.trainable), keep(opt_state, state.opt_state)
    metrics = {"grad_norm": grad_norm, "lr": schedule(state.step),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return state.replace(step=state.step + 1, trainable=params, opt_state=opt_state), metrics


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a task minimises, in the form every train step accumulates.

    * ``loss(trainable, frozen, batch, rng, totals) -> (loss, metrics)``: the loss of one
      (micro-)batch as its share of the whole batch's: every sum is divided by the WHOLE
      batch's normaliser ``totals`` (so the micro-batches' losses, gradients and metrics add up
      to the whole batch's). ``trainable``: the tree differentiated (the policy, or its LoRA
      adapters); ``frozen``: the tree that is not (a reference, a LoRA base, or None); ``rng``:
      a key for stochastic layers (LoRA dropout) or None.
    * ``totals(batch)``: the whole batch's normalisers (a pytree of float32 scalars computed from
      masks and weights, no forward), handed to every micro-batch's ``loss``.
    * ``finalize(metrics, totals)``: metrics that are not sums (e.g. a perplexity), from the
      accumulated ones.
    """

    loss: Callable
    totals: Callable = lambda batch: None
    finalize: Callable = lambda metrics, totals: metrics


def whole_batch(batch, n: int, j):
    """The split of a batch that is never split: ``grad_accum`` = 1 only (ValueError else)."""
    if n != 1:
        raise ValueError(f"optim.grad_accum={n}: this task's batches cannot be split into "
                         "micro-batches; set optim.grad_accum=1")
    del j
    return batch


def accumulate(objective: Objective, grad_accum: int = 1, split: Callable = whole_batch
               ) -> Callable:
    """``grads_fn(trainable, frozen, batch, rng) -> (grads, metrics)``: the gradient of
    ``objective`` over ``batch`` w.r.t. ``trainable``, summed over ``grad_accum`` micro-batches
    ``split(batch, grad_accum, j)`` (j = 0..grad_accum-1, each with ``rng`` folded with j;
    ``rng`` None stays None) inside one ``lax.scan``; since each micro-batch's loss is its share
    of the whole batch's (:class:`Objective`), the sum equals the one-batch gradient up to
    float32 round-off. ``metrics``: the accumulated metrics through ``objective.finalize``.
    Raises ValueError for ``grad_accum`` < 1."""
    if grad_accum < 1:
        raise ValueError(f"optim.grad_accum={grad_accum}: expected an integer >= 1")
    grad_fn = jax.grad(objective.loss, has_aux=True)

    def micro_rng(rng, j):
        return None if rng is None else jax.random.fold_in(rng, j)

    def grads_fn(trainable, frozen, batch, rng=None):
        totals = objective.totals(batch)
        if grad_accum == 1:
            grads, metrics = grad_fn(trainable, frozen, batch, micro_rng(rng, 0), totals)
            return grads, objective.finalize(metrics, totals)

        def body(carry, j):
            g, m = grad_fn(trainable, frozen, split(batch, grad_accum, j), micro_rng(rng, j),
                           totals)
            return jax.tree.map(jnp.add, carry, (g, m)), None

        _, metrics_shape = jax.eval_shape(
            lambda b, r: grad_fn(trainable, frozen, b, r, totals),
            split(batch, grad_accum, 0), micro_rng(rng, 0))
        zeros = (jax.tree.map(jnp.zeros_like, trainable),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape))
        (grads, metrics), _ = jax.lax.scan(body, zeros, jnp.arange(grad_accum))
        return grads, objective.finalize(metrics, totals)

    return grads_fn


def make_update(objective: Objective, tx: optax.GradientTransformation, schedule: Callable, *,
                grad_accum: int = 1, split: Callable = whole_batch,
                on_nonfinite: str = "error") -> Callable:
    """The one step builder of every task: ``update(state, batch, rng=None) -> (state,
    metrics)``, :func:`accumulate`'s gradient of ``objective`` w.r.t. ``state.trainable``
    (with ``state.frozen``, a ``state.Frozen`` or None, as ``frozen``) followed by
    :func:`apply_gradients`; metrics are
    the objective's plus ``grad_norm``, ``lr`` and ``nonfinite``. DPO (``dpo_jax/step.py``),
    SFT, the reward model and each PPO minibatch update are this function."""
    grads_fn = accumulate(objective, grad_accum, split)

    def update(state, batch, rng=None):
        grads, metrics = grads_fn(state.trainable, state.frozen, batch, rng)
        state, update_metrics = apply_gradients(state, grads, metrics["loss"], tx, schedule,
                                                on_nonfinite)
        return state, {**metrics, **update_metrics}

    return update
