"""A small byte-level BPE tokenizer trained on IMDb reviews (train + unsup, ``<br />`` removed).

Why not GPT-2's 50k vocabulary: the CPU-sized IMDb policy is small, and its embedding/unembedding
would be dominated by 50k rows of mostly unused tokens; an ~8k vocabulary fitted to reviews
gives shorter sequences and a model whose parameters go into the transformer. The GPT-2
tokenizer (``gpt2_tokenizer/`` under the data root, ``$DPO_JAX_DATA``) remains the choice for
real GPT-2 weights.

The output directory is a ``transformers`` tokenizer (``tokenizer.json`` +
``tokenizer_config.json``) loadable by ``dpo_jax.data.tokenize.load_tokenizer(dir)``, with
``<|endoftext|>`` as bos, eos and pad token (id 0), like GPT-2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Iterable, Iterator, Sequence
from dpo_jax.proj.imdb.text import load_imdb

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2):
    """Train a GPT-2-style byte-level BPE (``tokenizers.Tokenizer``) on ``texts``.

    Byte-level pre-tokenisation with ``add_prefix_space=False`` and no normaliser, exactly as
    GPT-2: every string round-trips through encode/decode, so prefixes and completions can be
    joined as text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_batched(texts), trainer=trainer)
    return tok


def _batched(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def save_tokenizer(tok, out_dir: str | pathlib.Path, model_max_length: int = 1024):
    """Wrap as ``PreTrainedTokenizerFast`` and ``save_pretrained``; returns the HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(str(out_dir))
    return hf


def build_imdb_tokenizer(
    data_dir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    vocab_size: int = 8192,
    splits: Sequence[str] = ("train", "unsup"),
    limit: int | None = None,
) -> dict:
    """Train on the cleaned reviews of ``splits`` and save to ``out_dir``; returns a summary.

    ``test`` is excluded by default so that nothing about the tokenizer is fitted on the
    evaluation reviews.
    """
    t0 = time.perf_counter()
    texts: list[str] = []
    for split in splits:
        texts.extend(load_imdb(data_dir, split, limit=limit)[0])
    t_load = time.perf_counter() - t0
    tok = train_bpe(texts, vocab_size=vocab_size)
    t_train = time.perf_counter() - t0 - t_load
    hf = save_tokenizer(tok, out_dir)
    sample = texts[: min(len(texts), 2000)]
    n_tokens = sum(len(enc.ids) for enc in tok.encode_batch(sample))  # raw: no length warning
    summary = {
        "splits": list(splits),
        "reviews": len(texts),
        "limit_per_split": limit,
        "vocab_size": len(hf),
        "eos_token_id": hf.eos_token_id,
        "load_seconds": round(t_load, 1),
        "train_seconds": round(t_train, 1),
        "tokens_per_review_first_2000": round(n_tokens / max(len(sample), 1), 1),
    }
    (pathlib.Path(out_dir) / "build_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="directory with {train,unsup}-*.parquet")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab_size", type=int, default=8192)
    ap.add_argument("--splits", default="train,unsup")
    ap.add_argument("--limit", type=int, default=None, help="first N reviews of each split")
    args = ap.parse_args(argv)
    summary = build_imdb_tokenizer(args.data, args.out, vocab_size=args.vocab_size,
                                   splits=tuple(args.splits.split(",")), limit=args.limit)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
