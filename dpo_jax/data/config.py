"""The ``data`` block of a run config: its schema (``default_data_config``), the declarations of
the sources, and the one reader (``read_data``) that turns the block into a frozen
:class:`DataConfig`.

Every field that changes which tokens the model sees lives here, so a run's config file fully
determines its batches (together with the run seed passed to ``build_pipeline``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import ml_collections

from dpo_jax.data.batching import parse_buckets
from dpo_jax.data.synthetic import CONVERSATION_PAIRS, EOS_ID


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What a value of ``data.source`` is, so code asks the declaration, never the name.

    ``tokenised``: the source makes token ids itself (no text, no tokenizer, nothing to
    decode); ``files``: it reads rows from files or the hub (so it has a path, columns such as
    ``weight_field``, and can be one source of a mixture); ``end_ids``: the tokens its
    responses end with when it has no tokenizer (the sampler's default stop set)."""

    name: str
    tokenised: bool = False
    files: bool = True
    end_ids: tuple[int, ...] = ()
    doc: str = ""


SOURCE_SPECS: dict[str, SourceSpec] = {s.name: s for s in (
    SourceSpec("synthetic", tokenised=True, files=False, end_ids=(EOS_ID,),
               doc="generated token ids with a known true reward (data/synthetic.py)"),
    SourceSpec("generic", doc="a local or hub preference file with named columns"),
    SourceSpec("hh", doc="Anthropic HH-RLHF"),
    SourceSpec("shp", doc="Stanford Human Preferences"),
    SourceSpec("tldr", doc="OpenAI TL;DR summarisation comparisons"),
    SourceSpec("ultrafeedback", doc="UltraFeedback (binarised or ranked)"),
    SourceSpec("se", doc="StackExchange paired answers"),
)}
SOURCES = tuple(SOURCE_SPECS)
TRUNCATION_MODES = ("keep_end", "keep_start", "error")
# pairs: {prompt, chosen, rejected}; ranked: {prompt, K responses, scores} (data/ranked.py,
# loss plackett_luce); unpaired: {prompt, completion, label} (data/unpaired.py, loss kto);
# trees: conversations with alternatives / Step-DPO rows (data/tree_data.py, issue 31)
FORMATS = ("pairs", "ranked", "unpaired", "trees")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """``data.synthetic``: the synthetic task's generator, declared once: these defaults are
    the block's in :func:`default_data_config`."""

    vocab_size: int = 128  # EOS(0) + topic tokens + content tokens
    num_topics: int = 4  # topic tokens 1..num_topics
    prompt_len: tuple[int, int] = (4, 12)  # content tokens after the topic token, inclusive
    response_len: tuple[int, int] = (6, 14)  # content tokens per response (+ EOS), inclusive
    min_gap: float = 0.25  # chosen true reward - rejected true reward, at least
    num_train: int = 4096  # train pairs
    num_eval: int = 512  # eval pairs
    train_seed: int = 0  # generator seed of the train split
    eval_seed: int = 1  # generator seed of the eval split (differs so eval is held out)
    num_responses: int = 4  # data.format='ranked': responses per prompt
    # pairs / unpaired from the ranked lists instead: the best response vs a random lower one /
    # every response labelled desirable when its true reward >= 0.5
    from_lists: bool = False
    # multi-turn conversations (synthetic.make_conversations; issue 31): rounds per
    # conversation (1 = the single-turn task above), the liked class's shift per turn (0: one
    # rule at every turn), and what format='pairs' keeps of each conversation ('last_turn': the
    # final turn's pair after the full history; 'whole': all-chosen vs all-rejected
    # conversation). format='trees': a branch point at every turn. num_train / num_eval count
    # conversations.
    turns: int = 1
    turn_shift: int = 0
    conversation_pairs: str = "last_turn"


