"""Per-token and per-sequence log-probs of responses, from final hidden states.

The LM head is applied here, not in the model, so that the ``[rows, length, vocab]`` float32
logits wall never has to exist: positions are optionally compacted to the scored (response)
tokens, then processed in chunks along the sequence, and each chunk's logsumexp is accumulated
over vocabulary slices in float32. Each sequence chunk is rematerialised in the backward pass, so
memory grows with ``rows * chunk * vocab_chunk``, not ``rows * length * vocab``. Gradients are
exact: the running max is a constant of the logsumexp and carries no gradient.

Conventions: ``loss_mask[r, t] = 1`` means token ``input_ids[r, t]`` is scored, predicted from
the hidden state at ``t - 1``. Everything here is pure and jittable.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from dpo_jax.models import context_parallel
from dpo_jax.models.model import project


@dataclasses.dataclass(frozen=True)
class LogprobConfig:
    """How the LM head and log-softmax are evaluated (numbers are identical; cost is not)."""

    scored_only: bool = True  # compact to scored positions before the LM head
    seq_chunk: int | None = 128  # positions per chunk (None: all at once)
    vocab_chunk: int | None = 8192  # vocabulary slice of the online logsumexp (None: whole)


DENSE = LogprobConfig(scored_only=False, seq_chunk=None, vocab_chunk=None)


@flax.struct.dataclass
class SequenceLogps:
    """:func:`sequence_logps`' result, float32 per sequence (``[R]`` unpacked, ``[num_seqs]``
    packed)."""

    sums: jax.Array  # summed (LD-DPO: weighted) log-probs of the scored tokens
    counts: jax.Array  # scored tokens (unweighted)
    wpo_sums: jax.Array | None = None  # with_wpo: sum of log p_t - log sum_v p_v^2 (no gradient)
    # with_hidden: f32 [S, D] sum of the hidden states that predict the scored tokens (no gradient)
    hidden_sums: jax.Array | None = None


def _pick(logits, index):
    """``logits[..., index]`` per position. Under context parallelism as a one-hot select and
    sum over the vocabulary (exact: one term): XLA's partitioner (jax 0.10.2) aborts on the
    gather inside the head's shard_map when the vocabulary is split over ``tensor``."""
    if context_parallel.context_mesh() is None:
        return jnp.take_along_axis(logits, index[..., None], axis=-1)[..., 0]
    hot = jnp.arange(logits.shape[-1]) == index[..., None]
    return jnp.sum(jnp.where(hot, logits, 0.0), axis=-1)


def _chunk_logps(h_RCD, targets_RC, w_VD, b_V, vocab_chunk, with_sq: bool = False,
                 softcap: float | None = None):
    """log p(target) for one chunk: target logit minus a float32 (online) logsumexp.

    ``with_sq``: also ``log sum_v p_v^2`` per position (WPO's normaliser), ``logsumexp(2 l) -
    2 logsumexp(l)``, accumulated online on the same running max and under stop_gradient."""
    vocab = w_VD.shape[0]
    if not vocab_chunk or vocab_chunk >= vocab:
        logits = project(h_RCD, w_VD, b_V, softcap)
        target = _pick(logits, targets_RC)
        lse = jax.nn.logsumexp(logits, axis=-1)
        if not with_sq:
            return target - lse
        frozen = jax.lax.stop_gradient(logits)
        log_sq = jax.nn.logsumexp(2.0 * frozen, axis=-1) - 2.0 * jax.lax.stop_gradient(lse)
        return target - lse, log_sq
    running_max = running_sum = running_sq = target = None
    for start in range(0, vocab, vocab_chunk):
        end = min(vocab, start + vocab_chunk)
        logits = project(h_RCD, w_VD[start:end], None if b_V is None else b_V[start:end],
                         softcap)
        chunk_max = jax.lax.stop_gradient(logits.max(axis=-1))
        in_chunk = (targets_RC >= start) & (targets_RC < end)
        index = jnp.clip(targets_RC - start, 0, end - start - 1)
        hit = _pick(logits, index)
        hit = jnp.where(in_chunk, hit, 0.0)
        if running_max is None:
            running_max = chunk_max
            running_sum = jnp.exp(logits - chunk_max[..., None]).sum(-1)
            if with_sq:
                running_sq = jnp.exp(2.0 * (jax.lax.stop_gradient(logits) - chunk_max[..., None])).sum(-1)
            target = hit
            continue
        new_max = jnp.maximum(running_max, chunk_max)
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(
            logits - new_max[..., None]
        ).sum(-1)
        if with_sq:
            running_sq = running_sq * jnp.exp(2.0 * (running_max - new_max)) + jnp.exp(
                2.0 * (jax.lax.stop_gradient(logits) - new_max[..., None])).sum(-1)
        running_max = new_max
        target = target + hit
    logps = target - (running_max + jnp.log(running_sum))
    if not with_sq:
        return logps
    return logps, jnp.log(running_sq) - 2.0 * jnp.log(jax.lax.stop_gradient(running_sum))


