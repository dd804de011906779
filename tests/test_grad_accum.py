"""Gradient accumulation through the one step builder (``dpo_jax.optim.make_update``), for
every task: ``optim.grad_accum=2`` gives the update (parameters after one SGD step, lr 1: minus
the gradient) and the metrics of one step on the whole batch, to float32 round-off.

The reference is the ``grad_accum=1`` step on the whole batch, whose numbers other tests pin
against independent computations (``test_step.py``: numpy DPO; ``test_sft.py``: numpy token-mean
NLL and the Unlikelihood formula; ``test_reward_model.py``: Bradley-Terry golden values;
``test_ppo_core.py``: the PPO terms). Each batch is chosen so that its micro-batches carry
different weights (padding pairs of weight 0, responses of different lengths), so averaging the
micro-batches' means with equal weights would fail these tests. Ranked lists and LoRA:
``test_ranked_data.py`` and ``test_lora.py``; KTO refuses accumulation (its KL term is a batch
statistic): ``test_ranked_data.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import optim
from dpo_jax.batch_format import BatchFormat, infer
from dpo_jax.data.text import TextPipeline
from dpo_jax.logprobs import LogprobConfig
from dpo_jax.models import Model
from dpo_jax.ppo import step as ppo_step
from dpo_jax.reward_model import RewardModel, make_reward_train_step
from dpo_jax.sft import make_sft_train_step
from dpo_jax.state import Frozen
from dpo_jax.step import make_train_step
from tests import helpers, runs

jax.config.update("jax_default_matmul_precision", "highest")

LP = LogprobConfig(scored_only=True, seq_chunk=16, vocab_chunk=48)


def _assert_same_update(step_for, state_for, batch, max_scored=None, keys=None):
    """Runs ``step_for(grad_accum)`` for 1 and 2 on fresh states; compares the parameters and
    the metrics (all of them, or ``keys``)."""
    outputs = []
    for accum in (1, 2):
        step = jax.jit(step_for(accum), static_argnums=2)
        outputs.append(jax.device_get(step(state_for(), batch, max_scored)))
    (want_state, want), (got_state, got) = outputs
    assert set(got) == set(want)
    for k in keys or want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)
    moved = 0.0
    for g, w, p in zip(helpers.leaves(got_state.trainable), helpers.leaves(want_state.trainable),
                       helpers.leaves(state_for().trainable), strict=True):
        # float32 round-off of the leaf's largest entries (sums in another order)
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6 * max(1.0, np.abs(w).max()))
        moved = max(moved, float(np.abs(w - p).max()))
    assert moved > 1e-4  # the update is not trivially zero
    return want


def _uneven(batch_np):
    """Pairs 1 and 6 of 8 get weight 0 (as eval padding does): micro-batch 0 (even pairs) then
    weighs 3 pairs, micro-batch 1 (odd pairs) 3 as well but with other lengths; pair 3 weighs
    2, so the two micro-batches' totals differ (4 and 3)."""
    w = np.ones_like(batch_np["pair_weight"])
    w[[1, 6]] = 0.0
    w[3] = 2.0
    return {**batch_np, "pair_weight": w}


def test_dpo_pairs_with_uneven_pair_weights():
    model = helpers.tiny_model()
    params = helpers.init_params(model)
    ref_params = helpers.perturbed(params)
    tx, schedule = helpers.optimizer()
    batch, max_scored = helpers.device_batch(_uneven(helpers.pair_batch(
        helpers.synthetic_pairs(8), buckets="32")))
    _assert_same_update(
        lambda n: make_train_step(model, helpers.loss_config(beta=0.5), tx, schedule,
                                  helpers.step_config(grad_accum=n, scored_only=True,
                                                      seq_chunk=16),
                                  fmt=BatchFormat("pairs")),
        lambda: helpers.train_state(model, params, tx, ref_params=ref_params), batch, max_scored)


