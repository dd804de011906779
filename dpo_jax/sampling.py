"""Batched autoregressive sampling with the model's KV cache: one jitted program per shape.

Why a fixed-length ``lax.scan`` rather than a host loop: the whole generation is one XLA program
(compiled once per (batch, prompt length, config)), it shards over the batch like any other
batch computation, and no step waits on the host. A row stops at the first token in
``SamplingConfig.stop_ids`` (the data's end tokens: ``dpo_jax.data.prompts.stop_ids``); rows that
stopped keep running but emit ``pad_id`` with mask 0; the cost is the same fixed
``max_new_tokens`` steps for every batch. The completion of a row is its generated tokens up to
and including its first stop token (``completion_mask_BT``, ``lengths_B``): lengths, log-probs,
KL and rewards read only those; ``stopped_B`` says whether a row stopped or ran to
``max_new_tokens``.

Prompts are right-padded ``[B, P]`` with per-row lengths. The prefill runs all prompt tokens with
segment ids (0 = padding); then each row feeds its own next token at its own position, so rows
of different prompt lengths share one batch and every completion starts right after its prompt.

``logps_BT`` is the log-prob of each sampled token under the model's *untempered*
distribution (what KL and policy-gradient estimators need), whatever temperature / top-k /
top-p shaped the sampling distribution.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp

from dpo_jax.models.model import Model, Params, project
from dpo_jax.logprobs import DENSE, token_logps


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. temperature=0 is greedy (argmax; top-k/top-p then irrelevant).

    ``stop_ids``: the token ids that end a completion (any of them; ``()`` = none, every row runs
    to ``max_new_tokens``). Runs take them from the data (``dpo_jax.data.prompts.stop_ids``:
    the end tokens the pair tokenizer appends to responses). A list is stored as a tuple."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        ids = (self.stop_ids,) if isinstance(self.stop_ids, int) else self.stop_ids
        object.__setattr__(self, "stop_ids", tuple(int(t) for t in ids))


@flax.struct.dataclass
class Samples:
    """Prompt + completion per row, completions placed right after each row's own prompt."""

    tokens_BT: jax.Array  # int32 [B, P + max_new_tokens], right-padded with pad_id
    completion_mask_BT: jax.Array  # float32: 1 at generated tokens up to and including the stop
    logps_BT: jax.Array  # float32: untempered log p(token | prefix) at generated tokens, else 0
    lengths_B: jax.Array  # int32: generated tokens per row (the stop token included)
    stopped_B: jax.Array | None = None  # bool: the row ended on a stop id (else max_new_tokens)