def token_logps(h_RSD, targets_RS, w_VD, b_V, cfg: LogprobConfig = LogprobConfig(),
                with_sq: bool = False, softcap: float | None = None):
    """float32 [R, S] log-probs of ``targets_RS`` given hidden states ``h_RSD`` (aligned).
    ``softcap``: the model's final logit soft-cap (Gemma 2), applied to every logit.

    ``with_sq``: returns ``(logps_RS, log_sq_RS)`` with ``log_sq = log sum_v p_v^2`` at each
    position (no gradient), from the same chunked pass."""
    rows, length, _ = h_RSD.shape
    chunk = cfg.seq_chunk
    if not chunk or chunk >= length:
        return _chunk_logps(h_RSD, targets_RS, w_VD, b_V, cfg.vocab_chunk, with_sq, softcap)
    pad = (-length) % chunk
    if pad:
        h_RSD = jnp.pad(h_RSD, ((0, 0), (0, pad), (0, 0)))
        targets_RS = jnp.pad(targets_RS, ((0, 0), (0, pad)))
    n = (length + pad) // chunk
    # [R, n*C, ...] -> [n, R, C, ...]: rows stay sharded, every device works on every chunk.
    h_nRCD = jnp.moveaxis(h_RSD.reshape(rows, n, chunk, -1), 1, 0)
    t_nRC = jnp.moveaxis(targets_RS.reshape(rows, n, chunk), 1, 0)

    @jax.checkpoint
    def one(h_RCD, t_RC):
        return _chunk_logps(h_RCD, t_RC, w_VD, b_V, cfg.vocab_chunk, with_sq, softcap)

    _, out_nRC = jax.lax.scan(lambda c, x: (c, one(*x)), None, (h_nRCD, t_nRC))
    unchunk = lambda a: jnp.moveaxis(a, 0, 1).reshape(rows, n * chunk)[:, :length]  # noqa: E731
    return jax.tree.map(unchunk, out_nRC)


def compact_scored(mask_RL, max_scored: int):
    """Indices [R, max_scored] of each row's scored positions first (stable), and their mask."""
    order_RS = jnp.argsort(mask_RL <= 0, axis=1, stable=True)[:, :max_scored]
    return order_RS, jnp.take_along_axis(mask_RL, order_RS, axis=1)