@pytest.mark.parametrize("objective", ["nll", pytest.param("unlikelihood", marks=pytest.mark.slow)])
def test_sft_token_means_over_the_whole_batch(objective):
    """NLL: sequences of different lengths (the token mean weighs micro-batches by their scored
    tokens); Unlikelihood: two denominators (chosen and rejected tokens) at once."""
    model = helpers.tiny_model()
    params = helpers.perturbed(helpers.init_params(model), scale=0.05)
    tx, schedule = helpers.optimizer()
    if objective == "nll":
        examples = [{"prompt": p["prompt"], "response": p["chosen"]}
                    for p in helpers.synthetic_pairs(32)]
        batch_np = TextPipeline(examples, helpers.data_config(buckets="32"), train=True,
                                global_batch_size=16, target="response",
                                row_multiple=8).batch_at(0, 0)
        fmt = BatchFormat("sequences")
    else:
        batch_np = _uneven(helpers.pair_batch(helpers.synthetic_pairs(8), buckets="32"))
        fmt = BatchFormat("pairs")
    batch, max_scored = helpers.device_batch(batch_np)
    want = _assert_same_update(
        lambda n: make_sft_train_step(model, objective, 0.5, tx, schedule, LP, grad_accum=n,
                                      fmt=fmt),
        lambda: helpers.train_state(model, params, tx), batch, max_scored)
    assert want["ppl"] == pytest.approx(np.exp(want["nll"]), rel=1e-6)


def test_reward_model_with_uneven_pair_weights():
    model = RewardModel(helpers.tiny_model())
    head = model.init_head()  # a random kernel: a constant one scores every sequence alike
    kernel = jax.random.normal(jax.random.key(3), head["kernel"].shape, head["kernel"].dtype)
    params = {"decoder": helpers.init_params(model.decoder),
              "value_head": {"kernel": kernel, "bias": head["bias"]}}
    tx, schedule = helpers.optimizer()
    batch, _ = helpers.device_batch(_uneven(helpers.pair_batch(helpers.synthetic_pairs(8),
                                                               buckets="32")))
    _assert_same_update(
        lambda n: make_reward_train_step(model, tx, schedule, grad_accum=n),
        lambda: helpers.train_state(model, params, tx), batch)


def _rollout(B=16, n=4, seed=0):
    """A rollout batch whose rows complete 1 or n tokens alternately, so the strided
    micro-batches of each (shuffled) minibatch hold different token counts; scores and the KL
    coefficient."""
    batch = helpers.rollout_batch(B, n=n, seed=seed, completion_lengths=lambda b: 1 if b % 2 else n)
    scores = np.random.default_rng(seed + 1).normal(size=B).astype(np.float32)
    return {**batch, "scores": jnp.asarray(scores), "kl_coef": jnp.asarray(0.1, jnp.float32)}


def test_ppo_minibatch_updates():
    """Two minibatch updates (one epoch), each accumulated over two micro-batches of rows."""
    model = RewardModel(Model(helpers.tiny_model_config(n_layer=1)))
    decoder = helpers.init_params(model.decoder)
    params = {"decoder": decoder,
              "value_head": jax.tree.map(lambda x: jnp.full_like(x, 0.1), model.init_head())}
    ref = helpers.perturbed(decoder)
    tx, schedule = helpers.optimizer(lr=0.05)
    cfg = ppo_step.PPOConfig(max_new_tokens=4, epochs=1, minibatches=2)

    def state():
        s = helpers.train_state(model, params, tx)
        return s.replace(frozen=Frozen(reference=ref))

    _assert_same_update(lambda n: ppo_step.make_ppo_step(model, tx, schedule, cfg,
                                                         grad_accum=n),
                        state, _rollout())


# ----------------------------------------------------------------------------- the tasks
@pytest.mark.parametrize("task,steps", [  # reward and ppo: their steps' accumulation is
    ("sft", 2),                              # tested above; the runs are --run-slow
    pytest.param("reward", 2, marks=pytest.mark.slow),
    pytest.param("ppo", 1, marks=pytest.mark.slow)])
