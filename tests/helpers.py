"""The one shared test helper: a tiny model, its state and optimizer, real batches, run configs.

Step tests call the pure step functions (``dpo_jax.step.make_train_step`` / ``make_eval_step``)
directly with what these builders return; end-to-end tests start from :func:`small_config`.

    model = tiny_model()
    params = init_params(model, seed=0)
    tx, schedule = optimizer(name="sgd", lr=1.0)
    state = train_state(model, params, tx, ref_params=init_params(model, seed=1))
    pairs = synthetic_pairs(8)
    batch, max_scored = device_batch(pair_batch(pairs))

Everything is small enough that one jitted step compiles and runs in about a second on CPU.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dpo_jax import losses as losses_lib
from dpo_jax import sharding as shard_lib
from dpo_jax.config import base_config
from dpo_jax.data import PreferencePipeline, default_data_config, to_global
from dpo_jax.data.synthetic import SyntheticTask, make_pairs
from dpo_jax.logprobs import LogprobConfig, max_scored_tokens
from dpo_jax.models import Model, ModelConfig
from dpo_jax.models.config import preset
from dpo_jax.optim import OptimConfig, make_optimizer
from dpo_jax.state import TrainState, create_state, param_shardings
from dpo_jax.step import StepConfig

# ----------------------------------------------------------------------------- run configs


def small_config(**train_overrides):
    """``base_config()`` with a 2-layer model, 4 steps of 16 pairs, no eval, no checkpoints,
    a metrics record every step and a 64-pair eval split; ``train_overrides`` set
    ``config.train`` fields (e.g. ``steps=6, checkpoint_every=2``)."""
    c = base_config()
    c.model.overrides.n_layer = 2
    c.train.steps = 4
    c.train.batch_size = 16
    c.train.eval_every = 0
    c.train.log_every = 1
    c.train.checkpoint_every = 0
    c.train.async_checkpointing = False
    c.data.eval_size = 64
    for k, v in train_overrides.items():
        c.train[k] = v
    return c


# ----------------------------------------------------------------------------- model and state


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """The ``tiny-gpt2`` preset (2 layers, d_model 32, 4 heads, vocab 128 = the synthetic
    task's, 64 positions), float32; ``overrides`` replace ModelConfig fields."""
    return preset("tiny-gpt2", **overrides)


def tiny_model(**overrides: Any) -> Model:
    return Model(tiny_model_config(**overrides))


def init_params(model: Model, seed: int = 0):
    """Seeded random parameters of ``model`` on the default device (unsharded)."""
    return jax.jit(model.init)(jax.random.key(seed))


def perturbed(params, scale: float = 0.02, seed: int = 1):
    """``params`` plus float32 normal noise of std ``scale`` on every leaf, drawn on the host:
    a second model (e.g. a reference that differs from the policy) without another init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + rng.normal(0.0, scale, np.shape(x)).astype(np.asarray(x).dtype), params)


def optimizer(total_steps: int = 10, **fields: Any):
    """``(tx, schedule)`` from ``OptimConfig(**fields)``; the defaults here make the update
    easy to compute by hand: SGD, lr 1, no warmup, no clipping."""
    fields = {"name": "sgd", "lr": 1.0, "warmup_steps": 0, "max_grad_norm": 0.0, **fields}
    return make_optimizer(OptimConfig(**fields), total_steps)


def mesh(shape: dict[str, int] | None = None):
    """A ('data', 'fsdp', 'tensor') mesh over the 8 fake CPU devices (default: all on data)."""
    return shard_lib.make_mesh(shape or {"data": -1, "fsdp": 1, "tensor": 1})


def train_state(model: Model, params, tx, ref_params=None, mesh_=None) -> TrainState:
    """A step-0 TrainState built by ``dpo_jax.state.create_state`` on ``mesh_`` (default
    :func:`mesh`), parameters placed in their shardings."""
    mesh_ = mesh_ if mesh_ is not None else mesh()
    shardings = param_shardings(model, mesh_, shard_lib.DEFAULT_RULES)
    params = jax.device_put(params, shardings)
    if ref_params is not None:
        ref_params = jax.device_put(ref_params, shardings)
    return create_state(params, tx, mesh_, shardings, ref_params=ref_params)


def step_config(grad_accum: int = 1, forward_logprobs: LogprobConfig | None = None,
                **logprob_fields: Any) -> StepConfig:
    """``StepConfig`` with ``LogprobConfig(**logprob_fields)`` for the training head."""
    return StepConfig(grad_accum=grad_accum, logprobs=LogprobConfig(**logprob_fields),
                      forward_logprobs=forward_logprobs)


def loss_config(name: str = "sigmoid", **options: Any) -> losses_lib.LossConfig:
    """A validated LossConfig: ``loss_config(beta=0.5)``, ``loss_config('ipo', beta=0.5)``."""
    block = losses_lib.default_loss_config()
    block.name = name
    for k, v in options.items():
        block[k] = v
    return losses_lib.loss_config_from(block)


# ----------------------------------------------------------------------------- data


def synthetic_pairs(num_pairs: int, seed: int = 0, task: SyntheticTask | None = None):
    """Tokenised pairs ``{prompt, chosen, rejected}`` (int32, EOS ending each response) of the
    synthetic task (``dpo_jax/data/synthetic.py``; vocabulary 128 by default)."""
    return make_pairs(task or SyntheticTask(), num_pairs, seed)


def data_config(**fields: Any):
    """``default_data_config()`` (the synthetic source) with ``fields`` set."""
    c = default_data_config()
    for k, v in fields.items():
        c[k] = v
    return c


def pipeline(pairs, batch_size: int | None = None, *, train: bool = False, seed: int = 0,
             **data_fields: Any) -> PreferencePipeline:
    """The real ``PreferencePipeline`` over ``pairs`` (one process). Eval (default): one pass in
    order, the last batch padded with ``pair_weight`` 0 pairs; train: shuffled, full batches."""
    return PreferencePipeline(list(pairs), data_config(**data_fields), train=train,
                              global_batch_size=batch_size or len(pairs), seed=seed,
                              pad_id=0)


def pair_batch(pairs, batch_size: int | None = None, **data_fields: Any) -> dict[str, np.ndarray]:
    """The first eval batch of ``pairs`` as the pipeline builds it (numpy, ARCHITECTURE.md
    layout); with the default ``batch_size`` (all pairs) no pair is padding."""
    return next(iter(pipeline(pairs, batch_size, **data_fields)))


def device_batch(batch_np: dict[str, np.ndarray], mesh_=None):
    """``(batch, max_scored)``: the numpy batch as global arrays sharded over ``mesh_``'s batch
    axes (default :func:`mesh`; rows must divide by its data x fsdp size) and the static bound
    on scored tokens per row that the step takes."""
    mesh_ = mesh_ if mesh_ is not None else mesh()
    batch = to_global(batch_np, shard_lib.batch_shardings(batch_np, mesh_))
    return batch, max_scored_tokens(batch_np["loss_mask"])


def leaves(tree) -> list[np.ndarray]:
    """The leaves of a pytree as host numpy arrays (for exact / allclose comparisons)."""
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def global_norm(tree) -> float:
    """float64 global L2 norm of a pytree (host side)."""
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves(tree))))