def sequence_logps(
    h_RLD,
    input_ids_RL,
    loss_mask_RL,
    w_VD,
    b_V,
    cfg: LogprobConfig = LogprobConfig(),
    *,
    max_scored: int | None = None,
    seq_index_RL=None,
    num_seqs: int | None = None,
    ld_shared_S=None,
    ld_alpha: float = 1.0,
    with_wpo: bool = False,
    softcap: float | None = None,
    with_hidden: bool = False,
):
    """Summed float32 log-probs and scored-token counts per sequence: a :class:`SequenceLogps`.

    Unpacked batches (``seq_index_RL`` None): one sequence per row, returns ``[R]`` arrays.
    Packed batches: ``seq_index_RL`` gives each scored token's sequence slot, ``[num_seqs]``.
    ``max_scored`` (static) bounds the scored tokens of any row when ``cfg.scored_only``; the
    caller guarantees it (``max_scored_tokens`` on the host batch).

    LD-DPO (Liu et al. 2024): with ``ld_shared_S`` (per sequence, float), the k-th scored token
    of a sequence counts with weight 1 while k <= ld_shared_S[seq] and ``ld_alpha`` after it
    (counts stay unweighted). ``with_wpo``: also returns, per sequence, the sum over its scored
    tokens of ``log p_t - log sum_v p_v^2`` (WPO's aligned log-prob, no gradient) as
    ``wpo_sums`` (else None). ``softcap``: see :func:`token_logps`. ``with_hidden``: also
    returns ``hidden_sums`` float32 ``[R or num_seqs, D]``, per sequence the sum of the hidden
    states ``h_RLD[t - 1]`` of its scored tokens ``t`` (the vectors the LM head multiplies: the
    sums of Razin et al. 2024's CHES score, ``dpo_jax.diagnostics``), without gradient.
    Context parallelism (traced under a mesh whose ``context`` axis has more than one device,
    ``models/context_parallel.py``): the rows' positions stay split over that axis; the
    targets and masks are shifted by one token instead of the hidden states (so nothing of
    size D crosses the split), each device runs the head on its own positions under
    ``jax.shard_map`` and the per-sequence sums are ``psum``-ed over the axis (LD-DPO's ranks
    count the scored tokens of the earlier shards). The same numbers to float32 round-off.
    """
    index = None if seq_index_RL is None else seq_index_RL[:, 1:]
    options = dict(cfg=cfg, max_scored=max_scored, num_seqs=num_seqs, ld_alpha=ld_alpha,
                   with_wpo=with_wpo, softcap=softcap, with_hidden=with_hidden)
    if seq_index_RL is not None and num_seqs is None:
        raise ValueError("packed batches need num_seqs")
    mesh = context_parallel.context_mesh()
    if mesh is None:
        return _aligned_sums(h_RLD[:, :-1], input_ids_RL[:, 1:],
                             loss_mask_RL[:, 1:].astype(jnp.float32), index, w_VD, b_V,
                             ld_shared_S, **options)
    # position t predicts token t + 1: shift the (integer) targets left, keep h where it is
    shift = lambda a: jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)  # noqa
    arrays = {"h": h_RLD, "targets": shift(input_ids_RL),
              "mask": shift(loss_mask_RL.astype(jnp.float32))}
    if seq_index_RL is not None:
        arrays["index"] = shift(seq_index_RL)
    c, length = mesh.shape[context_parallel.AXIS], h_RLD.shape[1]
    if length % c:
        arrays = {k: jnp.pad(v, [(0, 0), (0, -length % c)] + [(0, 0)] * (v.ndim - 2))
                  for k, v in arrays.items()}
    seq = P(None, context_parallel.AXIS)
    rest = {"w": w_VD, "b": b_V, "ld": ld_shared_S}

    def local(arrays, rest):
        # rows stay where the compiler puts them, each device's positions whole: left free,
        # XLA's partitioner may split the gathers along the positions over another axis and
        # then fails on the device groups (jax 0.10.2, tensor > 1)
        whole = lambda x: jax.lax.with_sharding_constraint(  # noqa: E731
            x, P(P.UNCONSTRAINED, *([None] * (x.ndim - 1))))
        arrays = jax.tree.map(whole, arrays)
        return _aligned_sums(arrays["h"], arrays["targets"], arrays["mask"],
                             arrays.get("index"), rest["w"], rest["b"], rest["ld"],
                             axis=context_parallel.AXIS, **options)

    return jax.shard_map(local, mesh=mesh, in_specs=(jax.tree.map(lambda _: seq, arrays), P()),
                         out_specs=P(), axis_names={context_parallel.AXIS})(arrays, rest)


