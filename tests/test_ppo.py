"""PPO task: learns a bandit-like reward; PPO and PPO-GT differ only in the reward callable;
rollouts and prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.data import synthetic
from dpo_jax.data.prompts import PromptStream
from dpo_jax.ppo import core
from dpo_jax.ppo.config import default_ppo_config
from dpo_jax.ppo.rewards import synthetic_true_reward
from dpo_jax.ppo.run import PPORun
from dpo_jax.config import base_config
from tests._interrupt import train_until_killed

jax.config.update("jax_default_matmul_precision", "highest")


def ppo_config(steps=2, **ppo):
    c = base_config()
    c.task = "ppo"
    c.ppo = default_ppo_config()
    c.ppo.reward = "synthetic"
    c.ppo.max_new_tokens = 8
    c.ppo.max_prompts = 128
    c.ppo.epochs = 2
    c.ppo.minibatches = 2
    c.ppo.init_kl_coef = 0.05
    for k, v in ppo.items():
        c.ppo[k] = v
    c.model.overrides.n_layer = 1
    c.model.overrides.d_model = 64
    c.model.overrides.d_ff = 128
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 0
    c.optim.max_grad_norm = 1.0
    c.train.steps = steps
    c.train.batch_size = 32
    c.train.eval_every = 0
    c.train.log_every = 1
    c.train.checkpoint_every = 0
    c.train.async_checkpointing = False
    return c


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


def test_ppo_increases_a_bandit_reward_and_starts_at_zero_kl(tmp_path):
    c = ppo_config(steps=14)
    run = PPORun(c, str(tmp_path), reward_fn=liked_fraction)
    summary = run.train()
    import json
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rewards = [r["env/reward_mean"] for r in recs]
    assert recs[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert recs[0]["value/mean"] == 0.0  # zero-initialised value head
    # Random init: about 31 of 127 tokens are multiples of 4 (~0.24).
    assert np.mean(rewards[:3]) < 0.35, rewards
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards
    assert summary["final_train"]["objective/kl"] > 0
    for k in ("policy/entropy", "policy/clipfrac", "value/loss", "policy/approx_kl",
              "value/explained_variance"):
        assert np.isfinite(summary["final_train"][k]), k


def test_ppo_and_ppo_gt_share_everything_but_the_reward(tmp_path):
    """PPO (a trained reward model restored from its run) and PPO-GT (the synthetic task's true
    reward): same class and step function, identical update given the same scores."""
    from dpo_jax.reward_model import RewardRun

    rm = ppo_config(steps=1)
    rm.task = "reward"
    del rm.ppo
    rm.train.eval_every = 0
    RewardRun(rm, str(tmp_path / "rm")).train()
    gt = PPORun(ppo_config(), str(tmp_path / "gt"))
    learned = PPORun(ppo_config(reward="model", reward_model=str(tmp_path / "rm")),
                     str(tmp_path / "learned"))
    assert type(gt) is type(learned)
    assert gt.make_train_step().__qualname__ == learned.make_train_step().__qualname__
    prompts = next(iter(gt.train_data))
    batch_gt, _ = gt.rollout(prompts, jax.random.key(0))
    batch_rm, _ = learned.rollout(prompts, jax.random.key(0))
    np.testing.assert_array_equal(batch_gt["tokens"], batch_rm["tokens"])
    assert np.std(np.asarray(batch_rm["scores"])) > 0  # the restored head is not the zero init
    assert not np.allclose(batch_gt["scores"], batch_rm["scores"])
    batch_rm["scores"] = batch_gt["scores"]
    for run, batch in ((gt, batch_gt), (learned, batch_rm)):
        batch["kl_coef"] = jnp.float32(0.05)
        run.state, _ = run._train_step(run.state, batch, None)
    for a, b in zip(jax.tree.leaves(jax.device_get(gt.state.params)),
                    jax.tree.leaves(jax.device_get(learned.state.params))):
        np.testing.assert_array_equal(a, b)


def test_ppo_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    """Killed right after the checkpoint at iteration 2, a resumed run continues with the same
    params, optimizer state, prompt position and adaptive KL coefficient: the final params and
    the metric log are those of the uninterrupted run, bit for bit."""
    import json

    def config():
        c = ppo_config(steps=4, adaptive_kl=True, target_kl=0.5, kl_horizon=64)
        c.train.checkpoint_every = 2
        return c

    full = PPORun(config(), str(tmp_path / "full"), reward_fn=liked_fraction)
    full.train()
    want_log = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    coefs = [r["objective/kl_coef"] for r in want_log]
    assert len(set(coefs)) == len(coefs), coefs  # the controller moved beta every iteration

    train_until_killed(PPORun(config(), str(tmp_path / "cut"), reward_fn=liked_fraction), 3)

    resumed = PPORun(config(), str(tmp_path / "cut"), reward_fn=liked_fraction)
    assert resumed.start_step == 2
    assert resumed.kl_controller.value == pytest.approx(coefs[2], rel=1e-6)
    resumed.train()
    for a, b in zip(jax.tree.leaves(jax.device_get(full.state.params)),
                    jax.tree.leaves(jax.device_get(resumed.state.params))):
        np.testing.assert_array_equal(a, b)
    got_log = [json.loads(x) for x in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [r["step"] for r in got_log] == [r["step"] for r in want_log]
    for g, w in zip(got_log, want_log):
        assert {k: v for k, v in g.items() if k != "iteration_s"} == \
            {k: v for k, v in w.items() if k != "iteration_s"}


def test_learned_reward_scores_truncated_rollouts_with_a_final_eos():
    """A rollout cut at the length bound gets the EOS the reward model saw in training; a row
    that already ended in EOS, and an empty completion, are left alone."""
    from dpo_jax.ppo.rewards import with_final_eos

    eos = 0
    tokens = jnp.array([[5, 6, 7, 8, 9],    # prompt 5 6, completion 7 8 9 (bound hit)
                        [5, 7, 0, 0, 0],    # prompt 5, completion 7 EOS
                        [5, 6, 0, 0, 0]])   # prompt 5 6, nothing generated
    mask = jnp.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], jnp.float32)
    t, m = with_final_eos(tokens, mask, eos)
    np.testing.assert_array_equal(t, [[5, 6, 7, 8, 9, 0], [5, 7, 0, 0, 0, 0], [5, 6, 0, 0, 0, 0]])
    np.testing.assert_array_equal(m, [[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])


def test_detached_value_head_keeps_the_value_loss_out_of_the_trunk(tmp_path):
    """``ppo.detach_value_head``: the value loss trains the head only; shared (default), it
    reaches the decoder too."""
    from dpo_jax.ppo import step as ppo_step

    run = PPORun(ppo_config(steps=1), str(tmp_path), reward_fn=liked_fraction)
    batch, _ = run.rollout(next(iter(run.train_data)), jax.random.key(0))
    n = run.ppo_cfg.max_new_tokens
    _, _, mask = ppo_step.completion_view(batch, n)
    returns = jnp.ones(mask.shape)  # any target the zero-initialised head misses

    def value_loss(params, detach):
        _, values, _ = ppo_step.forward(run.model, params, batch, n, detach_value=detach)
        return core.masked_mean((values - returns) ** 2, mask)

    # A non-zero head (the zero init passes no gradient to the trunk either way).
    params = dict(run.state.params, value_head=jax.tree.map(
        lambda x: jnp.full_like(x, 0.1), run.state.params["value_head"]))
    for detach in (True, False):
        g = jax.grad(value_loss)(params, detach)
        trunk = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g["decoder"]))
        head = float(jnp.max(jnp.abs(g["value_head"]["kernel"])))
        assert head > 0
        assert (trunk == 0.0) if detach else (trunk > 0.0), (detach, trunk)
