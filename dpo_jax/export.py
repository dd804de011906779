"""Write a trained policy back as a Hugging Face model directory.

    python -m dpo_jax.export --workdir=runs/hh --out=exported/hh [--step=N] [--adapter_out=DIR]
    python -m dpo_jax.export --workdir=runs/hh --format=gguf --out=hh.gguf [--gguf_type=F16]

Reads the run's ``config.json`` (model shape, HF source, tokenizer) and its newest (or the
given) checkpoint, and writes ``config.json``, ``model.safetensors`` and, when the run used a
tokenizer, its files, so ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads it.

A LoRA run (``model.lora.rank`` > 0) is written twice: ``out`` holds the merged model (the
base with its adapters folded in), and ``--adapter_out`` (default ``OUT/adapter``) the adapters
alone as a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained(base, DIR)`` loads onto the run's base model.

When the run started from an HF checkpoint (``model.hf_path``), the export keeps that
checkpoint's configuration: its ``config.json`` is written back field for field (dropouts, token
ids, rope settings, everything), changed only where the trained model differs (a
``model.overrides`` entry; the dtype field names the dtype of the written tensors), and its
``generation_config.json`` and the tokenizer's files (chat template included) are copied as they
are. A run from a preset has no source: its ``config.json`` is built from ``transformers``'
defaults for the model type.

``generation_config.json`` stops ``generate`` where the run's responses ended: its
``eos_token_id`` holds the tokenizer's EOS and its chat template's turn end (added when the
source's file lacks them, written when there is none; :func:`write_generation_eos`), so greedy
generations from ``transformers`` equal dpo_jax's sampler's (tested).

``--format=gguf`` writes one GGUF file instead (``dpo_jax/export_gguf.py``: llama.cpp's tensor
names and metadata, the run's tokenizer and chat template inside); a LoRA run is written
merged. The model, the tokenizer and ``--gguf_type`` are checked before the file is created.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax import lora as lora_lib
from dpo_jax import lora_base, lora_peft
from dpo_jax import state as state_lib
from dpo_jax.models import Model, ModelConfig, model_config_from
from dpo_jax.models import hf_config as hf_lib
from dpo_jax.models.hf import save_hf
from dpo_jax import export_gguf
from dpo_jax.data.tokenize import PairTokenizer, load_tokenizer

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to export from.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (HF format) or file (GGUF).",
                           required=True)
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "gguf"], "hf: a Hugging Face directory "
                            "(+ PEFT adapters for LoRA runs); gguf: one llama.cpp GGUF file.")
_GGUF_TYPE = flags.DEFINE_string("gguf_type", "F16", "--format=gguf: the matrices' type, "
                                 "F32 | F16 | BF16 | Q8_0 (norms and biases stay F32).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_ADAPTER_OUT = flags.DEFINE_string(
    "adapter_out", None, "LoRA runs: the PEFT adapter directory (default: OUT/adapter).")

# The files a transformers tokenizer is saved as (any of them, by tokenizer kind).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json")
# Model-side files besides config.json and the weights that training leaves as they were.
MODEL_FILES = ("generation_config.json",)
_DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers 4.x / 5.x name of the weights' dtype


def _imports_as(hf_cfg: dict, cfg: ModelConfig) -> ModelConfig | None:
    """The ModelConfig ``hf_cfg`` imports as, with ``cfg``'s execution settings; None when the
    importer refuses it."""
    try:
        return hf_lib.hf_config_to_model_config(
            hf_cfg, **{f: getattr(cfg, f) for f in hf_lib._EXECUTION_FIELDS})
    except (ValueError, KeyError, TypeError):
        return None


def source_config(source: dict[str, Any], cfg: ModelConfig, tensor_dtype: str) -> dict:
    """The exported ``config.json``: ``source`` (the HF checkpoint the run started from) with
    every field unchanged, except

    * the fields whose value the trained model ``cfg`` changed (``model.overrides``, e.g.
      ``n_positions``), taken from ``model_config_to_hf(cfg)``;
    * ``torch_dtype`` / ``dtype`` (when present): ``tensor_dtype``, the dtype of the written
      tensors.

    Raises ``ValueError`` naming the fields when the result would not import back as ``cfg``."""
    out = dict(source)
    base = _imports_as(source, cfg)
    if base != cfg:
        ours = hf_lib.model_config_to_hf(cfg)
        for key, value in ours.items():
            if key in ("architectures", "model_type") or source.get(key, object()) == value:
                continue
            if _imports_as({**source, key: value}, cfg) != base:  # the field matters
                out[key] = value
        if _imports_as(out, cfg) != cfg:
            taken = sorted(k for k in out if source.get(k, object()) != out[k])
            raise ValueError(
                f"cannot write the source checkpoint's config.json back for the trained model: "
                f"with {taken} taken from the trained model it still imports differently; "
                f"export without a source (write_hf(..., source='')) to get transformers' "
                f"defaults for the model type")
    for key in _DTYPE_KEYS:
        if key in out and out[key] is not None:
            out[key] = tensor_dtype
    return out


def _local_dir(name: str) -> str | None:
    """A local directory for ``name`` (itself, or its hub snapshot in the local cache); None
    when it has none."""
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached / not a hub name: the caller falls back
        return None


def copy_files(src_dir: str, out: str, names: tuple[str, ...]) -> list[str]:
    """Copy the files of ``names`` present in ``src_dir`` to ``out`` byte for byte; returns the
    names copied."""
    copied = []
    for name in names:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out, name))
            copied.append(name)
    return copied


def write_hf(out: str, cfg: ModelConfig, params: dict, *, source: str = "",
             tokenizer: str = "") -> str:
    """Write ``params`` of the model ``cfg`` to ``out`` as an HF model directory.

    ``source``: the HF checkpoint (directory or cached hub name) the model was trained from;
    its config.json is kept (``source_config``) and its ``MODEL_FILES`` copied. ``tokenizer``:
    the tokenizer the run used (directory or hub name); its ``TOKENIZER_FILES`` are copied as
    they are, or, when it has no local files, it is loaded and saved by ``transformers``.
    Returns ``out``. Raises ``FileNotFoundError`` when ``source`` has no local config.json."""
    save_hf(out, cfg, params)
    if source:
        src_dir = _local_dir(source)
        if src_dir is None or not os.path.isfile(os.path.join(src_dir, "config.json")):
            raise FileNotFoundError(
                f"model.hf_path={source!r}: no config.json there (nor in the local hub cache); "
                f"export needs the checkpoint the run started from")
        with open(os.path.join(src_dir, "config.json")) as f:
            src_cfg = json.load(f)
        leaves = jax.tree.leaves(params)
        tensor_dtype = str(np.dtype(leaves[0].dtype)) if leaves else "float32"
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(source_config(src_cfg, cfg, tensor_dtype), f, indent=2, sort_keys=True)
            f.write("\n")
        copy_files(src_dir, out, MODEL_FILES)
    if tokenizer:
        tok_dir = _local_dir(tokenizer)
        if tok_dir is None or not copy_files(tok_dir, out, TOKENIZER_FILES):
            import transformers

            transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
        write_generation_eos(out, response_end_ids(out))
    return out


def response_end_ids(tokenizer_dir: str) -> list[int]:
    """The tokens that end a response for the tokenizer in ``tokenizer_dir``: its EOS and the
    token its chat template closes an assistant turn with (``PairTokenizer.end_ids``: ChatML
    '<|im_end|>', Llama-3 '<|eot_id|>'), sorted."""
    return sorted(PairTokenizer(load_tokenizer(tokenizer_dir), None).end_ids)


def write_generation_eos(out: str, end_ids: list[int]) -> list[int]:
    """Make ``out/generation_config.json`` stop ``transformers``' ``generate`` where the run's
    responses end: its ``eos_token_id`` gets every id of ``end_ids`` it lacks (a chat model's
    turn end besides EOS); without the file, one is written from ``out/config.json``'s
    ``bos_token_id`` / ``pad_token_id`` and ``end_ids``. A file that already names them all is
    left byte for byte. Returns the ids added (all of them for a new file)."""
    path = os.path.join(out, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            gen = json.load(f)
    else:
        with open(os.path.join(out, "config.json")) as f:
            model_cfg = json.load(f)
        gen = {k: model_cfg[k] for k in ("bos_token_id", "pad_token_id")
               if model_cfg.get(k) is not None}
    eos = gen.get("eos_token_id")
    have = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    added = [int(e) for e in end_ids if int(e) not in have]
    if added or not os.path.isfile(path):
        ids = have + added
        gen["eos_token_id"] = ids[0] if len(ids) == 1 else ids
        with open(path, "w") as f:
            json.dump(gen, f, indent=2, sort_keys=True)
            f.write("\n")
    return added


def _policy(workdir: str, step: int | None):
    """``(config, ModelConfig, params, lora_model, adapters)`` of ``workdir``'s policy at
    ``step`` (default: newest); a LoRA run's params are its base with the adapters merged in
    (``lora_model``/``adapters`` None otherwise)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a dpo_jax run directory?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model = Model(model_config_from(config.model))
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu),
                        model.abstract_params())
    if lora_base.run_lora(config).rank:
        shardings = jax.tree.map(lambda _: cpu, like)
        lora_model, base, adapters = state_lib.run_base_and_adapters(workdir, model, shardings,
                                                                   step)
        params = lora_lib.merge(lora_model, base, adapters)
        return config, lora_lib.merged_config(lora_model), params, lora_model, adapters
    return config, model.cfg, ckpt_lib.restore_params(workdir, like, step=step), None, None


