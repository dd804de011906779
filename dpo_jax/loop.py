"""The one training loop of every task: step, one-step-late metrics, eval, checkpoint, resume.

A task builds its state, a step function and its data, then calls :func:`train`. The loop
owns what surrounds the numbers: restoring the newest checkpoint that restores (and the batch
stream's position and any other host state), cutting the metrics log back to it, dispatching
step ``n+1`` before reading step ``n``'s metrics (the host never stalls the device), evaluation
every ``eval_every`` steps, checkpoints every ``checkpoint_every`` steps and at the end, the
SIGTERM guard (all processes stop at one agreed step, checkpointed), the non-finite guard
(``train.on_nonfinite``) and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax import eval_metrics
from dpo_jax import sharding as shard_lib
from dpo_jax.config import TrainConfig
from dpo_jax.distributed import PreemptionGuard
from dpo_jax.logprobs import max_scored_tokens
from dpo_jax.metrics import MetricWriter, Progress
from dpo_jax.optim import all_finite
from dpo_jax.workdir import RunDir, write_summary
from dpo_jax.data import to_global


class Interrupted(Exception):
    """Raised by :func:`train` when ``interrupt_after`` is reached (a simulated crash)."""


class NonFiniteError(FloatingPointError):
    """A train step produced a non-finite loss, gradient or parameter."""


class LogWindow:
    """Training metrics since the last logged step: a logged record is their mean (as TRL logs
    with ``logging_steps`` > 1), and the count of skipped non-finite updates. Saved with every
    checkpoint (item ``loop``), so a resumed run logs exactly what an uninterrupted one does."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0
        self.skipped_updates = 0

    def add(self, record: Mapping[str, float]) -> None:
        for k, v in record.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def pop_mean(self) -> dict[str, float]:
        mean = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return mean

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count,
                "skipped_updates": self.skipped_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums = {k: float(v) for k, v in state["sums"].items()}
        self.count, self.skipped_updates = int(state["count"]), int(state["skipped_updates"])


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def device_batch(batch_np: Mapping[str, np.ndarray], mesh, scored_only: bool):
    """A host batch as global arrays on ``mesh``, and its static bound on scored tokens per
    row (None unless ``scored_only``): the same on every process, so all compile one program.
    Token arrays are padded to a multiple of the mesh's context axis
    (``sharding.pad_for_context``: unscored segment-0 columns, the numbers unchanged)."""
    batch_np = shard_lib.pad_for_context(batch_np, mesh)
    bound = None
    if scored_only:
        bound = max_scored_tokens(batch_np["loss_mask"])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            bound = int(np.max(multihost_utils.process_allgather(np.asarray(bound))))
    return to_global(batch_np, shard_lib.batch_shardings(batch_np, mesh)), bound