def _aligned_sums(h, targets, mask, index, w_VD, b_V, ld_shared_S, *, cfg, max_scored,
                  num_seqs, ld_alpha, with_wpo, softcap, with_hidden, axis=None):
    """:func:`sequence_logps` on aligned arrays: ``h`` [R, L, D] predicts ``targets`` [R, L]
    with float ``mask`` [R, L] and packed ``index`` [R, L] or None. ``axis``: these are one
    device's positions of rows split over that mesh axis (inside ``shard_map``); the sums and
    LD-DPO's ranks then take the other devices' parts into account."""
    if axis is None:
        offset = 0.0
        reduce = lambda x: x  # noqa: E731
    else:
        # scored tokens of each row on the devices before this one (LD-DPO's ranks)
        before = jax.lax.all_gather(mask.sum(axis=1), axis)  # [c, R]
        earlier = jnp.arange(before.shape[0]) < jax.lax.axis_index(axis)
        offset = jnp.sum(jnp.where(earlier[:, None], before, 0.0), axis=0)[:, None]
        reduce = lambda x: jax.lax.psum(x, axis)  # noqa: E731
    if cfg.scored_only:
        width = mask.shape[1] if max_scored is None else min(max_scored, mask.shape[1])
        order, mask = compact_scored(mask, width)
        h = jnp.take_along_axis(h, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        if index is not None:
            index = jnp.take_along_axis(index, order, axis=1)
    out = token_logps(h, targets, w_VD, b_V, cfg, with_sq=with_wpo, softcap=softcap)
    logps, log_sq = out if with_wpo else (out, None)
    weight = mask
    if index is None:  # one sequence per row: sums along the row keep the rows' sharding
        def per_seq(x):
            return reduce(x.sum(axis=1))

        if ld_shared_S is not None:
            # 1-based rank of each scored token in its row
            rank = jnp.cumsum(mask, axis=1) + offset
            shared = jnp.asarray(ld_shared_S, jnp.float32)[:, None]
            weight = mask * jnp.where(rank <= shared, 1.0, ld_alpha)
    else:
        slot = jnp.where(mask > 0, index, num_seqs)  # unscored tokens go to a dropped slot

        if axis is None:
            def seg_sum(x):  # [R, L, ...] -> [num_seqs, ...]
                return jax.ops.segment_sum(x.reshape(-1, *x.shape[2:]), slot.reshape(-1),
                                           num_segments=num_seqs + 1)[:num_seqs]
        else:
            # a one-hot contraction instead of segment_sum: XLA's partitioner (jax 0.10.2)
            # fails on the gather of segment_sum's transpose inside this shard_map when
            # another mesh axis (tensor) is left to it
            hot = (slot[..., None] == jnp.arange(num_seqs)).astype(jnp.float32)  # [R, L, S]

            def seg_sum(x):
                return jnp.einsum("rls,rl...->s...", hot, x)

        def per_seq(x):
            return reduce(seg_sum(x))

        if ld_shared_S is not None:
            # Rank within the sequence: the row's running count of scored tokens minus that
            # count at the sequence's first token, plus 1.
            count = jnp.cumsum(mask, axis=1) + offset
            first = jax.ops.segment_min(jnp.where(mask > 0, count, jnp.inf).reshape(-1),
                                        slot.reshape(-1), num_segments=num_seqs + 1)
            if axis is not None:
                first = jax.lax.pmin(first, axis)
            rank = count - _at_slot(first, slot, axis) + 1.0
            shared = _at_slot(jnp.concatenate([jnp.asarray(ld_shared_S, jnp.float32),
                                               jnp.zeros((1,), jnp.float32)]), slot, axis)
            weight = mask * jnp.where(rank <= shared, 1.0, ld_alpha)
    sums, counts = per_seq(logps * weight), per_seq(mask)
    wpo = per_seq((jax.lax.stop_gradient(logps) - log_sq) * mask) if with_wpo else None
    hidden = None
    if with_hidden:
        h_f32 = jax.lax.stop_gradient(h).astype(jnp.float32) * mask[..., None]
        hidden = per_seq(h_f32)
    return SequenceLogps(sums, counts, wpo, hidden)


def _at_slot(table, slot, axis):
    """``table[slot]`` (``table`` [num_seqs + 1], ``slot`` [R, L]); inside the context-parallel
    shard_map (``axis``) as a one-hot select, not a gather (see ``_aligned_sums``)."""
    if axis is None:
        return table[slot]
    return jnp.sum(jnp.where(slot[..., None] == jnp.arange(table.shape[0]), table, 0.0), -1)


def scored_counts(loss_mask_RL, seq_index_RL=None, num_seqs: int | None = None):
    """Scored tokens per sequence, ``[R]`` (unpacked) or ``[num_seqs]`` (packed), from the
    batch's mask alone (no forward): what :func:`sequence_logps` returns as counts."""
    mask = loss_mask_RL[:, 1:].astype(jnp.float32)
    if seq_index_RL is None:
        return mask.sum(axis=1)
    slot = jnp.where(mask > 0, seq_index_RL[:, 1:], num_seqs)
    return jax.ops.segment_sum(mask.reshape(-1), slot.reshape(-1),
                               num_segments=num_seqs + 1)[:num_seqs]


def max_scored_tokens(loss_mask_RL, minimum: int = 16, steps_per_octave: int = 1) -> int:
    """Host-side: the static ``max_scored`` for a numpy batch.

    Rounded up to a power of two (capped at the row length) so a run compiles a handful of
    programs, not one per batch. ``steps_per_octave`` > 1 rounds to that many evenly spaced
    steps between powers of two instead (4: ..., 128, 160, 192, 224, 256): less head work
    for rows whose count sits just above a power of two (a prefix-shared row scores both
    responses, e.g. 130 tokens -> 256 slots, or 160 with 4 steps), more distinct programs.
    """
    import numpy as np

    most = int(np.max(np.sum(np.asarray(loss_mask_RL)[:, 1:] > 0, axis=1), initial=1))
    length = np.shape(loss_mask_RL)[1] - 1
    bound = 1 << (most - 1).bit_length()
    step = (bound // 2) // max(int(steps_per_octave), 1)
    if steps_per_octave > 1 and step >= 1:
        bound = -(-most // step) * step
    return int(min(length, max(minimum, bound)))
