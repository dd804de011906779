"""LoRA adapters (``dpo_jax/lora.py``) as a PEFT directory: ``adapter_config.json`` +
``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained(base, DIR)`` loads onto the
Hugging Face base model, and back (a PEFT directory as a run's initial adapters).

PEFT names a layer's adapter ``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``), ``<module>`` being the HF Linear's name (``hf_maps``).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from dpo_jax.lora import HEAD, LoraModel
from dpo_jax.models import hf_maps, quant

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# a quantised base's (model.lora.base_quant) transformers quantization_config, beside the adapter
BASE_QUANT_CONFIG = "base_model_quantization.json"


def _peft_modules(model: LoraModel) -> dict[str, str]:
    """target name -> the HF module name pattern (``{i}`` = layer) that PEFT adapts. Raises
    ValueError for a target whose HF tensor is fused with others (GPT-2's c_attn, NeoX's
    query_key_value, Phi-3's qkv_proj / gate_up_proj): one PEFT module per target is needed."""
    prefix = hf_maps.FAMILY_MAPS[model.cfg.family][1][0]
    out = {}
    for t in model.targets:
        if t.name == HEAD:  # transformers' causal LMs name it so, tied or not
            out[t.name] = "lm_head"
            continue
        part = t.path[1:] if t.path[0] == "layers" else t.path
        specs = [s for s in hf_maps.tensor_specs(model.cfg) if part in s.parts]
        spec = specs[0] if specs else None
        ok = spec is not None and len(spec.parts) == 1 and spec.layout == "T"
        if not ok:
            raise ValueError(
                f"PEFT export: target {t.name!r} is stored in the {model.cfg.family} checkpoint "
                f"as {spec.name if spec else 'no tensor'!r}, fused with other projections, "
                "which one LoRA module cannot represent; export the merged model instead, or "
                "target other projections")
        name = spec.name[:-len(".weight")]
        out[t.name] = name if not spec.layered else hf_maps.full_name(name, prefix, None)
    return out


def _peft_key(pattern: str, layer: int | None, which: str) -> str:
    name = pattern.replace("{i}", str(layer)) if layer is not None else pattern
    return f"base_model.model.{name}.lora_{which}.weight"


def save_peft(out: str, model: LoraModel, adapters, base_model: str = "") -> str:
    """Write ``adapters`` as a PEFT LoRA directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, out)`` loads onto
    the exported base; with a quantised base (``model.lora.base_quant``) also
    ``base_model_quantization.json``, the ``BitsAndBytesConfig`` that loads the base as the
    adapters were trained on it (``quant.hf_quantization_config``). Returns ``out``."""
    from safetensors.numpy import save_file

    modules = _peft_modules(model)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), adapters["lora"])
    r = model.lora.rank
    tensors = {}
    for t in model.targets:
        a, b = host[t.name]["a"], host[t.name]["b"]
        layers = range(t.lead[0]) if t.lead else [None]
        for i in layers:
            a_i = a[i] if i is not None else a
            b_i = b[i] if i is not None else b
            tensors[_peft_key(modules[t.name], i, "A")] = np.ascontiguousarray(
                a_i.reshape(t.fan_in, r).T)
            tensors[_peft_key(modules[t.name], i, "B")] = np.ascontiguousarray(
                b_i.reshape(r, t.fan_out).T)
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": model.lora.alpha, "lora_dropout": model.lora.dropout,
        "target_modules": sorted({p.split(".")[-1] for p in modules.values()}),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    files = {PEFT_CONFIG: config}
    if model.lora.base_quant != "none":  # the base the adapters were trained on
        files[BASE_QUANT_CONFIG] = quant.hf_quantization_config(
            model.lora.base_quant, model.cfg.dtype, moe=bool(model.cfg.n_experts))
    for name, value in files.items():
        with open(os.path.join(out, name), "w") as f:
            json.dump(value, f, indent=2, sort_keys=True)
            f.write("\n")
    return out


def load_peft(path: str, model: LoraModel, shardings) -> dict:
    """Adapters from a PEFT LoRA directory, as ``model``'s adapter tree in ``shardings``.

    Raises ValueError when its rank, alpha or adapted modules differ from ``model.lora`` (the
    message names both), FileNotFoundError when a file is missing."""
    from safetensors import safe_open

    cfg_path, w_path = os.path.join(path, PEFT_CONFIG), os.path.join(path, PEFT_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"model.lora.path={path!r}: {os.path.basename(p)} not found "
                                    "(a PEFT LoRA directory holds adapter_config.json and "
                                    "adapter_model.safetensors)")
    with open(cfg_path) as f:
        peft_cfg = json.load(f)
    lora = model.lora
    if int(peft_cfg.get("r", -1)) != lora.rank or float(peft_cfg.get("lora_alpha", -1)) != lora.alpha:
        raise ValueError(f"{cfg_path}: r={peft_cfg.get('r')}, lora_alpha="
                         f"{peft_cfg.get('lora_alpha')}; the run has model.lora.rank={lora.rank}, "
                         f"alpha={lora.alpha}: set them to the adapter's")
    if peft_cfg.get("fan_in_fan_out") or peft_cfg.get("use_rslora") or peft_cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: fan_in_fan_out / use_rslora / use_dora adapters are not "
                         "plain LoRA; convert them first")
    modules = _peft_modules(model)
    out = {}
    with safe_open(w_path, framework="np") as f:
        keys = set(f.keys())
        for t in model.targets:
            layers = range(t.lead[0]) if t.lead else [None]
            ab = {"a": [], "b": []}
            for i in layers:
                for which, k in (("A", "a"), ("B", "b")):
                    name = _peft_key(modules[t.name], i, which)
                    if name not in keys:
                        raise ValueError(f"{w_path}: no tensor {name!r} for target {t.name!r} "
                                         f"(model.lora.targets={','.join(lora.targets)}); the "
                                         "adapter must cover exactly the run's targets")
                    keys.discard(name)
                    ab[k].append(f.get_tensor(name).astype(np.float32).T)
            shapes = t.adapter_shapes(lora.rank)
            out[t.name] = {k: np.stack(v).reshape(shapes[k]) if t.lead else v[0].reshape(shapes[k])
                           for k, v in ab.items()}
        if keys:
            raise ValueError(f"{w_path}: tensors for modules the run does not adapt: "
                             f"{sorted(keys)[:4]}...; set model.lora.targets to the adapter's")
    return jax.device_put({"lora": out}, shardings)
