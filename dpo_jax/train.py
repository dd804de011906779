"""``config.task='dpo'``: preference optimisation with any loss of ``dpo_jax/losses``.

Reads top to bottom: accept the workdir, read the config, build mesh, model, optimizer, the
policy and (unless the loss is reference-free or its log-probs are precomputed) the frozen
reference, the data, the jitted step, then hand everything to the one loop (``dpo_jax/loop.py``).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from dpo_jax import batch_format
from dpo_jax import ches_filter
from dpo_jax import eval_metrics
from dpo_jax import eval_pairs
from dpo_jax import evaluation
from dpo_jax import loop
from dpo_jax import lora as lora_lib
from dpo_jax import lora_base
from dpo_jax import losses as losses_lib
from dpo_jax import preference_data
from dpo_jax import state as state_lib
from dpo_jax.config import read_config
from dpo_jax.step import make_eval_step, make_train_step
from dpo_jax.train_state import Frozen
from dpo_jax.workdir import RunDir, opens_workdir


@opens_workdir
def train_and_evaluate(config: ml_collections.ConfigDict, run: RunDir, *,
                       interrupt_after: int | None = None) -> dict[str, Any]:
    """Train and evaluate a DPO-family run; called as ``train_and_evaluate(config, workdir)``,
    returns its summary (also in ``summary.json``). ``interrupt_after``: see
    :func:`dpo_jax.loop.train`."""
    rc = read_config(config)
    loss_cfg = rc.loss
    model = lora_lib.make_model(rc.model, rc.lora)  # a LoraModel when model.lora.rank > 0
    # under LoRA, trainable are the adapters and frozen.lora_base the base (dpo_jax/lora.py)
    needs_reference = losses_lib.needs_reference(loss_cfg)
    setup = state_lib.setup(rc, model, reference=needs_reference)
    mesh, reference = setup.mesh, Frozen.tree_of(setup.frozen)
    samples = evaluation.sample_evaluator(
        rc, workdir=run.path, model=model, mesh=mesh,
        reference_params=setup.trainable if reference is None else reference,
        params_of=lora_lib.policy_of)

    data = preference_data.preference_streams(
        rc, rc.train.splits, model_cfg=model.cfg, mesh=mesh,
        ches=(model, lora_lib.join(reference, setup.trainable), run.file(ches_filter.SUBDIR)),
        reference=(model, reference, run.file("reference_logps"))
        if reference is not None and needs_reference and rc.precompute_reference else None)
    if rc.precompute_reference and not rc.lora.rank:
        setup = setup._replace(frozen=None)  # the stored log-probs replace the reference forward
    state = setup.initial_state()

    fmt = batch_format.for_run(rc.data, stored_reference=(
        rc.precompute_reference and needs_reference))
    train_step = loop.jit_train_step(
        make_train_step(model, loss_cfg, setup.tx, setup.schedule, rc.step,
                        rc.train.on_nonfinite, fmt=fmt), state)
    eval_step = make_eval_step(model, loss_cfg, rc.step, fmt=fmt)
    scored_only = rc.step.logprobs.scored_only
    # train.diagnostics: each evaluation's per-pair values to eval_pairs/ (dpo_jax/eval_pairs.py)
    pairs_log = eval_pairs.EvalPairs(run.path, data) if rc.step.diagnostics else None
    evaluate = eval_metrics.evaluator_by_source(
        lambda batches: loop.eval_totals(
            lambda s, b, n: eval_step(s.trainable, s.frozen, b, n), batches, mesh,
            scored_only, per_example=pairs_log and pairs_log.sink), data)
    return loop.train(
        run, state, cfg=rc.train, mesh=mesh, step_fn=loop.host_step(train_step, mesh, scored_only),
        train_data=data["train"],
        evaluate=evaluation.with_samples(pairs_log.wrap(evaluate) if pairs_log else evaluate,
                                         samples),
        report=lambda: {"data": {k: s.stats for k, s in data.items()}},
        host_states=lora_base.host_states(state, rc.param_sources),
        interrupt_after=interrupt_after, save_reference=rc.step.ref_sync_every > 0)