def default_data_config() -> ml_collections.ConfigDict:
    """The offline default: the synthetic task, no tokenizer, no files."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"  # one of SOURCE_SPECS: synthetic generic hh shp tldr ultrafeedback se
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
    c.pack_length_step = 0  # > 0: also try rows of pack_length + k * step (< 2x; batching.py)
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
    c.field_messages = "messages"  # trees: conversation column (assistant turns with 'rejected')
    c.field_steps = "initial_reason_steps"  # trees, Step-DPO rows: the shared step prefix column
    c.tree_depth_decay = 1.0  # trees: a branch point's weight times this ** its depth (turn)
    c.tree_responses = 2  # trees: responses per branch point at most (> 2: plackett_luce)
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
    # CHES filter (Razin et al. 2024, Section 6; dpo_jax/ches_filter.py): score the train pairs
    # under the starting policy (one forward, cached by fingerprint) and drop / down-weight the
    # pairs whose chosen and rejected responses look most alike to it
    c.ches_filter = ml_collections.ConfigDict()
    c.ches_filter.mode = ""  # '' = off | 'drop' | 'downweight'
    # 'ln_ches' (length-normalised, the paper's filter) | 'ches' | 'random' (the control)
    c.ches_filter.score = "ln_ches"
    c.ches_filter.quantile = 0.9  # pairs scoring above this quantile of the train scores go
    c.ches_filter.weight = 0.1  # 'downweight': their pair weight is multiplied by this
    # score='random': the control (the same fraction of pairs flagged by uniform random scores
    # drawn with this seed instead of by CHES)
    c.ches_filter.seed = 0
    c.synthetic = ml_collections.ConfigDict(dataclasses.asdict(SyntheticConfig()))
    return c


CHES_MODES = ("", "drop", "downweight")
CHES_SCORES = ("ln_ches", "ches", "random")


@dataclasses.dataclass(frozen=True)
class ChesFilterConfig:
    """``data.ches_filter`` (fields as in :func:`default_data_config`); ``mode`` '' = off."""

    mode: str = ""
    score: str = "ln_ches"
    quantile: float = 0.9
    weight: float = 0.1
    seed: int = 0


def read_ches_filter(block) -> ChesFilterConfig:
    """The ``data.ches_filter`` block, checked. Raises ValueError naming the
    ``data.ches_filter.*`` field for an unknown field or a bad value."""
    cfg = ChesFilterConfig(**_with_defaults(dict(_plain(block) or {}),
                                            dataclasses.asdict(ChesFilterConfig()),
                                            "data.ches_filter", "block"))
    if cfg.mode not in CHES_MODES:
        raise ValueError(f"data.ches_filter.mode={cfg.mode!r}: expected one of {CHES_MODES}")
    if cfg.score not in CHES_SCORES:
        raise ValueError(f"data.ches_filter.score={cfg.score!r}: expected one of {CHES_SCORES}")
    if not 0.0 < float(cfg.quantile) < 1.0:
        raise ValueError(f"data.ches_filter.quantile={cfg.quantile!r}: must be in (0, 1) (the "
                         "pairs above this quantile of the scores are filtered)")
    if not 0.0 <= float(cfg.weight) < 1.0:
        raise ValueError(f"data.ches_filter.weight={cfg.weight!r}: must be in [0, 1) (the "
                         "filtered pairs' weight multiplier)")
    return dataclasses.replace(cfg, quantile=float(cfg.quantile), weight=float(cfg.weight),
                               seed=int(cfg.seed))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The ``data`` block, read once (:func:`read_data`); every field of
    :func:`default_data_config`, with its meaning there. ``sources`` is the mixture's
    sources, each with its own ``DataConfig`` (``data/mixture.py``), ``synthetic`` the
    generator's block."""

    source: str
    path: str
    hub_config: str
    train_split: str
    eval_split: str
    eval_size: int
    eval_fraction: float
    max_pairs: int
    tokenizer: str
    max_length: int
    max_prompt_length: int
    truncation_mode: str
    prompt_trailing_whitespace: str
    buckets: Any  # 'auto', '128,256' or a sequence of lengths (parse_buckets)
    num_buckets: int
    bucket_multiple: int
    packing: bool
    pack_length: int
    pack_length_step: int
    row_multiple: int
    prefix_sharing: bool
    group_by_length: int
    on_bad_row: str
    shuffle_seed: int
    shuffle: bool
    field_prompt: str
    field_chosen: str
    field_rejected: str
    format: str
    field_responses: str
    field_scores: str
    field_completion: str
    field_label: str
    field_messages: str
    field_steps: str
    tree_depth_decay: float
    tree_responses: int
    weight_field: str
    hh_single_turn: bool
    hh_chat: bool
    shp_min_score_ratio: float
    shp_max_pairs_per_post: int
    sources: tuple["MixtureSource", ...]  # () = the single source above
    synthetic: SyntheticConfig
    ches_filter: ChesFilterConfig = ChesFilterConfig()

    @property
    def spec(self) -> SourceSpec:
        """The declaration of ``source``."""
        return SOURCE_SPECS[self.source]

    @property
    def mixed(self) -> bool:
        """A mixture (``data.sources`` non-empty): its entries' sources are read, not
        ``source``."""
        return bool(self.sources)

    @property
    def tokenised(self) -> bool:
        """The data is token ids already (a single tokenised source such as the synthetic
        task): no tokenizer is loaded and tokens are shown as ids."""
        return self.spec.tokenised and not self.mixed

    def source_names(self) -> list[str]:
        """The sources read: each mixture entry's (default ``source``), else ``source``."""
        return [m.cfg.source for m in self.sources] or [self.source]

    def replace(self, **fields) -> "DataConfig":
        """A copy with ``fields`` changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **fields)


SOURCE_FIELDS = (
    "source", "path", "hub_config", "train_split", "eval_split", "eval_size", "eval_fraction",
    "max_pairs", "field_prompt", "field_chosen", "field_rejected", "weight_field",
    "hh_single_turn", "hh_chat", "shp_min_score_ratio", "shp_max_pairs_per_post", "on_bad_row")


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One source of a mixture: its ``name``, ``weight`` and data config (the top-level data
    config with the entry's fields set)."""

    name: str
    weight: float
    cfg: DataConfig


