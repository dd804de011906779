"""The training loop: init or restore, jit once with shardings, step, eval, checkpoint, log.

No math lives here (see ``step.py``, ``losses.py``, ``logprobs.py``). The loop dispatches step
``n+1`` before it reads step ``n``'s metrics, so the host never stalls the device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax import data as data_lib
from dpo_jax import losses as losses_lib
from dpo_jax import sharding as shard_lib
from dpo_jax.distributed import PreemptionGuard
from dpo_jax.logprobs import LogprobConfig, max_scored_tokens
from dpo_jax.metrics import MetricWriter, Progress
from dpo_jax.models import Model, ModelConfig, preset
from dpo_jax.optim import OptimConfig, make_optimizer
from dpo_jax.state import TrainState
from dpo_jax.step import StepConfig, make_eval_step, make_train_step


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The policy's ModelConfig: from an HF directory when ``model.hf_path`` is set, else a preset."""
    m = config.model
    overrides = {k: v for k, v in m.overrides.items() if v is not None} if m.get("overrides") else {}
    overrides.update(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                     scan_layers=m.scan_layers, attention_impl=m.attention_impl or None,
                     attention_chunk=m.get("attention_chunk", 512))
    if m.get("hf_path"):
        from dpo_jax.models import hf

        return hf.load_hf_config(m.hf_path, **overrides)
    return preset(m.preset, **overrides)


def logprob_config(config) -> LogprobConfig:
    lp = config.logprobs
    return LogprobConfig(scored_only=bool(lp.scored_only), seq_chunk=lp.seq_chunk or None,
                         vocab_chunk=lp.vocab_chunk or None)


def forward_logprob_config(config) -> LogprobConfig | None:
    """The head's tiling for forward-only passes (reference, eval); None = as for training."""
    lp = config.logprobs
    seq, vocab = lp.get("forward_seq_chunk", -1), lp.get("forward_vocab_chunk", -1)
    if seq == -1 and vocab == -1:
        return None
    train = logprob_config(config)
    return dataclasses.replace(train, seq_chunk=train.seq_chunk if seq == -1 else (seq or None),
                               vocab_chunk=train.vocab_chunk if vocab == -1 else (vocab or None))


def _init_params(model: Model, source: str | None, hf_path: str | None, shardings, rng, dtype=None):
    """Params from another run's checkpoint, an HF directory, or a seeded random init."""
    cast = (lambda p: p) if dtype is None else (
        lambda p: jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, p))
    if source:
        like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            model.abstract_params(), shardings)
        params = ckpt_lib.restore_params(source, like)
    elif hf_path:
        from dpo_jax.models import hf

        params = hf.load_hf_params(hf_path, model.cfg, shardings=shardings)
    else:
        params = jax.jit(model.init, out_shardings=shardings)(rng)
    if dtype is not None:
        params = jax.jit(cast, out_shardings=shardings)(params)
    return params


