"""PPO task: learns a bandit-like reward; PPO and PPO-GT differ only in the reward callable;
rewards, prompts and the value head's reach into the trunk.

End-to-end tests run ``dpo_jax.ppo.run.train_and_evaluate`` on ``tests/runs.py``'s tiny PPO
config; the value-head test calls ``dpo_jax.ppo.step.forward`` on a tiny model. Exact resume
(with the adaptive KL coefficient): ``tests/test_resume.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import sharding as shard_lib
from dpo_jax.config import read_config
from dpo_jax.data import synthetic
from dpo_jax.data.prompts import PromptStream
from dpo_jax.models import Model
from dpo_jax.ppo import core
from dpo_jax.ppo import run as ppo_run
from dpo_jax.ppo import step as ppo_step
from dpo_jax.ppo.rewards import build_reward, synthetic_true_reward, with_final_eos
from dpo_jax.reward_model import RewardModel
from tests import helpers, runs

jax.config.update("jax_default_matmul_precision", "highest")


def liked_fraction(samples):
    """A topic-free bandit reward: fraction of generated tokens that are multiples of 4."""
    t, m = samples.tokens_BT, samples.completion_mask_BT
    liked = (m > 0) & (t % 4 == 0) & (t > 0)
    return (jnp.sum(liked, 1) / jnp.maximum(jnp.sum(m, 1), 1)).astype(jnp.float32)


def test_synthetic_true_reward_matches_the_data_module():
    task = synthetic.SyntheticTask()
    rng = np.random.default_rng(0)
    B, P, N = 16, 5, 7
    tokens = rng.integers(0, task.vocab_size, size=(B, P + N)).astype(np.int32)
    tokens[:, 0] = rng.integers(1, task.num_topics + 1, size=B)
    mask = np.zeros((B, P + N), np.float32)
    for b in range(B):
        mask[b, P:P + rng.integers(0, N + 1)] = 1
    got = np.asarray(synthetic_true_reward(task, jnp.asarray(tokens), jnp.asarray(mask)))
    want = [synthetic.true_reward(task, tokens[b, :P], tokens[b][mask[b] > 0]) for b in range(B)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_prompt_stream_resumes():
    prompts = [np.arange(1, 2 + i % 5, dtype=np.int32) for i in range(10)]
    s = PromptStream(prompts, train=True, global_batch_size=4, width=6, seed=3)
    first = [next(s)["prompt_ids"] for _ in range(3)]  # crosses an epoch (2 batches each)
    state = s.state_dict()
    nxt = next(s)
    s2 = PromptStream(prompts, train=True, global_batch_size=4, width=6, seed=3)
    s2.load_state_dict(state)
    np.testing.assert_array_equal(next(s2)["prompt_ids"], nxt["prompt_ids"])
    b = first[0]
    assert b.shape == (4, 6)
    lengths = next(s2)["prompt_lengths"]
    assert lengths.min() >= 1


@pytest.mark.slow  # a learning run; PPO's math is pinned by the golden tests
def test_ppo_increases_a_bandit_reward_and_starts_at_zero_kl(tmp_path):
    c = runs.ppo_config(steps=14, batch_size=32)
    c.model.overrides.update(d_model=64, d_ff=128)
    c.optim.warmup_steps = 0
    # target_kl: trl's controller keeps beta near its start over 14 iterations
    c.ppo.update(max_new_tokens=8, max_prompts=128, epochs=2, init_kl_coef=0.05, target_kl=6.0,
                 kl_horizon=10000)
    summary = ppo_run.train_and_evaluate(c, str(tmp_path), reward_fn=liked_fraction)
    recs = runs.records(tmp_path)
    rewards = [r["env/reward_mean"] for r in recs]
    assert len(rewards) == 14
    assert recs[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert recs[0]["value/mean"] == 0.0  # zero-initialised value head
    # Random init: about 31 of 127 tokens are multiples of 4 (~0.24).
    assert np.mean(rewards[:3]) < 0.35, rewards
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards
    assert summary["final_train"]["objective/kl"] > 0
    for k in ("policy/entropy", "policy/clipfrac", "value/loss", "policy/approx_kl",
              "value/explained_variance"):
        assert np.isfinite(summary["final_train"][k]), k


@pytest.mark.slow  # two whole PPO runs
def test_ppo_and_ppo_gt_share_everything_but_the_reward(tmp_path):
    """PPO (``ppo.reward='model'``: a trained reward model restored from its run) and PPO-GT
    (``'synthetic'``: the task's true reward) differ only in the reward callable: the PPO-GT
    config given the learned reward as ``reward_fn`` trains exactly as the PPO config does."""
    rm = runs.reward_config(steps=1)
    rm.optim.warmup_steps = 0  # the head leaves its zero init in the one step
    runs.run(rm, tmp_path / "rm")

    learned = runs.ppo_config(steps=2)
    learned.ppo.reward = "model"
    learned.ppo.reward_model = str(tmp_path / "rm")
    runs.run(learned, tmp_path / "learned")

    gt = runs.ppo_config(steps=2)
    assert gt.ppo.reward == "synthetic"
    mesh = shard_lib.make_mesh(dict(gt.mesh.shape))
    learned_fn = build_reward(read_config(learned), mesh=mesh)
    gt_fn = build_reward(read_config(gt), mesh=mesh)
    scored = []

    def learned_reward(samples):
        scores = learned_fn(samples)
        scored.append((np.asarray(gt_fn(samples)), np.asarray(scores)))
        return scores

    ppo_run.train_and_evaluate(gt, str(tmp_path / "gt"), reward_fn=learned_reward)
    runs.assert_same_run(gt, tmp_path / "gt", tmp_path / "learned")  # the same model shape
    assert len(scored) == 2
    for gt_scores, learned_scores in scored:
        assert np.std(learned_scores) > 0  # the restored head is not the zero init
        assert not np.allclose(gt_scores, learned_scores)


def test_learned_reward_scores_truncated_rollouts_with_a_final_eos():
    """A rollout cut at the length bound gets the EOS the reward model saw in training; a row
    that already ended in EOS, and an empty completion, are left alone."""
    eos = 0
    tokens = jnp.array([[5, 6, 7, 8, 9],    # prompt 5 6, completion 7 8 9 (bound hit)
                        [5, 7, 0, 0, 0],    # prompt 5, completion 7 EOS
                        [5, 6, 0, 0, 0]])   # prompt 5 6, nothing generated
    mask = jnp.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], jnp.float32)
    t, m = with_final_eos(tokens, mask, eos)
    np.testing.assert_array_equal(t, [[5, 6, 7, 8, 9, 0], [5, 7, 0, 0, 0, 0], [5, 6, 0, 0, 0, 0]])
    np.testing.assert_array_equal(m, [[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])




def test_detached_value_head_keeps_the_value_loss_out_of_the_trunk():
    """``ppo.detach_value_head``: the value loss trains the head only; shared (default), it
    reaches the decoder too."""
    model = RewardModel(Model(helpers.tiny_model_config(n_layer=1)))
    n = 4
    batch = helpers.rollout_batch(n=n)
    _, _, mask = ppo_step.completion_view(batch, n)
    returns = jnp.ones(mask.shape)  # any target the head misses

    def value_loss(params, detach):
        _, values, _ = ppo_step.forward(model, params, batch, n, detach_value=detach)
        return core.masked_mean((values - returns) ** 2, mask)

    # A non-zero head (the zero init passes no gradient to the trunk either way).
    params = {"decoder": helpers.init_params(model.decoder),
              "value_head": jax.tree.map(lambda x: jnp.full_like(x, 0.1), model.init_head())}
    grad = jax.jit(jax.grad(value_loss), static_argnums=1)
    for detach in (True, False):
        g = grad(params, detach)
        trunk = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g["decoder"]))
        head = float(jnp.max(jnp.abs(g["value_head"]["kernel"])))
        assert head > 0
        assert (trunk == 0.0) if detach else (trunk > 0.0), (detach, trunk)