def jit_train_step(step, state):
    """``step(state, batch, max_scored)`` jitted with ``state``'s shardings in and out, the
    state donated and the bound static: compiled once per batch shape."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None),
                   donate_argnums=0, static_argnums=2)


def host_step(train_step, mesh, scored_only: bool):
    """``step_fn(state, host_batch)`` for :func:`train`: the batch moved onto ``mesh``."""
    return lambda state, batch_np: train_step(state, *device_batch(batch_np, mesh, scored_only))


def eval_totals(eval_step, batches, mesh, scored_only: bool, per_example=None):
    """``state -> Totals``: the (numerator, denominator) pairs of
    ``eval_step(state, batch, max_scored)`` summed over ``batches``
    (:func:`dpo_jax.eval_metrics.totals`); None when ``batches`` is None. Outputs are
    replicated, so per-example arrays (``eval_metrics.PER_EXAMPLE``) reach every process whole;
    ``per_example(batches)`` gives their sink for ``batches`` (None: dropped)."""
    if batches is None:
        return None
    jitted = jax.jit(eval_step, static_argnums=2, out_shardings=shard_lib.replicated(mesh))
    sink = None if per_example is None else per_example(batches)
    return lambda state: eval_metrics.totals(
        lambda b: jitted(state, *device_batch(b, mesh, scored_only)), batches, sink)


def evaluator(eval_step, batches, mesh, scored_only: bool,
              derived: eval_metrics.Derived | None = None):
    """``evaluate(state)`` for :func:`train`: each metric's summed numerator over its summed
    denominator (:func:`dpo_jax.eval_metrics.means`) of ``eval_step(state, batch, max_scored)
    -> {name: (numerator, denominator)}`` over ``batches``, plus ``derived(means)``; None when
    ``batches`` is None (no evaluation)."""
    totals_of = eval_totals(eval_step, batches, mesh, scored_only)
    if totals_of is None:
        return None
    return lambda state: eval_metrics.means(totals_of(state), derived)


_all_finite = jax.jit(all_finite)


def _short(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in list(metrics.items())[:6])


def host_floats(metrics) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def train(run: RunDir, state, *, cfg: TrainConfig, mesh, step_fn: Callable,
          train_data: Stateful, evaluate: Callable[[Any], dict[str, float]] | None = None,
          host_states: Mapping[str, Stateful] | None = None,
          count_tokens: Callable[[Mapping[str, np.ndarray]], int] | None = None,
          report: Callable[[], dict] | None = None,
          interrupt_after: int | None = None, save_reference: bool = False) -> dict[str, Any]:
    """Train ``state`` to ``cfg.steps`` updates; returns the summary written to summary.json.

    ``step_fn(state, host_batch) -> (state, metrics)`` does one update (metrics may stay on
    device; they are read one step late). ``train_data`` yields host batches and is saved with
    every checkpoint as the ``data`` item, each of ``host_states`` as its own item.
    ``evaluate(state) -> {name: value}`` runs every ``cfg.eval_every`` steps and at the end.
    ``report()`` adds entries to the summary (data statistics, ...). ``interrupt_after=n``
    simulates a crash right after step ``n`` is dispatched and step ``n-1``'s metrics are logged
    (so the log may run past the newest checkpoint): nothing more is logged or saved and
    :class:`Interrupted` is raised (the resume tests use it). ``save_reference``: the step
    changes ``state.frozen.reference`` (TR-DPO), so it is checkpointed (item ``ref_params``) and
    restored with the rest.

    Raises NonFiniteError (``cfg.on_nonfinite='error'``) at the first step whose loss, gradient
    norm or updated parameters are not finite, before any checkpoint of that state;
    CheckpointError when no existing checkpoint restores."""
    t0 = time.time()
    window = LogWindow()
    items = {"data": train_data, **dict(host_states or {}), "loop": window}
    checkpointer = ckpt_lib.Checkpointer(run.file("checkpoints"), json_items=tuple(items),
                                         keep=cfg.keep_checkpoints,
                                         async_save=cfg.async_checkpointing,
                                         ref_item=save_reference)
    writer = MetricWriter(run.path)
    guard = PreemptionGuard(mesh)
    try:
        restored = checkpointer.restore(state.trainable, state.opt_state,
                                        state.frozen.reference if save_reference else None)
        start = 0
        if restored is not None:
            start, params, opt_state, json_states, ref_params = restored
            step = jax.device_put(jnp.asarray(start, jnp.int32), shard_lib.replicated(mesh))
            state = state.replace(step=step, trainable=params, opt_state=opt_state)
            if save_reference:
                state = state.with_reference(ref_params)
            for name, obj in items.items():
                obj.load_state_dict(json_states[name])
            logging.info("resumed from %s at step %d", checkpointer.directory, start)
        writer.truncate_after(start)
        return _run(run, state, cfg, start, step_fn, train_data, evaluate, items, window,
                    count_tokens, report, interrupt_after, checkpointer, writer, guard, t0)
    finally:
        guard.close()
        checkpointer.close()
        writer.close()


def _run(run, state, cfg, start, step_fn, train_data, evaluate, items, window, count_tokens,
         report, interrupt_after, checkpointer, writer, guard, t0):
    progress = Progress(cfg.steps, start)
    log_every = max(1, cfg.log_every)
    count_tokens = count_tokens or (lambda b: int(np.sum(b["segment_ids"] > 0)))
    pending = None  # (step, device metrics, tokens): read one step late
    first_train: dict[str, float] = {}
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    compile_s = None
    stopped_at = None
    data_iter = iter(train_data)

    def flush(item) -> dict[str, float]:
        """Read step ``item``'s metrics; log the window's mean at logging steps."""
        nonlocal first_train, last_train
        step, metrics_dev, tokens = item
        metrics = host_floats(metrics_dev)
        progress.update(step, tokens)
        # wall clock: tokens/s over the last 50 steps, iteration_s of this step alone
        record = dict(metrics, tokens_per_s=progress.rates()[0],
                      iteration_s=progress.last_step_s())
        window.add(record)
        first_train = first_train or record
        bad = metrics.get("nonfinite", 0.0) > 0
        if step % log_every == 0 or step == cfg.steps or bad:
            last_train = window.pop_mean()
            writer.write(step, last_train)
            if jax.process_index() == 0:
                logging.info(progress.line(step, last_train))
        if bad:
            if cfg.on_nonfinite == "error":
                raise NonFiniteError(
                    f"step {step}: non-finite loss, gradient or parameters ({_short(metrics)}); "
                    "nothing past the last checkpoint was saved. Rerun resumes from it; lower "
                    "optim.lr, check the data, or set train.on_nonfinite='skip' to drop such "
                    "updates")
            window.skipped_updates += 1
            logging.warning("step %d: non-finite loss, gradient or parameters; update skipped "
                            "(%d so far)", step, window.skipped_updates)
        return last_train

    def save(done: int) -> None:
        if not bool(_all_finite(state.trainable)):
            raise NonFiniteError(f"step {done}: parameters are not finite; not checkpointed")
        checkpointer.save(done, state.trainable, state.opt_state,
                          {k: v.state_dict() for k, v in items.items()},
                          ref_params=state.frozen.reference if checkpointer.ref_item else None)
        writer.flush()

    for step in range(start, cfg.steps):
        batch_np = next(data_iter)
        tokens = count_tokens(batch_np) * jax.process_count()
        t_step = time.time()
        state, metrics = step_fn(state, batch_np)
        if pending is not None:
            last_train = flush(pending)
        elif compile_s is None:
            jax.block_until_ready(metrics)
            compile_s = time.time() - t_step
        if interrupt_after is not None and step + 1 == interrupt_after:
            raise Interrupted(f"interrupted after dispatching step {step + 1}")
        pending = (step + 1, metrics, tokens)
        done = step + 1
        stop = guard.should_stop() and done < cfg.steps
        if evaluate is not None and cfg.eval_every and (done % cfg.eval_every == 0
                                                        or done == cfg.steps):
            last_train, pending = flush(pending), None
            last_eval = evaluate(state)
            writer.write(done, last_eval, prefix="eval/")
            if jax.process_index() == 0:
                logging.info("eval step %d: %s", done, _short(last_eval))
        if stop or done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            if pending is not None:  # a checkpoint never runs ahead of the metrics log
                last_train, pending = flush(pending), None
            save(done)
        if stop:
            stopped_at = done
            logging.warning("SIGTERM: checkpointed step %d, stopping; rerun to resume", done)
            break
    if pending is not None:
        last_train = flush(pending)
    summary = {
        "steps": cfg.steps,
        "finished": stopped_at is None,
        "resumed_from": start,
        "stopped_at": stopped_at,  # step of the preemption checkpoint (None: ran to the end)
        "wall_s": round(time.time() - t0, 1),
        "compile_s": None if compile_s is None else round(compile_s, 1),
        "skipped_updates": window.skipped_updates,
        "first_train": first_train,
        "final_train": last_train,
        "final_eval": last_eval,
    }
    summary.update(_jsonable(report() if report else {}))
    write_summary(run, summary)
    return summary


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))
