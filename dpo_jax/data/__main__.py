"""Inspect what the model will see: ``python -m dpo_jax.data --config=path/to/config.py``.

The config file's ``get_config()`` returns a ConfigDict with a ``data`` field (a run config) or
is itself a data config; without ``--config`` the default (synthetic) data config is shown.
Override fields as usual: ``--config.data.max_length=256``.

Prints a few tokenised examples (pairs, ranked lists or unpaired completions, as ``data.format``
says) with the prompt, responses and padding visibly marked, one batch's layout, and length /
truncation / skip statistics.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dpo_jax.data import build_pipeline, default_data_config, load_tokenizer
from dpo_jax.data.config import read_data

_CONFIG = config_flags.DEFINE_config_file("config", None, "run or data config file")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "which split to show")
_NUM = flags.DEFINE_integer("num_examples", 3, "examples to print")
_BATCH = flags.DEFINE_integer("batch_size", 8, "global batch size (pairs) for the batch view")


def _text(tok, ids) -> str:
    if tok is None:
        return " ".join(map(str, ids))
    return repr(tok.decode(list(ids), skip_special_tokens=False))


def _row_view(tok, ids, mask, seg) -> str:
    """One row as spans: prompt as P'...', scored response as R«...», padding as ·×N.

    Spans are decoded whole (multi-byte characters split across tokens stay readable) and
    shown with repr so whitespace at the prompt/response boundary is visible."""
    kinds = np.where(seg == 0, 0, np.where(mask > 0, 2, 1))
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i < len(ids) and kinds[i] == kinds[start] and seg[i] == seg[start]:
            continue
        span, kind = ids[start:i], kinds[start]
        if kind == 0:
            out.append(f"·×{len(span)}")
        else:
            text = _text(tok, span)
            out.append(f"P{text}" if kind == 1 else f"R«{text}»")
        start = i
    return " ".join(out)


def _tokens(key: str, value) -> bool:
    return (isinstance(value, np.ndarray) and value.ndim == 1 and key != "ranks"
            and np.issubdtype(value.dtype, np.integer))


def _print_example(tok, i: int, example: dict) -> None:
    """One tokenised example of any ``data.format``: a pair (prompt, chosen, rejected), a ranked
    list (prompt, responses best first with their ranks) or an unpaired completion (prompt,
    completion, desirable); token arrays decoded, other fields printed as they are."""
    sizes = ", ".join(f"{k} {len(v)} tok" for k, v in example.items() if _tokens(k, v))
    print(f"\n-- example {i}: {sizes}")
    for key, value in example.items():
        label = f"[{key.upper()}]".ljust(12)
        if key == "responses":
            ranks = example.get("ranks", [None] * len(value))
            for k, (resp, rank) in enumerate(zip(value, ranks)):
                print(f"[RESPONSE {k}, rank {rank}] {_text(tok, resp)}")
        elif _tokens(key, value):
            print(label, _text(tok, value))
        else:
            print(label, value.tolist() if isinstance(value, np.ndarray) else value)


def main(argv) -> None:
    del argv
    cfg = _CONFIG.value
    data_cfg = read_data(default_data_config() if cfg is None
                         else (cfg.data if "data" in cfg else cfg))
    tok = None if data_cfg.tokenised else load_tokenizer(data_cfg.tokenizer)
    pipe = build_pipeline(data_cfg, split=_SPLIT.value, global_batch_size=_BATCH.value,
                          tokenizer=tok)
    fmt = data_cfg.format
    print(f"== source={data_cfg.source} format={fmt} split={_SPLIT.value} "
          f"examples={len(pipe.pairs)}")
    for i, example in enumerate(pipe.pairs[: _NUM.value]):
        _print_example(tok, i, example)
    batch = next(pipe)
    R, L = batch["input_ids"].shape
    print(f"\n== first batch: {R} rows x {L}; P = prompt, R«» = scored response, ·×N = padding")
    for r in range(min(R, 4)):
        print(f"row {r}: " + _row_view(tok, batch["input_ids"][r], batch["loss_mask"][r],
                                       batch["segment_ids"][r]))
    pad = float(np.mean(batch["segment_ids"] == 0))
    print(f"padding fraction of this batch: {pad:.3f}")
    print("\n== stats")
    print(json.dumps(pipe.stats, indent=1, default=str))


if __name__ == "__main__":
    app.run(main)
    sys.exit(0)