def filter_logits(logits_BV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Set logits outside the top-k / top-p nucleus to -inf (top-k first, then top-p).

    The nucleus is the smallest prefix of tokens sorted by probability whose mass reaches
    ``top_p`` (a token is kept when the mass strictly before it is < top_p), so the most likely
    token always survives. Ties at the cut-off logit are all kept.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    neg = jnp.finfo(jnp.float32).min
    vocab = logits_BV.shape[-1]
    if top_k and 0 < top_k < vocab:
        kth = jax.lax.top_k(logits_BV, top_k)[0][..., -1:]
        logits_BV = jnp.where(logits_BV < kth, neg, logits_BV)
    if top_p < 1.0:
        sorted_desc = -jnp.sort(-logits_BV, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff, neg, logits_BV)
    return logits_BV


def sample_token(logits_BV: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """One token per row from float32 logits under cfg's temperature / top-k / top-p."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    shaped = filter_logits(logits_BV / cfg.temperature, cfg.top_k, cfg.top_p)
    return jax.random.categorical(key, shaped, axis=-1).astype(jnp.int32)


def _place(row_T: jax.Array, values_N: jax.Array, start: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(row_T, values_N, start, 0)


@functools.partial(jax.jit, static_argnums=(0, 5))
def generate(model: Model, params: Params, prompt_ids_BP: jax.Array, prompt_lengths_B: jax.Array,
             rng: jax.Array, cfg: SamplingConfig) -> Samples:
    """Sample ``cfg.max_new_tokens`` tokens (or through the first of ``cfg.stop_ids``) after
    each right-padded prompt ``prompt_ids_BP`` int [B, P] with ``prompt_lengths_B`` int [B].

    Jitted with ``model`` and ``cfg`` static; also traceable inside a caller's jit, where
    batch-sharded inputs give batch-sharded outputs (the same numbers as unsharded: every
    draw comes from a per-step key, split by row inside ``jax.random.categorical``).
    Prompt lengths must be >= 1.
    """
    B, P = prompt_ids_BP.shape
    N = int(cfg.max_new_tokens)
    T = P + N
    if N < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {N}")
    if model.cfg.position == "learned" and T > model.cfg.max_len:
        raise ValueError(f"prompt {P} + max_new_tokens {N} exceeds the model's max_len "
                         f"{model.cfg.max_len}")
    prompt_ids_BP = prompt_ids_BP.astype(jnp.int32)
    lengths_B = prompt_lengths_B.astype(jnp.int32)
    w_VD, b_V = model.unembedding(params, caller_applies_softcap=True)
    cap = model.cfg.final_logit_softcap
    in_prompt_BP = jnp.arange(P)[None, :] < lengths_B[:, None]
    stop_S = jnp.asarray(cfg.stop_ids, jnp.int32)

    cache = model.init_cache(B, T)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    h_BPD, cache = model.decode(params, prompt_ids_BP, positions_BP, cache,
                                in_prompt_BP.astype(jnp.int32))
    h_last_BD = jnp.take_along_axis(h_BPD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    logits_BV = project(h_last_BD, w_VD, b_V, cap)

    def emit(logits_BV, key, done_B):
        token_B = sample_token(logits_BV, key, cfg)
        logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1),
                                     token_B[:, None], axis=-1)[:, 0]
        live_B = ~done_B
        token_B = jnp.where(live_B, token_B, cfg.pad_id)
        logp_B = jnp.where(live_B, logp_B, 0.0)
        if cfg.stop_ids:
            done_B = done_B | (live_B & jnp.any(token_B[:, None] == stop_S[None, :], axis=1))
        return token_B, logp_B, live_B, done_B

    keys = jax.random.split(rng, N)
    token_B, logp_B, live_B, done_B = emit(logits_BV, keys[0], jnp.zeros((B,), bool))

    def body(carry, xs):
        cache, token_B, live_B, done_B = carry
        key, i = xs
        # Feed the previous token at its row's position (finished rows do not advance).
        pos_B1 = (lengths_B + i - 1)[:, None]
        h_B1D, cache = model.decode(params, token_B[:, None], pos_B1, cache,
                                    live_B[:, None].astype(jnp.int32))
        logits_BV = project(h_B1D[:, 0], w_VD, b_V, cap)
        token_B, logp_B, live_B, done_B = emit(logits_BV, key, done_B)
        return (cache, token_B, live_B, done_B), (token_B, logp_B, live_B)

    (_, _, _, done_B), (toks_NB, logps_NB, live_NB) = jax.lax.scan(
        body, (cache, token_B, live_B, done_B), (keys[1:], jnp.arange(1, N)))
    toks_BN = jnp.concatenate([token_B[:, None], toks_NB.T], axis=1)
    logps_BN = jnp.concatenate([logp_B[:, None], logps_NB.T], axis=1)
    live_BN = jnp.concatenate([live_B[:, None], live_NB.T], axis=1).astype(jnp.float32)

    prompt_BT = jnp.full((B, T), cfg.pad_id, jnp.int32).at[:, :P].set(
        jnp.where(in_prompt_BP, prompt_ids_BP, cfg.pad_id))
    place = jax.vmap(_place)
    tokens_BT = place(prompt_BT, toks_BN, lengths_B)
    mask_BT = place(jnp.zeros((B, T), jnp.float32), live_BN, lengths_B)
    logps_BT = place(jnp.zeros((B, T), jnp.float32), logps_BN, lengths_B)
    return Samples(tokens_BT=tokens_BT, completion_mask_BT=mask_BT, logps_BT=logps_BT,
                   lengths_B=jnp.sum(live_BN, axis=1).astype(jnp.int32), stopped_B=done_B)


def completion_kl(model: Model, ref_params: Params, samples: Samples,
                  prompt_lengths_B: jax.Array) -> jax.Array:
    """float32 [B]: the summed ``log pi(t) - log pi_ref(t)`` over each row's completion (its
    generated tokens through the first stop token, nothing after): the sampler's untempered
    log-probs against one forward of the reference (``ref_params``) on the same tokens. Its
    mean over rows is the Monte-Carlo sequence KL(pi || pi_ref) in nats."""
    ref_logps_BT = score_tokens(model, ref_params, samples.tokens_BT,
                                sequence_mask(samples, prompt_lengths_B))
    return jnp.sum((samples.logps_BT - ref_logps_BT) * samples.completion_mask_BT, axis=1)


def sequence_mask(samples: Samples, prompt_lengths_B: jax.Array) -> jax.Array:
    """int32 [B, T] segment ids (1 on prompt + completion, 0 on padding) for rescoring the
    samples with ``Model.hidden`` / ``Model.logits``."""
    T = samples.tokens_BT.shape[1]
    in_prompt = jnp.arange(T)[None, :] < prompt_lengths_B[:, None]
    return (in_prompt | (samples.completion_mask_BT > 0)).astype(jnp.int32)


def score_tokens(model: Model, params: Params, tokens_BT: jax.Array,
                 segment_ids_BT: jax.Array) -> jax.Array:
    """float32 [B, T]: log p(token t | tokens < t) from one full forward (0 at t = 0).

    Same alignment as ``Samples.logps_BT``: multiply by ``completion_mask_BT`` to rescore a
    sample under another model (e.g. the reference, for KL(pi || pi_ref)).
    """
    T = tokens_BT.shape[1]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens_BT.shape)
    h = model.hidden(params, tokens_BT, positions, segment_ids_BT)
    w_VD, b_V = model.unembedding(params, caller_applies_softcap=True)
    lp = token_logps(h[:, :-1], tokens_BT[:, 1:], w_VD, b_V, DENSE,
                     softcap=model.cfg.final_logit_softcap)
    return jnp.pad(lp, ((0, 0), (1, 0)))
