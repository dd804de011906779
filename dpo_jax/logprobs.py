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

import jax
import jax.numpy as jnp

from dpo_jax.models.model import project


@dataclasses.dataclass(frozen=True)
class LogprobConfig:
    """How the LM head and log-softmax are evaluated (numbers are identical; cost is not)."""

    scored_only: bool = True  # compact to scored positions before the LM head
    seq_chunk: int | None = 128  # positions per chunk (None: all at once)
    vocab_chunk: int | None = 8192  # vocabulary slice of the online logsumexp (None: whole)


DENSE = LogprobConfig(scored_only=False, seq_chunk=None, vocab_chunk=None)


def _chunk_logps(h_RCD, targets_RC, w_VD, b_V, vocab_chunk):
    """log p(target) for one chunk: target logit minus a float32 (online) logsumexp."""
    vocab = w_VD.shape[0]
    if not vocab_chunk or vocab_chunk >= vocab:
        logits = project(h_RCD, w_VD, b_V)
        target = jnp.take_along_axis(logits, targets_RC[..., None], axis=-1)[..., 0]
        return target - jax.nn.logsumexp(logits, axis=-1)
    running_max = running_sum = target = None
    for start in range(0, vocab, vocab_chunk):
        end = min(vocab, start + vocab_chunk)
        logits = project(h_RCD, w_VD[start:end], None if b_V is None else b_V[start:end])
        chunk_max = jax.lax.stop_gradient(logits.max(axis=-1))
        in_chunk = (targets_RC >= start) & (targets_RC < end)
        index = jnp.clip(targets_RC - start, 0, end - start - 1)
        hit = jnp.take_along_axis(logits, index[..., None], axis=-1)[..., 0]
        hit = jnp.where(in_chunk, hit, 0.0)
        if running_max is None:
            running_max = chunk_max
            running_sum = jnp.exp(logits - chunk_max[..., None]).sum(-1)
            target = hit
            continue
        new_max = jnp.maximum(running_max, chunk_max)
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(
            logits - new_max[..., None]
        ).sum(-1)
        running_max = new_max
        target = target + hit
    return target - (running_max + jnp.log(running_sum))


def token_logps(h_RSD, targets_RS, w_VD, b_V, cfg: LogprobConfig = LogprobConfig()):
    """float32 [R, S] log-probs of ``targets_RS`` given hidden states ``h_RSD`` (aligned)."""
    rows, length, _ = h_RSD.shape
    chunk = cfg.seq_chunk
    if not chunk or chunk >= length:
        return _chunk_logps(h_RSD, targets_RS, w_VD, b_V, cfg.vocab_chunk)
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
        return _chunk_logps(h_RCD, t_RC, w_VD, b_V, cfg.vocab_chunk)

    _, logps_nRC = jax.lax.scan(lambda c, x: (c, one(*x)), None, (h_nRCD, t_nRC))
    return jnp.moveaxis(logps_nRC, 0, 1).reshape(rows, n * chunk)[:, :length]


def compact_scored(mask_RL, num_scored: int):
    """Indices [R, num_scored] of each row's scored positions first (stable), and their mask."""
    order_RS = jnp.argsort(mask_RL <= 0, axis=1, stable=True)[:, :num_scored]
    return order_RS, jnp.take_along_axis(mask_RL, order_RS, axis=1)


def sequence_logps(
    h_RLD,
    input_ids_RL,
    loss_mask_RL,
    w_VD,
    b_V,
    cfg: LogprobConfig = LogprobConfig(),
    *,
    num_scored: int | None = None,
    seq_index_RL=None,
    num_seqs: int | None = None,
):
    """Summed float32 log-probs and scored-token counts per sequence.

    Unpacked batches (``seq_index_RL`` None): one sequence per row, returns ``[R]`` arrays.
    Packed batches: ``seq_index_RL`` gives each scored token's sequence slot, ``[num_seqs]``.
    ``num_scored`` (static) bounds the scored tokens of any row when ``cfg.scored_only``; the
    caller guarantees it (``max_scored_tokens`` on the host batch).
    """
    h = h_RLD[:, :-1]
    targets = input_ids_RL[:, 1:]
    mask = loss_mask_RL[:, 1:].astype(jnp.float32)
    index = None if seq_index_RL is None else seq_index_RL[:, 1:]
    if cfg.scored_only:
        width = mask.shape[1] if num_scored is None else min(num_scored, mask.shape[1])
        order, mask = compact_scored(mask, width)
        h = jnp.take_along_axis(h, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        if index is not None:
            index = jnp.take_along_axis(index, order, axis=1)
    logps = token_logps(h, targets, w_VD, b_V, cfg) * mask
    if index is None:
        return logps.sum(axis=1), mask.sum(axis=1)
    if num_seqs is None:
        raise ValueError("packed batches need num_seqs")
    slot = jnp.where(mask > 0, index, num_seqs).reshape(-1)
    sums = jax.ops.segment_sum(logps.reshape(-1), slot, num_segments=num_seqs + 1)
    counts = jax.ops.segment_sum(mask.reshape(-1), slot, num_segments=num_seqs + 1)
    return sums[:num_seqs], counts[:num_seqs]


def max_scored_tokens(loss_mask_RL, minimum: int = 16) -> int:
    """Host-side: the static ``num_scored`` for a numpy batch.

    Rounded up to a power of two (capped at the row length) so a run compiles a handful of
    programs, not one per batch.
    """
    import numpy as np

    most = int(np.max(np.sum(np.asarray(loss_mask_RL)[:, 1:] > 0, axis=1), initial=1))
    length = np.shape(loss_mask_RL)[1] - 1
    return int(min(length, max(minimum, 1 << (most - 1).bit_length())))