def _mixture(top: DataConfig, entries) -> tuple[MixtureSource, ...]:
    """The sources of the ``data.sources`` entries over the top-level config ``top``.

    Raises ``ValueError`` naming ``data.sources[i]`` (and its source) and the field for an
    entry that is not a dict, lacks ``source``, has a weight that is not a positive finite
    number or a field that is not per-source, and for a per-source config that does not
    validate."""
    out: list[MixtureSource] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"data.sources[{i}]"
        entry = _plain(entry)
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a dict of source fields, got {entry!r}")
        if not entry.get("source"):
            raise ValueError(f"{where}: field 'source' is required (one of the data sources)")
        where = f"{where} (source {entry['source']!r})"
        unknown = sorted(set(entry) - set(SOURCE_FIELDS) - {"weight", "name"})
        if unknown:
            raise ValueError(f"{where}: field(s) {unknown} are not per-source; per-source "
                             f"fields: {list(SOURCE_FIELDS)} + weight, name (set the others "
                             "once in data.*)")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                math.isfinite(weight) and weight > 0):
            raise ValueError(f"{where}: field 'weight' must be a positive finite number, got "
                             f"{weight!r}")
        cfg = top.replace(**{k: entry[k] for k in SOURCE_FIELDS if k in entry})
        try:
            validate(cfg)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        if not cfg.spec.files:
            raise ValueError(f"{where}: the {cfg.source} source has no files to mix; use file "
                             "or hub sources")
        base = str(entry.get("name") or entry["source"])
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        out.append(MixtureSource(name=name, weight=float(weight), cfg=cfg))
    return tuple(out)


def _plain(value):
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _with_defaults(given: dict, defaults: dict, where: str, what: str) -> dict:
    """``defaults`` updated with ``given``; ValueError naming ``where.<field>`` for a field
    ``defaults`` lacks."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: not a field of the {what}; fields: "
                         f"{', '.join(sorted(defaults))}")
    return {**defaults, **given}


def read_data(block: Mapping[str, Any] | DataConfig) -> DataConfig:
    """The frozen ``data`` block, validated (:func:`validate`); fields the block lacks (a
    config written before they existed) take :func:`default_data_config`'s values. A
    ``DataConfig`` is returned as it is. Raises ValueError naming the ``data.*`` field for an
    unknown field or a bad value."""
    if isinstance(block, DataConfig):
        return block
    defaults = default_data_config()
    fields = _with_defaults(dict(_plain(block)), defaults.to_dict(), "data", "data block")
    synthetic = _with_defaults(dict(_plain(fields["synthetic"]) or {}),
                               defaults.synthetic.to_dict(), "data.synthetic", "synthetic block")
    synthetic.update(prompt_len=tuple(synthetic["prompt_len"]),
                     response_len=tuple(synthetic["response_len"]))
    fields["synthetic"] = SyntheticConfig(**synthetic)
    fields["ches_filter"] = read_ches_filter(fields["ches_filter"])
    entries = list(_plain(fields["sources"]) or ())
    fields["sources"] = ()
    cfg = DataConfig(**fields)
    validate(cfg)
    if entries and cfg.format != "pairs":
        raise ValueError(f"data.format={cfg.format!r} reads one source: set data.sources=[]")
    return cfg.replace(sources=_mixture(cfg, entries)) if entries else cfg


def read_run_data(config) -> DataConfig:
    """``read_data(config.data)`` of a run config, the tokenizer resolved: a text source that
    names none (``data.tokenizer=''``) takes the model's directory ``model.hf_path``."""
    block = config.data
    model = config.get("model") or {}
    names = [str(_plain(e).get("source", block.source)) if isinstance(_plain(e), dict)
             else block.source for e in (block.get("sources") or ())] or [block.source]
    text = any(not SOURCE_SPECS.get(n, SourceSpec(n)).tokenised for n in names)
    if not block.tokenizer and text and model.get("hf_path"):
        return read_data({**_plain(block), "tokenizer": model.get("hf_path")})
    return read_data(block)


