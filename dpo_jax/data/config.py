"""Default configuration of the data pipeline (``config.data`` in a run config).

Every field that changes which tokens the model sees lives here, so a run's config file fully
determines its batches (together with the run seed passed to ``build_pipeline``).
"""

from __future__ import annotations

import ml_collections

SOURCES = ("synthetic", "generic", "hh", "shp", "tldr", "ultrafeedback", "se")
TRUNCATION_MODES = ("keep_end", "keep_start", "error")
# pairs: {prompt, chosen, rejected}; ranked: {prompt, K responses, scores} (data/ranked.py,
# loss plackett_luce); unpaired: {prompt, completion, label} (data/unpaired.py, loss kto)
FORMATS = ("pairs", "ranked", "unpaired")


def default_data_config() -> ml_collections.ConfigDict:
    """The offline default: the synthetic task, no tokenizer, no files."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"  # one of SOURCES: synthetic generic hh shp tldr ultrafeedback se
    c.path = ""  # local file (jsonl, jsonl.gz, json, parquet), directory, save_to_disk dir, or hub name
    c.hub_config = ""  # hub dataset config name or data_dir (e.g. 'harmless-base' for hh)
    c.train_split = "train"  # split name (files whose name contains it, DatasetDict key, hub split)
    c.eval_split = "test"  # eval's split; '' carves eval out of the train split by prompt
    c.eval_size = 0  # eval pairs: eval_split's first N, or carved: whole prompts, >= N (0: all)
    c.eval_fraction = 0.1  # prompts carved for eval (one file / eval_split=''); 0 = one file: none
    c.max_pairs = 0  # cap on pairs per split after parsing (0 = no cap), for smoke runs
    c.tokenizer = ""  # local tokenizer dir or hub name ('' only for the synthetic source)
    c.max_length = 512  # prompt + response tokens, at most (paper: 512)
    c.max_prompt_length = 256  # prompt tokens kept when prompt + longer response is too long
    c.truncation_mode = "keep_end"  # prompt truncation: keep_end (paper, hh) | keep_start | error
    c.prompt_trailing_whitespace = "move"  # 'move' trailing prompt whitespace into the responses | 'keep'
    c.buckets = "auto"  # 'auto' (from the batch-length histogram) or comma list like '128,256,512'
    c.num_buckets = 4  # number of auto buckets (a handful keeps XLA compiles few)
    c.bucket_multiple = 16  # auto bucket lengths are rounded up to a multiple of this
    c.packing = False  # pack several sequences per row (segment ids) when that saves compute
    c.pack_length = 0  # packed row length (0 = the largest bucket)
    c.row_multiple = 1  # packed row counts are multiples of this (set to the data-parallel size)
    c.prefix_sharing = False  # one row unit [prompt, chosen, rejected] per pair (data/prefix.py)
    c.group_by_length = 0  # sort pairs by length within windows of this many batches (0 = off)
    c.on_bad_row = "error"  # 'error': raise DataError with file/row/field | 'skip': count and drop
    c.shuffle_seed = 0  # data order seed, combined with the run seed
    c.shuffle = True  # False: train in the file's order, every epoch (debugging, parity runs)
    c.field_prompt = "prompt"  # generic source: prompt column (may be absent for message lists)
    c.field_chosen = "chosen"  # generic source: chosen column
    c.field_rejected = "rejected"  # generic source: rejected column
    c.format = "pairs"  # one of FORMATS: pairs | ranked (plackett_luce) | unpaired (kto)
    c.field_responses = "responses"  # generic ranked source: list-of-responses column
    # generic ranked source: list-of-scores column (higher is better; ultrafeedback: the key of
    # each completion's score, '' = overall_score)
    c.field_scores = "scores"
    c.field_completion = "completion"  # generic unpaired source: completion column
    c.field_label = "label"  # generic unpaired source: bool column (True = desirable)
    # numeric column (>= 0) that becomes each pair's weight in the loss and metrics ('' = all 1)
    c.weight_field = ""
    c.hh_single_turn = False  # hh: keep only single-turn conversations
    # hh: Human/Assistant turns as chat messages rendered by the tokenizer's chat template
    # (responses: assistant contents); False = the paper's raw '\n\nHuman:' text
    c.hh_chat = False
    c.shp_min_score_ratio = 2.0  # shp: keep pairs whose score ratio is at least this (paper: 2)
    c.shp_max_pairs_per_post = 5  # shp: at most this many pairs per post (0 = no cap)
    # a mixture: [{source, weight, path, splits, fields, ...}, ...] (data/mixture.py; [] = the
    # single source above); the other fields here are shared by every source
    c.sources = []
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.vocab_size = 128  # EOS(0) + topic tokens + content tokens
    c.synthetic.num_topics = 4  # topic tokens 1..num_topics
    c.synthetic.prompt_len = (4, 12)  # content tokens after the topic token, inclusive range
    c.synthetic.response_len = (6, 14)  # content tokens per response (+ EOS), inclusive range
    c.synthetic.min_gap = 0.25  # chosen true reward - rejected true reward, at least
    c.synthetic.num_train = 4096  # train pairs
    c.synthetic.num_eval = 512  # eval pairs
    c.synthetic.train_seed = 0  # generator seed of the train split
    c.synthetic.eval_seed = 1  # generator seed of the eval split (differs so eval is held out)
    c.synthetic.num_responses = 4  # data.format='ranked': responses per prompt
    # pairs / unpaired from the ranked lists instead: the best response vs a random lower one /
    # every response labelled desirable when its true reward >= 0.5
    c.synthetic.from_lists = False
    return c


def parse_buckets(value) -> list[int] | None:
    """``'auto'`` -> None; ``'128,256'`` or a sequence of ints -> sorted unique ints."""
    if isinstance(value, str):
        if value.strip() in ("", "auto"):
            return None
        value = [v for v in value.split(",") if v.strip()]
    out = sorted({int(v) for v in value})
    if not out or out[0] <= 0:
        raise ValueError(f"buckets must be positive lengths, got {value!r}")
    return out


def validate(c: ml_collections.ConfigDict) -> None:
    """Fail early on settings that would otherwise fail deep inside the pipeline."""
    if c.source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {c.source!r}")
    if c.truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"data.truncation_mode must be one of {TRUNCATION_MODES}")
    if c.on_bad_row not in ("error", "skip"):
        raise ValueError("data.on_bad_row must be 'error' or 'skip'")
    if c.prompt_trailing_whitespace not in ("move", "keep"):
        raise ValueError("data.prompt_trailing_whitespace must be 'move' or 'keep'")
    if not 0 < c.max_prompt_length < c.max_length:
        raise ValueError("need 0 < data.max_prompt_length < data.max_length")
    if c.source == "generic" and not c.path:
        raise ValueError("data.path is required for the generic source (others default to hub)")
    if c.source != "synthetic" and not c.tokenizer:
        raise ValueError(f"data.tokenizer is required for source {c.source!r}")
    if not 0 <= c.eval_fraction < 1:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {c.eval_fraction}")
    if not c.eval_split and c.eval_size <= 0 and c.eval_fraction <= 0:
        raise ValueError("eval is carved from train (data.eval_split=''): set data.eval_size > 0 "
                         "or data.eval_fraction > 0")
    if c.get("weight_field") and c.source == "synthetic":
        raise ValueError("data.weight_field names a column of a preference file; the synthetic "
                         "source has none (set data.source and data.path, or weight_field='')")
    if not c.get("shuffle", True) and c.group_by_length:
        raise ValueError("data.shuffle=False keeps the file's order; data.group_by_length "
                         f"={c.group_by_length} would reorder it (set it to 0)")
    parse_buckets(c.buckets)
    fmt = c.get("format", "pairs")
    if fmt not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {fmt!r}")
    if fmt != "pairs" and c.get("sources"):
        raise ValueError(f"data.format={fmt!r} reads one source: set data.sources=[]")
    if c.get("sources"):
        from dpo_jax.data.mixture import mixture_sources

        mixture_sources(c)  # each entry and its source's config
