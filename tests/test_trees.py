"""Preference trees (``dpo_jax/data/trees.py``, issue 31) against the same branch points unrolled
into independent pairs with their full histories, through the real pair pipeline.

As for prefix sharing (tests/test_prefix_sharing.py): every loss is a function of the
per-sequence sums and counts, so equal per-branch-point log-prob sums, counts and their
vector-Jacobian product with a random cotangent give equal losses and gradients; the step tests
then run the real train step (pairwise losses with per-branch-point weights, Plackett-Luce at
3-way branch points, stored reference log-probs, the (2, 2, 2) mesh).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import batch_format
from dpo_jax import losses as losses_lib
from dpo_jax.data import prefix, trees
from dpo_jax.logprobs import LogprobConfig
from dpo_jax.models import Model, preset
from dpo_jax.models.layers import block_mask, token_meta
from dpo_jax.step import StepConfig, sequence_stats
from tests import helpers

jax.config.update("jax_default_matmul_precision", "highest")

LOGP_TOL = dict(rtol=1e-5, atol=2e-5)


def _tok(rng, lo, hi):
    return rng.integers(3, 128, int(rng.integers(lo, hi + 1))).astype(np.int32)


def conversation(rng, turns: int = 3, k: int = 2) -> list[trees.BranchPoint]:
    """A random multi-turn tree: a first user turn, then per turn K alternatives (best first;
    the best continues the conversation, followed by 0-3 tokens of the next user turn, so with
    0 a chosen response's last token is also the last token of the next history), a branch
    point at most turns; an alternative sometimes starts like the best one."""
    history = _tok(rng, 2, 5)
    out = []
    for t in range(turns):
        alts = [_tok(rng, 1, 4) for _ in range(k)]
        if rng.random() < 0.4:
            alts[1] = np.concatenate([alts[0][:1], alts[1]])
        if t == 0 or rng.random() < 0.8:
            out.append(trees.BranchPoint(history, alts, rank=list(range(k)),
                                         weight=float(1 + len(out)), depth=len(out)))
        history = np.concatenate([history, alts[0], _tok(rng, 0, 3)])
    return out


def forest(n: int, seed: int, k: int = 2, branch_points: int | None = None
           ) -> list[list[trees.BranchPoint]]:
    """``n`` random conversation trees; with ``branch_points``, as many trees as give exactly
    that many branch points (the last tree cut)."""
    rng = np.random.default_rng(seed)
    out = [conversation(rng, int(rng.integers(1, 4)), k) for _ in range(n)]
    if branch_points is None:
        return out
    while sum(map(len, out)) < branch_points:
        out.append(conversation(rng, 3, k))
    while sum(map(len, out)) > branch_points:
        out[-1] = out[-1][:branch_points - sum(map(len, out[:-1]))] or out.pop()
    return [t for t in out if t]


def unrolled_pairs(tree_bps: list[list[trees.BranchPoint]]) -> list[dict]:
    return [{"prompt": bp.history, "chosen": bp.responses[0], "rejected": bp.responses[1]}
            for bps in tree_bps for bp in bps]


def tree_batch(tree_bps, row_multiple: int = 1, **kw) -> dict[str, np.ndarray]:
    built = [trees.build(b) for b in tree_bps]
    batch = trees.layout(built, pad_id=0, row_multiple=row_multiple, **kw)
    index = batch.pop("bp_index")
    batch["pair_weight"] = np.asarray([1.0 if u < 0 else tree_bps[u][i].weight
                                       for u, i in index], np.float32)
    return batch


# ----------------------------------------------------------------------------- layout


def test_prefix_sharing_is_the_one_branch_point_tree():
    """A pair's tree lays out exactly as prefix sharing's unit (tokens, positions, scored
    columns), its DFS intervals order the branches as branch ids do; K = 3 responses too;
    unit_length counts the columns."""
    rng = np.random.default_rng(0)
    for k in (2, 3):
        for prompt_len in (0, 1, 4):
            prompt = _tok(rng, prompt_len, prompt_len)
            resp = [_tok(rng, 1, 4) for _ in range(k)]
            resp[1] = np.concatenate([resp[0][:1], resp[1]])  # starts like the best
            tree = trees.build([trees.BranchPoint(prompt, resp)])
            c = trees.columns(tree)
            tokens, positions, branch, scored = prefix.unit_columns(prompt, resp)
            np.testing.assert_array_equal(c["tokens"], tokens)
            np.testing.assert_array_equal(c["positions"], positions)
            np.testing.assert_array_equal(c["scored"], scored)
            np.testing.assert_array_equal(np.where(scored > 0, c["response"] + 1, 0),
                                          np.where(scored > 0, branch, 0))
            assert (np.diff(c["tree_lo"]) >= 0).all() and trees.unit_length(tree) == len(tokens)


def test_a_conversation_tree_layout():
    """Two turns: the chosen first answer is scored on the shared path and is the next
    history; the rejected answers branch off with the restated last history token."""
    a = lambda *x: np.asarray(x, np.int32)  # noqa: E731
    tree = trees.build([trees.BranchPoint(a(1, 2), [a(3, 4), a(5)]),
                        trees.BranchPoint(a(1, 2, 3, 4, 6), [a(7), a(8, 9)])])
    c = trees.columns(tree)
    assert c["tokens"].tolist() == [1, 2, 3, 4, 6, 7, 6, 8, 9, 2, 5]
    assert c["positions"].tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6, 1, 2]
    assert c["scored"].tolist() == [0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1]
    assert c["branch_point"].tolist() == [-1, -1, 0, 0, -1, 1, -1, 1, 1, -1, 0]
    assert c["response"].tolist() == [-1, -1, 0, 0, -1, 0, -1, 1, 1, -1, 1]
    assert c["tree_lo"].tolist() == [1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5]
    assert c["tree_hi"].tolist() == [5, 4, 4, 4, 3, 3, 4, 4, 4, 5, 5]
    assert trees.unit_length(tree) == 11


def _rows_of_sequences(batch, B):
    """Per sequence slot s: the (token, position) keys each of its scored tokens' predecessor
    column sees under the tree mask, as a tuple of sorted lists (the unrolled history check)."""
    meta = token_meta(jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["positions"]),
                      (jnp.asarray(batch["tree_lo"]), jnp.asarray(batch["tree_hi"])))
    mask = np.asarray(block_mask(meta, meta))[:, 0]
    out: dict[int, list] = {}
    for r, t in zip(*np.nonzero(batch["loss_mask"])):
        seen = sorted(zip(batch["positions"][r][mask[r, t - 1]].tolist(),
                          batch["input_ids"][r][mask[r, t - 1]].tolist()))
        out.setdefault(int(batch["seq_index"][r, t]), []).append(
            (seen, int(batch["input_ids"][r, t])))
    return out


@pytest.mark.parametrize("pack_length_step, shape", [(0, (5, 48)), (16, (3, 64))])
def test_every_scored_token_sees_exactly_its_unrolled_history(pack_length_step, shape):
    """On packed random trees: each scored token is predicted from a column that sees exactly
    the (position, token) keys of its unrolled sequence before it, and every slot scores the
    tokens of its response (positions 0 excluded), in order (``pack_length_step`` 16: rows
    of 64 hold the 12 trees in 3 rows instead of 5 rows of 48, the same rule)."""
    tree_bps = forest(12, seed=1)
    batch = tree_batch(tree_bps, packing=True, pack_length=48, buckets=[48],
                       pack_length_step=pack_length_step)
    assert batch["segment_ids"].max() >= 2 and batch["input_ids"].shape == shape
    assert_sees_unrolled_histories(batch, unrolled_pairs(tree_bps))


def assert_sees_unrolled_histories(batch, pairs) -> None:
    """Every scored token of the tree ``batch`` (its branch points are ``pairs``, in slot
    order) is predicted from a column that sees exactly the (position, token) keys of its
    unrolled sequence before it, and every slot scores its response's tokens in order."""
    B = len(pairs)
    got = _rows_of_sequences(batch, B)
    assert sorted(got) == list(range(2 * B))
    for s, toks in got.items():
        p = pairs[s % B]
        seq = np.concatenate([p["prompt"], p["chosen" if s < B else "rejected"]])
        start = max(len(p["prompt"]), 1)
        assert [t for _, t in toks] == seq[start:].tolist()
        for n, (seen, _) in enumerate(toks):
            assert seen == list(enumerate(seq[:start + n].tolist()))


# ----------------------------------------------------------------------------- exactness

FAMILIES = {
    "learned": ("tiny-gpt2", {}),
    "scaled_rotary_gqa": ("tiny-llama", {}),
    "sliding_window": ("tiny-llama", dict(sliding_window=3)),
    "gemma_sliding_softcaps": ("tiny-gemma", {}),
    "chunked_attention": ("tiny-llama", dict(attention_impl="chunked", attention_chunk=16)),
    "chunked_skip_blocks": ("tiny-llama", dict(attention_impl="chunked", attention_chunk=16,
                                               attention_skip_blocks=True, sliding_window=6)),
    "moe": ("tiny-llama", dict(n_experts=4, n_experts_per_tok=2)),
    "lora": ("tiny-llama", {}),
}


def _model_and_params(family):
    name, overrides = FAMILIES[family]
    cfg = preset(name, **overrides)
    if family != "lora":
        model = Model(cfg)
        return model, helpers.init_params(model)
    from dpo_jax import lora as lora_lib

    model = lora_lib.LoraModel(cfg, lora_lib.LoraConfig(rank=4))
    base = helpers.init_params(model)
    adapters = jax.jit(model.init_adapters)(jax.random.key(1))
    adapters = helpers.perturbed(adapters, scale=0.1)  # B != 0: the adapters change the model
    return model, lora_lib.join(base, adapters)


# Gemma (sliding + soft-caps) runs fast in test_prefix_sharing.py (the same mask code path),
# block skipping in test_tree_mask.py; the other families with --run-slow.
@pytest.mark.parametrize("family", helpers.fast_cases(
    list(FAMILIES), {"moe", "lora"}))
def test_branch_point_logps_and_their_gradient_match_unrolled_pairs(family):
    """Per-branch-point log-prob sums, counts and their vector-Jacobian product with a random
    cotangent equal those of the unrolled pairs (the real pair pipeline, one sequence per
    row): every model family, dense and chunked attention, a sliding window shorter than
    the histories (measured in positions), MoE and LoRA; packed trees."""
    model, params = _model_and_params(family)
    tree_bps = forest(6, seed=2)
    pairs = unrolled_pairs(tree_bps)
    B = len(pairs)
    cfg = StepConfig(logprobs=LogprobConfig(scored_only=True, seq_chunk=16))
    cot = jnp.asarray(np.random.default_rng(0).normal(size=2 * B), jnp.float32)
    batches = [helpers.pair_batch(pairs),
               tree_batch(tree_bps, packing=True, pack_length=64, buckets=[64])]
    assert batches[1]["input_ids"].size < batches[0]["input_ids"].size
    out = [helpers.logps_and_vjp(model, params, b, cfg, cot) for b in batches]
    (lp0, n0, g0), (lp1, n1, g1) = out
    np.testing.assert_array_equal(n1, n0)
    np.testing.assert_allclose(lp1, lp0, **LOGP_TOL)
    assert _rel(g1, g0) < 1e-5


_rel = helpers.rel_diff


def test_batch_format_of_tree_rows():
    """Tree rows are packed pairs or lists carrying tree_lo / tree_hi; they go to the model as
    tree intervals; mixing them with prefix sharing's branch ids is refused."""
    batch = tree_batch(forest(2, seed=3))
    fmt = batch_format.infer(batch)
    assert fmt == batch_format.BatchFormat("pairs", packed=True, tree=True)
    assert set(fmt.hidden_kwargs(batch)) == {"tree_BL"}
    fmt.check(batch)
    with pytest.raises(ValueError, match="packed"):
        batch_format.BatchFormat("pairs", tree=True)
    with pytest.raises(ValueError, match="not both"):
        batch_format.BatchFormat("pairs", packed=True, tree=True, prefix_shared=True)
    with pytest.raises(ValueError, match="tree_lo"):
        batch_format.BatchFormat("pairs", packed=True).check(batch)


# ----------------------------------------------------------------------------- the step


_one_step = helpers.sgd_step


def _assert_same_step(a, b, keys=("loss", "rewards/margins", "grad_norm")):
    (update0, m0), (update1, m1) = a, b
    for k in keys:
        np.testing.assert_allclose(m1[k], m0[k], rtol=2e-5, atol=2e-6, err_msg=k)
    assert helpers.global_norm(update0) > 0 and _rel(update1, update0) < 1e-5


def _weighted_pairs(tree_bps):
    """The unrolled pairs' batch with each branch point's weight as its pair_weight."""
    batch = helpers.pair_batch(unrolled_pairs(tree_bps), row_multiple=8)
    batch["pair_weight"] = np.asarray([bp.weight for bps in tree_bps for bp in bps], np.float32)
    return batch


@pytest.mark.parametrize("loss", ["sigmoid"] + [pytest.param(x, marks=pytest.mark.slow)
                                  for x in ("ipo", "simpo")])
def test_train_step_at_every_branch_point_with_weights_on_a_mesh(loss):
    """One SGD step on the (2, 2, 2) mesh with the online reference forward: a pairwise loss at
    every binary branch point, weighted per branch point (here by depth: 1, 2, 3), gives the
    loss, metrics and update of the unrolled pairs carrying the same weights."""
    model = helpers.tiny_model()
    params, ref_params = helpers.init_params(model), helpers.init_params(model, seed=1)
    loss_cfg = helpers.loss_config(loss, beta=0.5)
    ref = ref_params if losses_lib.needs_reference(loss_cfg) else None
    tree_bps = forest(8, seed=4, branch_points=16)
    assert len({bp.weight for bps in tree_bps for bp in bps}) >= 2
    mesh_ = helpers.mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batches = [_weighted_pairs(tree_bps),
               tree_batch(tree_bps, row_multiple=8, packing=True, pack_length=64, buckets=[64])]
    _assert_same_step(*[_one_step(model, params, ref, b, loss_cfg, mesh_) for b in batches])


def test_stored_reference_logps_through_trees():
    """Reference log-probs computed once through tree rows equal the unrolled pairs' (the
    stored [2B] layout of precompute_reference), and a step reading them equals the unrolled
    step reading theirs."""
    model = helpers.tiny_model()
    params, ref_params = helpers.init_params(model), helpers.init_params(model, seed=1)
    tree_bps = forest(8, seed=5, branch_points=16)
    batches = [_weighted_pairs(tree_bps),
               tree_batch(tree_bps, row_multiple=8, packing=True, pack_length=64, buckets=[64])]
    stored = []
    for b in batches:
        s = jax.jit(lambda p, bb: sequence_stats(model, p, bb, StepConfig(), None))(
            ref_params, {k: jnp.asarray(v) for k, v in b.items()})
        stored.append((np.asarray(s.logps), np.asarray(s.lengths)))
    np.testing.assert_array_equal(stored[1][1], stored[0][1])
    np.testing.assert_allclose(stored[1][0], stored[0][0], **LOGP_TOL)
    steps = []
    for b, (logps, lengths) in zip(batches, stored):
        b = dict(b, ref_logps=logps, ref_lengths=lengths)
        steps.append(_one_step(model, params, None, b, helpers.loss_config(beta=0.5),
                               helpers.mesh()))
    _assert_same_step(*steps)


def test_plackett_luce_at_three_way_branch_points():
    """Ranked 3-way branch points (data.format='ranked'): plackett_luce over each branch
    point's siblings equals the unrolled ranked lists (the real ranked pipeline)."""
    from dpo_jax.data import ranked

    model = helpers.tiny_model()
    params, ref_params = helpers.init_params(model), helpers.init_params(model, seed=1)
    tree_bps = forest(6, seed=6, k=3, branch_points=8)
    items = [{"prompt": bp.history, "responses": list(bp.responses),
              "scores": -np.arange(3, dtype=np.float32), "ranks": np.arange(3, dtype=np.int32)}
             for bps in tree_bps for bp in bps]
    pipe = ranked.RankedPipeline(items, helpers.data_config(format="ranked", row_multiple=8),
                                 train=False, global_batch_size=len(items), pad_id=0)
    plain = next(iter(pipe))
    plain["pair_weight"] = np.asarray([bp.weight for bps in tree_bps for bp in bps], np.float32)
    tree = tree_batch(tree_bps, row_multiple=8, packing=True, pack_length=64, buckets=[64])
    tree["slot_rank"] = np.tile(np.arange(3, dtype=np.int32), (len(items), 1))
    loss_cfg = helpers.loss_config("plackett_luce", beta=0.5)
    mesh_ = helpers.mesh({"data": 2, "fsdp": 1, "tensor": 4})
    steps = [_one_step(model, params, ref_params, b, loss_cfg, mesh_) for b in (plain, tree)]
    _assert_same_step(*steps, keys=("loss", "grad_norm"))