def export_run(workdir: str, out: str, step: int | None = None,
               adapter_out: str | None = None, fmt: str = "hf", gguf_type: str = "F16") -> str:
    """Export ``workdir``'s policy at ``step`` to ``out``; returns ``out``.

    ``fmt='hf'``: an HF directory; a LoRA run's policy is its base with the adapters merged in,
    and its adapters also go to ``adapter_out`` (default ``out/adapter``) as a PEFT directory.
    ``fmt='gguf'``: one GGUF file (``export_gguf.write_gguf``) of the (merged) policy with
    matrices in ``gguf_type``, the run's tokenizer and chat template; ValueError before
    anything is written when llama.cpp cannot represent the model, tokenizer or type."""
    if fmt == "gguf":
        if gguf_type not in export_gguf.GGUF_TYPES:  # before the checkpoint is read
            raise ValueError(f"--gguf_type={gguf_type!r} is not implemented; use one of "
                             f"{export_gguf.GGUF_TYPES}")
    elif fmt != "hf":
        raise ValueError(f"--format={fmt!r}: use 'hf' or 'gguf'")
    config, cfg, params, lora_model, adapters = _policy(workdir, step)
    tok_name = config.data.tokenizer or config.model.hf_path
    if fmt == "gguf":
        if not tok_name:  # llama.cpp cannot load a GGUF file without a vocabulary
            raise ValueError(f"{workdir}: the run has no tokenizer (data.tokenizer and "
                             f"model.hf_path are empty); a GGUF file needs one")
        tokenizer = load_tokenizer(tok_name)
        name = os.path.basename(os.path.normpath(config.model.hf_path or workdir))
        return export_gguf.write_gguf(out, cfg, params, tokenizer, gguf_type, name=name)
    if lora_model is not None:
        lora_peft.save_peft(adapter_out or os.path.join(out, "adapter"), lora_model, adapters,
                            base_model=config.model.hf_path)
    return write_hf(out, cfg, params, source=config.model.hf_path, tokenizer=tok_name)


def main(argv):
    del argv
    print(export_run(_WORKDIR.value, _OUT.value, _STEP.value, _ADAPTER_OUT.value,
                     fmt=_FORMAT.value, gguf_type=_GGUF_TYPE.value))


if __name__ == "__main__":
    app.run(main)
