"""Review prefixes (the prompts) and reward-labelled preference pairs for the IMDb experiment.

Paper, Section 6.1: prompts are prefixes of IMDb reviews of length 2-8 tokens; the SFT model
samples 4 completions per prefix; the sentiment classifier labels all 6 pairs. Here a pair is
only formed when the two rewards differ: a tie carries no preference, and keeping it with an
arbitrary winner would train DPO on label noise.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from dpo_jax.data.io import read_jsonl, write_jsonl
from dpo_jax.proj.imdb.text import clean_review

PAIR_COLUMNS = ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward")


class TokenizerLike(Protocol):
    """The part of a ``transformers`` tokenizer used here."""

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str: ...


@dataclasses.dataclass(frozen=True)
class Prefix:
    """A prompt: the first ``len(token_ids)`` tokens of review ``source_index``."""

    text: str
    token_ids: tuple[int, ...]
    source_index: int


def make_prefixes(
    texts: Sequence[str],
    tokenizer: TokenizerLike,
    min_tokens: int = 2,
    max_tokens: int = 8,
    seed: int = 0,
) -> list[Prefix]:
    """One prefix per review, its length uniform in ``[min_tokens, max_tokens]`` tokens.

    Reviews are cleaned of ``<br />`` first. The length is capped by the review's own length;
    reviews shorter than ``min_tokens`` tokens give no prefix (so the output can be shorter
    than ``texts``; ``source_index`` says where each prefix came from). The prefix text is the
    decoded token prefix, so re-encoding it gives the same ids for byte-level BPE tokenizers;
    it is not stripped, because a trailing space is part of what the policy continues from.
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_tokens, max_tokens + 1, size=len(texts))
    out: list[Prefix] = []
    for i, (text, k) in enumerate(zip(texts, lengths)):
        # Only the head of the review is needed: encode a bounded slice (fast on long reviews).
        ids = tokenizer.encode(clean_review(text)[: 64 * max_tokens], add_special_tokens=False)
        if len(ids) < min_tokens:
            continue
        head = tuple(int(t) for t in ids[: min(int(k), len(ids))])
        out.append(Prefix(tokenizer.decode(list(head)), head, i))
    return out


def build_pairs(
    prompt: str, completions: Sequence[str], rewards: Sequence[float] | np.ndarray
) -> list[dict]:
    """All pairs ``(i, j)`` with ``reward_i > reward_j`` as ``chosen=i, rejected=j``; ties dropped.

    With 4 completions and distinct rewards this gives the paper's 6 pairs. Order: by chosen
    reward descending, then rejected reward descending (a stable sort, so equal rewards keep
    the completions' order); deterministic, so datasets rebuild byte-identically.
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.shape != (len(completions),):
        raise ValueError(f"{len(completions)} completions but rewards of shape {rewards.shape}")
    if not np.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    order = np.argsort(-rewards, kind="stable")
    rows = []
    for a, i in enumerate(order):
        for j in order[a + 1:]:
            if rewards[i] > rewards[j]:
                rows.append({
                    "prompt": prompt,
                    "chosen": completions[i],
                    "rejected": completions[j],
                    "chosen_reward": float(rewards[i]),
                    "rejected_reward": float(rewards[j]),
                })
    return rows


def build_pair_dataset(
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    rewards: Sequence[Sequence[float]] | np.ndarray,
) -> list[dict]:
    """:func:`build_pairs` over many prompts, concatenated in prompt order."""
    if not len(prompts) == len(completions) == len(rewards):
        raise ValueError("prompts, completions and rewards must have the same length")
    rows: list[dict] = []
    for p, cs, rs in zip(prompts, completions, rewards):
        rows.extend(build_pairs(p, cs, rs))
    return rows


def write_pairs(rows: Iterable[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Write rows to ``.jsonl`` or ``.parquet`` (by suffix), columns :data:`PAIR_COLUMNS`."""
    path = pathlib.Path(path)
    rows = [{k: r[k] for k in PAIR_COLUMNS} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        write_jsonl(rows, path)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()),
                            ("rejected", pa.string()), ("chosen_reward", pa.float64()),
                            ("rejected_reward", pa.float64())])
        table = pa.Table.from_pylist(rows, schema=schema)
        pq.write_table(table, path)
    else:
        raise ValueError(f"{path}: suffix must be .jsonl or .parquet")
    return path


def read_pairs(path: str | pathlib.Path) -> list[dict]:
    """Inverse of :func:`write_pairs`."""
    path = pathlib.Path(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: suffix must be .jsonl or .parquet")
