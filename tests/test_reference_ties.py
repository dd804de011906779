"""The first step of a run whose reference is its initial policy: exact zero rewards, accuracy 0.

At step 1 policy and reference are the same parameters, so every implicit reward
``beta * (log pi - log ref)`` is 0 and no pair is ranked correctly: TRL logs
``rewards/accuracies`` 0.0 (it counts ``chosen_rewards > rejected_rewards`` strictly). Two
passes over the same parameters compiled differently (the policy's inside the gradient, the
reference's forward-only, or a stored reference from another batch layout) differ by round-off,
which read as accuracies of 0.125-0.625 at step 1 on SmolLM2. ``StepConfig.
reference_is_initial_policy`` (set by ``read_config`` when the reference has no source or dtype
of its own) makes the policy's own log-probs the reference's at step 0.

The tests give the step a reference that differs from the policy by round-off-sized noise (what
a differently compiled pass returns) and check: step 1 reads exact zeros for every loss family
that reads a reference, with the reference computed on the fly or stored; the next step reads
the reference again (the shortcut is the first step's only); without the flag the noise shows.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dpo_jax import losses as losses_lib
from dpo_jax.config import base_config, read_config
from dpo_jax.data import ranked, unpaired
from dpo_jax.step import StepConfig, make_train_step, sequence_stats
from tests import helpers

# The default suite runs sigmoid (summed log-ratios); --run-slow every loss (ipo: averaged).
FAST = ("sigmoid",)
REFERENCE_LOSSES = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                    for n in losses_lib.LOSS_NAMES if n not in losses_lib.REFERENCE_FREE_LOSSES]
OPTIONS = {"rdpo": {"rdpo_alpha": 0.01}}
ZERO_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _batch(fmt: str):
    if fmt == "pairs":
        return helpers.pair_batch(helpers.synthetic_pairs(8))
    if fmt == "ranked":
        from dpo_jax.data.synthetic import make_ranked

        items = [ranked._checked_list(it["prompt"], it["responses"], list(it["scores"]),
                                      end_ids={0}, is_blank=None, file="s", row=i)
                 for i, it in enumerate(make_ranked(helpers.SyntheticTask(), 8, 0, 3))]
        cls = ranked.RankedPipeline
    else:
        items = [unpaired.checked_unpaired(it, end_ids={0}, is_blank=None, file="s", row=i)
                 for i, it in enumerate(unpaired.unpair_tokens(helpers.synthetic_pairs(4)))]
        cls = unpaired.UnpairedPipeline
    cfg = helpers.data_config(format=fmt)
    return next(iter(cls(items, cfg, train=False, global_batch_size=len(items), pad_id=0)))


def _two_steps(loss: str, fmt: str, stored: bool, flag: bool, noise: float = 1e-6):
    """Metrics of steps 1 and 2 of a run from ``params`` whose reference is ``params`` plus
    ``noise``-sized perturbations (computed on the fly, or stored as log-probs in the batch)."""
    model = helpers.tiny_model()
    params = helpers.init_params(model)
    ref_params = helpers.perturbed(params, scale=noise, seed=3)
    batch_np = _batch(fmt)
    loss_cfg = helpers.loss_config(loss, beta=0.5, **OPTIONS.get(loss, {}))
    tx, schedule = helpers.optimizer(lr=0.1)
    step_cfg = StepConfig(reference_is_initial_policy=flag)
    if stored:
        batch, max_scored = helpers.device_batch(batch_np)
        s = sequence_stats(model, ref_params, batch, step_cfg, max_scored, forward_only=True)
        logps, lengths = s.logps, s.lengths
        batch_np = {**batch_np, "ref_logps": np.asarray(logps), "ref_lengths": np.asarray(lengths)}
    step = jax.jit(make_train_step(model, loss_cfg, tx, schedule, step_cfg), static_argnums=2)
    state = helpers.train_state(model, params, tx, ref_params=None if stored else ref_params)
    batch, max_scored = helpers.device_batch(batch_np)
    state, first = step(state, batch, max_scored)
    _, second = step(state, batch, max_scored)
    return jax.device_get(first), jax.device_get(second)


@pytest.mark.parametrize("stored", [False, True], ids=["on_the_fly", "stored"])
@pytest.mark.parametrize("loss", REFERENCE_LOSSES)
def test_first_step_rewards_are_exact_zeros_for_every_loss(loss, stored):
    first, second = _two_steps(loss, "pairs", stored, flag=True)
    for k in ZERO_KEYS:
        assert float(first[k]) == 0.0, (k, float(first[k]))
    # step 2 reads the reference (and the moved policy): rewards are no longer zero
    assert float(second["rewards/chosen"]) != 0.0


@pytest.mark.parametrize("fmt,loss", [("ranked", "plackett_luce"),
                                      pytest.param("unpaired", "kto", marks=pytest.mark.slow)])
def test_first_step_rewards_are_exact_zeros_for_lists_and_unpaired(fmt, loss):
    first, second = _two_steps(loss, fmt, stored=False, flag=True)
    for k in ZERO_KEYS:
        if k in first:
            assert float(first[k]) == 0.0, (k, float(first[k]))
    assert float(second["rewards/chosen"]) != 0.0


@pytest.mark.parametrize("stored", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["on_the_fly", "stored"])
def test_without_the_flag_round_off_reads_as_rewards(stored):
    """The test's reference noise is visible when the step is not told the reference is the
    initial policy (so the zeros above come from the flag, not from the noise vanishing), and
    the accuracy counts only strictly higher chosen rewards."""
    first, _ = _two_steps("sigmoid", "pairs", stored, flag=False)
    assert float(first["rewards/chosen"]) != 0.0 and float(first["rewards/margins"]) != 0.0
    assert 0.0 < float(first["rewards/accuracies"]) < 1.0


def test_read_config_sets_the_flag_only_when_the_reference_is_the_initial_policy():
    def flag(**fields):
        c = base_config()
        c.update_from_flattened_dict(fields)
        return read_config(c).step.reference_is_initial_policy

    assert flag()
    assert flag(**{"model.ref_param_dtype": "float32"})
    assert not flag(**{"model.ref_param_dtype": "bfloat16"})
    assert not flag(**{"init.reference": "runs/sft"})
    assert not flag(**{"model.ref_hf_path": "some/dir"})
    assert not flag(**{"model.lora.rank": 4})