class Run:
    """Everything a training run holds: mesh, model, jitted steps, state, data, sinks."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        if (not config.data.get("tokenizer") and config.data.get("source", "synthetic") != "synthetic"
                and config.model.get("hf_path")):
            # The tokenizer comes from the model's directory unless the config names another.
            config = config.copy_and_resolve_references()
            with config.unlocked():
                config.data.tokenizer = config.model.hf_path
        self.config = config
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        self.mesh = shard_lib.make_mesh(dict(config.mesh.shape))
        self.rules = tuple(tuple(r) for r in config.mesh.rules)
        self.model = Model(model_config(config))
        t = config.train
        self.total_steps = int(t.steps)
        self.step_cfg = StepConfig(grad_accum=int(config.optim.grad_accum),
                                   logprobs=logprob_config(config),
                                   forward_logprobs=forward_logprob_config(config))
        self.tx, self.schedule = make_optimizer(OptimConfig.from_config(config.optim), self.total_steps)
        self.setup_task()

        abstract = self.model.abstract_params()
        self.param_shardings = shard_lib.tree_shardings(abstract, self.model.logical_axes(), self.mesh, self.rules)
        self.state = self._init_state()

        state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self._state_shardings = state_shardings
        self._train_step = jax.jit(
            self.make_train_step(), in_shardings=(state_shardings, None),
            out_shardings=(state_shardings, None), donate_argnums=0, static_argnums=2,
        )
        self._eval_step = jax.jit(self.make_eval_step(), static_argnums=3)

        self.train_data = self.build_data("train", int(t.batch_size))
        self.eval_data = None
        if t.eval_every:
            self.eval_data = self.build_data("eval", int(t.eval_batch_size or t.batch_size))
        self.checkpoint_every = int(t.checkpoint_every or 0)
        self.checkpointer = ckpt_lib.Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=int(t.keep_checkpoints), async_save=bool(t.async_checkpointing))
        self.writer = MetricWriter(workdir)
        self.reference_info = None
        if config.logprobs.get("precompute_reference") and losses_lib.needs_reference(self.loss_cfg):
            self._precompute_reference()
        self._restore()

    # ------------------------------------------------------------------- task hooks
    # A task (DPO here; SFT, reward modelling, ... in subclasses) supplies its loss config,
    # steps and data; the loop, sharding, checkpoints and metrics are shared.
    def setup_task(self) -> None:
        self.loss_cfg = losses_lib.loss_config_from(self.config.loss)

    def needs_reference(self) -> bool:
        return losses_lib.needs_reference(self.loss_cfg) and not self.config.logprobs.get(
            "precompute_reference")

    def make_train_step(self):
        """``(state, batch, num_scored) -> (state, metrics)``; jitted once by the Run."""
        return make_train_step(self.model, self.loss_cfg, self.tx, self.schedule, self.step_cfg)

    def make_eval_step(self):
        """``(params, ref_params, batch, num_scored) -> weighted sums incl. 'weight'``."""
        return make_eval_step(self.model, self.loss_cfg, self.step_cfg)

    def build_data(self, split: str, global_batch_size: int):
        return data_lib.build_pipeline(
            self.config.data, split=split, global_batch_size=global_batch_size,
            process_index=jax.process_index(), process_count=jax.process_count(),
            seed=int(self.config.seed))

    # ----------------------------------------------------------------------------- state
    def _init_state(self) -> TrainState:
        cfg = self.config
        rng_policy = jax.random.key(int(cfg.seed))
        params = _init_params(self.model, cfg.init.policy, cfg.model.get("hf_path"),
                              self.param_shardings, rng_policy)
        ref_params = self._reference_params(params) if self.needs_reference() else None
        # Moments get their parameters' shardings and scalar counters are replicated. Said
        # explicitly: a moment does not depend on its parameter's values, so jit would not
        # propagate the sharding (FSDP would then hold every moment whole on every device).
        replicated = shard_lib.replicated(self.mesh)
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, params), self.param_shardings,
            transform_non_params=lambda _: replicated)
        opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), shard_lib.replicated(self.mesh))
        return TrainState(step=step, params=params, ref_params=ref_params, opt_state=opt_state)

    def _reference_params(self, params):
        """The frozen reference: a cast copy of the initial policy, or its own source."""
        cfg = self.config
        ref_dtype = jnp.dtype(cfg.model.ref_param_dtype) if cfg.model.ref_param_dtype else None
        if not cfg.init.reference and not cfg.model.get("ref_hf_path"):
            return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(ref_dtype or x.dtype), p),
                           out_shardings=self.param_shardings)(params)
        return _init_params(self.model, cfg.init.reference, cfg.model.get("ref_hf_path"),
                            self.param_shardings, jax.random.key(int(cfg.seed)), ref_dtype)

    def _precompute_reference(self) -> None:
        """Reference log-probs once over the data (dpo_jax/reference.py); the reference params
        live only for this call, before a restore replaces the initial policy."""
        from dpo_jax import reference

        cfg = self.config
        ref_params = self._reference_params(self.state.params)
        source = dict(policy=cfg.init.policy, hf_path=cfg.model.get("hf_path"),
                      reference=cfg.init.reference, ref_hf_path=cfg.model.get("ref_hf_path"))
        self.reference_info = reference.precompute_for_run(self, ref_params, source)
        del ref_params

    def _restore(self) -> None:
        self.start_step = 0
        latest = self.checkpointer.latest_step()
        if latest is None:
            return
        params, opt_state, data_state = self.checkpointer.restore(
            latest, self.state.params, self.state.opt_state)
        step = jax.device_put(jnp.asarray(latest, jnp.int32), shard_lib.replicated(self.mesh))
        self.state = self.state.replace(step=step, params=params, opt_state=opt_state)
        self.train_data.load_state_dict(data_state)
        self.start_step = latest
        self.writer.truncate_after(latest)
        logging.info("resumed from %s at step %d", self.checkpointer.directory, latest)

    # ------------------------------------------------------------------------------ steps
    def _device_batch(self, batch_np: dict[str, np.ndarray]):
        num_scored = None
        if self.step_cfg.logprobs.scored_only:
            num_scored = max_scored_tokens(batch_np["loss_mask"])
            if jax.process_count() > 1:  # every process must compile the same program
                from jax.experimental import multihost_utils

                num_scored = int(np.max(multihost_utils.process_allgather(np.asarray(num_scored))))
        shardings = shard_lib.batch_shardings(batch_np, self.mesh)
        return data_lib.to_global(batch_np, shardings), num_scored

    def evaluate(self) -> dict[str, float]:
        """Weighted means over every held-out pair (padding pairs weigh 0)."""
        totals: dict[str, float] = {}
        for batch_np in self.eval_data:
            batch, num_scored = self._device_batch(batch_np)
            sums = jax.device_get(self._eval_step(self.state.params, self.state.ref_params, batch, num_scored))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        weight = max(totals.pop("weight", 0.0), 1e-9)
        return {k: v / weight for k, v in totals.items()}

    def train(self) -> dict[str, Any]:
        """Run to ``train.steps`` (or until SIGTERM: then checkpoint at a step every process
        agrees on, and return with ``summary['stopped_at']`` set)."""
        guard = PreemptionGuard(self.mesh)
        try:
            return self._train(guard)
        finally:
            guard.close()

    def _train(self, guard: PreemptionGuard) -> dict[str, Any]:
        t0 = time.time()
        progress = Progress(self.total_steps, self.start_step)
        log_every = max(1, int(self.config.train.log_every))
        eval_every = int(self.config.train.eval_every or 0)
        pending = None  # (step, device metrics, tokens): read one step late
        last_train: dict[str, Any] = {}
        last_eval: dict[str, float] = {}
        compile_s = None
        data_iter = iter(self.train_data)
        stopped_at = None  # SIGTERM (TPU maintenance, SLURM preemption): the agreed stop step

        def flush(item):
            step, metrics_dev, tokens = item
            metrics = jax.device_get(metrics_dev)
            progress.update(step, tokens)
            tps, _ = progress.rates()
            record = dict(metrics, tokens_per_s=tps)
            if step % log_every == 0 or step == self.total_steps:
                self.writer.write(step, record)
                if jax.process_index() == 0:
                    logging.info(progress.line(step, metrics))
            return record

        for step in range(self.start_step, self.total_steps):
            batch_np = next(data_iter)
            tokens = int(np.sum(batch_np["segment_ids"] > 0)) * jax.process_count()
            batch, num_scored = self._device_batch(batch_np)
            t_step = time.time()
            self.state, metrics = self._train_step(self.state, batch, num_scored)
            if pending is not None:
                last_train = flush(pending)
            elif compile_s is None:
                jax.block_until_ready(metrics)
                compile_s = time.time() - t_step
            pending = (step + 1, metrics, tokens)
            done = step + 1
            stop = guard.should_stop() and done < self.total_steps
            if eval_every and (done % eval_every == 0 or done == self.total_steps):
                last_train = flush(pending)
                pending = None
                last_eval = self.evaluate()
                self.writer.write(done, last_eval, prefix="eval/")
                if jax.process_index() == 0:
                    logging.info("eval step %d: %s", done, _short(last_eval))
            if stop or done == self.total_steps or (self.checkpoint_every and done % self.checkpoint_every == 0):
                if pending is not None:  # a checkpoint never runs ahead of the metrics log
                    last_train = flush(pending)
                    pending = None
                self.checkpointer.save(done, self.state.params, self.state.opt_state,
                                       self.train_data.state_dict())
            if stop:
                stopped_at = done
                logging.warning("SIGTERM: checkpointed step %d, stopping; rerun to resume", done)
                break
        if pending is not None:
            last_train = flush(pending)
        self.checkpointer.close()
        self.writer.close()
        summary = {
            "steps": self.total_steps,
            "resumed_from": self.start_step,
            "stopped_at": stopped_at,  # step of the preemption checkpoint (None: ran to the end)
            "wall_s": round(time.time() - t0, 1),
            "compile_s": None if compile_s is None else round(compile_s, 1),
            "final_train": {k: float(np.asarray(v)) for k, v in last_train.items()},
            "final_eval": last_eval,
            "data": _jsonable(getattr(self.train_data, "stats", {})),
        }
        if jax.process_index() == 0:
            with open(os.path.join(self.workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary


def _short(metrics: dict[str, float]) -> str:
    keys = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return str(x)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    run = Run(config, workdir)
    return run.train()
