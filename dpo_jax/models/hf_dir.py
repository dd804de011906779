"""Checks of a Hugging Face model directory before anything is read into a run or written to
its workdir: config.json present and parseable with a supported family, safetensors weights
present, whole and of the shapes config.json implies, and a tokenizer no larger than the
embedding. Each failure is an error naming the file and the field (or tensor).

`check_hf_dir` is called by `workdir.task` for `model.hf_path` / `model.ref_hf_path` before the
workdir is opened, so a bad directory leaves no workdir behind.
"""

from __future__ import annotations

import glob
import json
import os

from dpo_jax.models.config import ModelConfig


def _listing(path: str) -> str:
    names = sorted(os.listdir(path))
    return ", ".join(names[:12]) + (f", ... ({len(names)} files)" if len(names) > 12 else "") \
        if names else "nothing"


def read_config_json(path: str) -> dict:
    """The parsed `<path>/config.json`. FileNotFoundError naming the file (and, for a directory
    holding only a GGUF file, what to do); ValueError naming the file, line and column of
    invalid JSON."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        ggufs = sorted(os.path.basename(g) for g in glob.glob(os.path.join(path, "*.gguf")))
        if ggufs:
            raise FileNotFoundError(
                f"{file}: absent; {path} holds GGUF file(s) {ggufs}, a llama.cpp format dpo_jax "
                "does not read (quantized blocks, reordered query/key rows): convert it to a "
                "Hugging Face directory first (transformers: AutoModelForCausalLM.from_pretrained("
                "dir, gguf_file=...) then save_pretrained; see shared/models/smollm2.sh)")
        raise FileNotFoundError(f"{file}: absent (the directory holds {_listing(path)}); a "
                                "Hugging Face model directory needs config.json and safetensors")
    with open(file) as f:
        text = f.read()
    try:
        c = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON (line {e.lineno}, column {e.colno}: "
                         f"{e.msg})") from None
    if not isinstance(c, dict):
        raise ValueError(f"{file}: expected a JSON object of fields, got {type(c).__name__}")
    return c


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
    from dpo_jax.models import hf
    from dpo_jax.models.hf_config import hf_config_to_model_config

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