def test_tasks_honour_optim_grad_accum(tmp_path, monkeypatch, task, steps):
    """``optim.grad_accum=2`` reaches each task's step through ``read_config`` (the builder is
    asked for 2 micro-batches), and the run's metrics and final parameters equal the
    ``grad_accum=1`` run's to float32 round-off (PPO: one iteration, so both sample the same
    rollout)."""
    make = {"sft": runs.sft_config, "reward": runs.reward_config, "ppo": runs.ppo_config}[task]
    asked, accumulate = [], optim.accumulate
    monkeypatch.setattr(optim, "accumulate",
                        lambda objective, n=1, *a: asked.append(n) or accumulate(objective, n, *a))
    logs, params = [], []
    for accum in (1, 2):
        c = make(steps=steps)
        # SGD: Adam would blow the round-off of a zero gradient (the reward head's bias, which
        # cancels in r_w - r_l) up to a full step
        c.optim.update(grad_accum=accum, name="sgd", lr=0.1)
        runs.run(c, tmp_path / str(accum))
        logs.append(runs.without_timing(runs.records(tmp_path / str(accum))))
        params.append(runs.final_params(c, tmp_path / str(accum)))
    assert set(asked) == {1, 2}
    want, got = logs
    assert len(got) == len(want) == steps
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for g, w in zip(helpers.leaves(params[1]), helpers.leaves(params[0]), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(w).max()))


# ----------------------------------------------------------------------------- the builder
def test_builder_sums_exact_shares_and_refuses_what_it_cannot_split():
    """``optim.accumulate`` on a loss known in closed form: the weighted mean ``sum(w x p) /
    sum(w)`` over 4 pairs (one of weight 0); its gradient w.r.t. p is ``sum(w x) / sum(w)`` =
    18 / 6 for any number of micro-batches."""
    x = jnp.asarray([1.0, 2.0, 3.0, 4.0])
    w = jnp.asarray([1.0, 0.0, 3.0, 2.0])
    batch = {"pair_weight": w, "x": jnp.concatenate([x, -x])}  # rows [chosen, rejected]

    def loss(p, frozen, b, rng, total):
        assert frozen is None and rng is None
        chosen = jnp.split(b["x"], 2)[0]
        s = jnp.sum(b["pair_weight"] * chosen * p)
        return s / total, {"loss": s / total}

    objective = optim.Objective(loss=loss, totals=lambda b: jnp.sum(b["pair_weight"]))
    fmt = BatchFormat("pairs")
    for n in (1, 2, 4):
        g, m = optim.accumulate(objective, n, fmt.split)(jnp.float32(2.0), None, batch)
        assert float(g) == pytest.approx(18.0 / 6.0, rel=1e-6)  # sum(w x) / sum(w)
        assert float(m["loss"]) == pytest.approx(2.0 * 18.0 / 6.0, rel=1e-6)
    with pytest.raises(ValueError, match="optim.grad_accum=2"):  # the unsplittable default
        optim.accumulate(objective, 2)(jnp.float32(2.0), None, batch)
    with pytest.raises(ValueError, match="optim.grad_accum=0"):
        optim.accumulate(objective, 0)
    with pytest.raises(ValueError, match="must divide the batch's 4 examples"):
        optim.accumulate(objective, 3, fmt.split)(jnp.float32(2.0), None, batch)
    packed = BatchFormat("pairs", packed=True)
    with pytest.raises(ValueError, match="packed, prefix-shared or tree"):
        optim.accumulate(objective, 2, packed.split)(jnp.float32(2.0), None, batch)


def test_a_step_built_for_one_format_refuses_another():
    """The format is fixed when the step is built; a batch of another layout is an error that
    names what is missing or extra, not a silently different loss."""
    model = helpers.tiny_model()
    params = helpers.init_params(model)
    tx, schedule = helpers.optimizer()
    batch_np = helpers.pair_batch(helpers.synthetic_pairs(8), buckets="32")
    assert infer(batch_np) == BatchFormat("pairs")
    step = make_train_step(model, helpers.loss_config("simpo"), tx, schedule,
                           helpers.step_config(), fmt=BatchFormat("pairs", stored_reference=True))
    with pytest.raises(ValueError, match=r"lacks \['ref_logps'\]"):
        step(helpers.train_state(model, params, tx), *helpers.device_batch(batch_np))
    step = make_train_step(model, helpers.loss_config("simpo"), tx, schedule,
                           helpers.step_config(), fmt=BatchFormat("pairs"))
    extra = {**batch_np, "desirable": np.ones_like(batch_np["pair_weight"])}
    with pytest.raises(ValueError, match=r"carries \['desirable'\]"):
        step(helpers.train_state(model, params, tx), *helpers.device_batch(extra))
    with pytest.raises(ValueError, match="batch format 'triples'"):
        BatchFormat("triples")