def _validate_turns(s: SyntheticConfig, fmt: str) -> None:
    """The multi-turn fields of ``data.synthetic``; ValueError naming the field."""
    if int(s.turns) < 1:
        raise ValueError(f"data.synthetic.turns must be >= 1, got {s.turns}")
    if s.conversation_pairs not in CONVERSATION_PAIRS:
        raise ValueError(f"data.synthetic.conversation_pairs must be one of "
                         f"{CONVERSATION_PAIRS}, got {s.conversation_pairs!r}")
    multi = int(s.turns) > 1 or fmt == "trees"
    if multi and (fmt not in ("pairs", "trees") or s.from_lists):
        raise ValueError(f"data.synthetic.turns={s.turns} (conversations) reads as "
                         f"data.format 'pairs' or 'trees' without data.synthetic.from_lists; got "
                         f"format {fmt!r}, from_lists={s.from_lists}")


def validate(c: DataConfig | Mapping[str, Any]) -> None:
    """Fail early on settings that would otherwise fail deep inside the pipeline (a raw block is
    read by :func:`read_data`, which validates it). Raises ValueError naming the field."""
    if not isinstance(c, DataConfig):
        read_data(c)
        return
    if c.source not in SOURCE_SPECS:
        raise ValueError(f"data.source must be one of {tuple(SOURCE_SPECS)}, got {c.source!r}")
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
    if not c.spec.tokenised and not c.tokenizer:
        raise ValueError(f"data.tokenizer is required for source {c.source!r}")
    if not 0 <= c.eval_fraction < 1:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {c.eval_fraction}")
    if not c.eval_split and c.eval_size <= 0 and c.eval_fraction <= 0:
        raise ValueError("eval is carved from train (data.eval_split=''): set data.eval_size > 0 "
                         "or data.eval_fraction > 0")
    if c.weight_field and not c.spec.files:
        raise ValueError(f"data.weight_field names a column of a preference file; the "
                         f"{c.source} source has none (set data.source and data.path, or "
                         "weight_field='')")
    if not c.shuffle and c.group_by_length:
        raise ValueError("data.shuffle=False keeps the file's order; data.group_by_length "
                         f"={c.group_by_length} would reorder it (set it to 0)")
    parse_buckets(c.buckets)
    if int(c.pack_length_step) < 0:
        raise ValueError(f"data.pack_length_step must be >= 0, got {c.pack_length_step}")
    fmt = c.format
    if fmt not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {fmt!r}")
    if c.spec.tokenised:  # the synthetic task: its conversations' fields
        _validate_turns(c.synthetic, fmt)
    if fmt == "trees":
        if not (c.source == "generic" or c.spec.tokenised) or c.mixed:
            raise ValueError("data.format='trees' reads one generic source (data.source="
                             f"'generic', data.path: local files or a hub name) or the "
                             f"synthetic conversations (data.source='synthetic'); got "
                             f"{c.source!r}")
        if c.prefix_sharing:
            raise ValueError("data.format='trees' already shares every common prefix: set "
                             "data.prefix_sharing=False")
        if not (math.isfinite(c.tree_depth_decay) and c.tree_depth_decay > 0):
            raise ValueError(f"data.tree_depth_decay must be > 0, got {c.tree_depth_decay}")
        if int(c.tree_responses) < 2:
            raise ValueError(f"data.tree_responses must be >= 2, got {c.tree_responses}")
