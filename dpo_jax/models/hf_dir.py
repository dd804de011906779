"""Checks of a Hugging Face model directory before anything is read into a run or written to
its workdir: config.json present and parseable with a supported family, safetensors weights
present, whole and of the shapes config.json implies, and a tokenizer no larger than the
embedding. Each failure is an error naming the file and the field (or tensor).

`check_hf_dir` is called by `workdir.task` for `model.hf_path` / `model.ref_hf_path` before the
workdir is opened, so a bad directory leaves no workdir behind. `model_config_from` turns a run
config's ``model`` block into its ModelConfig (that directory's config.json, or a preset).
"""

from __future__ import annotations

import json
import os

from dpo_jax.models import hf
from dpo_jax.models.config import ModelConfig, preset
from dpo_jax.models.hf_config import (  # noqa: F401  (re-exported: hf_dir.read_config_json)
    hf_config_to_model_config, load_hf_config, read_config_json)


def tokenizer_size(path: str) -> tuple[str, int] | None:
    """(file, number of token ids = largest id + 1) of the tokenizer in directory `path`, read
    from tokenizer.json (model vocabulary + added tokens) or vocab.json (+ added_tokens.json);
    None when neither is there (e.g. a sentencepiece tokenizer.model only)."""
    file = os.path.join(path, "tokenizer.json")
    ids: list[int] = []
    if os.path.exists(file):
        with open(file) as f:
            tok = json.load(f)
        vocab = (tok.get("model") or {}).get("vocab") or {}
        # BPE / WordPiece / WordLevel: {token: id}; Unigram: [[piece, score], ...] (id = index)
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [t["id"] for t in tok.get("added_tokens") or []]
    else:
        file = os.path.join(path, "vocab.json")
        if not os.path.exists(file):
            return None
        with open(file) as f:
            ids = list(json.load(f).values())
        added = os.path.join(path, "added_tokens.json")
        if os.path.exists(added):
            with open(added) as f:
                ids += list(json.load(f).values())
    return (file, max(ids) + 1) if ids else None


def check_tokenizer(tokenizer_dir: str, cfg: ModelConfig, config_file: str) -> None:
    """ValueError when the tokenizer in `tokenizer_dir` can emit ids the embedding has no row
    for (more token ids than config.json's vocab_size). A smaller tokenizer is legitimate: the
    embedding is often padded (e.g. to a multiple of 64)."""
    found = tokenizer_size(tokenizer_dir)
    if found is None:
        return
    file, n = found
    if n > cfg.vocab_size:
        raise ValueError(
            f"{file}: the tokenizer has {n} token ids but {config_file} field 'vocab_size' = "
            f"{cfg.vocab_size} embedding rows: ids {cfg.vocab_size}..{n - 1} have no embedding. "
            "Use the checkpoint's own tokenizer (data.tokenizer) or a checkpoint whose "
            f"embedding has at least {n} rows")


def local_dir(path: str, field: str) -> str | None:
    """`path` when it is a local directory; None when it can only be a hub name ('org/name');
    FileNotFoundError naming the config `field` for a missing local path or a file."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        kind = "a GGUF file" if expanded.endswith(".gguf") else "a file"
        raise FileNotFoundError(f"{field}={path!r} is {kind}, not a Hugging Face model "
                                "directory (config.json + safetensors)")
    hub_like = path.count("/") == 1 and not path.startswith(("/", ".", "~"))
    if not hub_like:
        raise FileNotFoundError(f"{field}={path!r}: no such directory")
    return None


def check_hf_dir(path: str, *, field: str = "model.hf_path",
                 tokenizer: str = "") -> ModelConfig | None:
    """Check the HF model directory `path` (a run config's `field`) without reading weights:
    config.json (`read_config_json`, then every field: `hf_fields.check_fields`), the
    safetensors files (present, whole, every tensor of the shape config.json implies:
    `hf.check_checkpoint`) and the tokenizer of `tokenizer` (a directory; default `path`)
    against the embedding (`check_tokenizer`). Returns the ModelConfig, or None for a hub name
    (checked when downloaded). Raises FileNotFoundError / ValueError / KeyError naming the file
    and the field or tensor."""
    local = local_dir(path, field)
    if local is None:
        return None
    config_file = os.path.join(local, "config.json")
    cfg = hf_config_to_model_config(read_config_json(local), source=config_file)
    hf.check_checkpoint(local, cfg)
    tok = tokenizer or local
    tok_dir = os.path.expanduser(tok)
    if os.path.isdir(tok_dir):
        check_tokenizer(tok_dir, cfg, config_file)
    return cfg


def model_config_from(model_block) -> ModelConfig:
    """The policy's ModelConfig from a run config's ``model`` block: an HF directory's
    ``config.json`` when ``hf_path`` is set, else the named preset; ``overrides`` (None = keep)
    and the dtype / remat / attention switches applied on top."""
    m = model_block
    overrides = {k: v for k, v in m.overrides.items() if v is not None}
    overrides.update(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                     scan_layers=m.scan_layers, attention_impl=m.attention_impl or None,
                     attention_chunk=m.attention_chunk,
                     moe_impl=m.get("moe_impl", "sparse"), moe_kernel=m.get("moe_kernel") or None)
    if m.hf_path:
        return load_hf_config(m.hf_path, **overrides)
    return preset(m.preset, **overrides)
