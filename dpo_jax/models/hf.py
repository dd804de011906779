"""Import / export of Hugging Face checkpoint weights (safetensors) without torch; the
config.json <-> ModelConfig mapping and its checks are in hf_config.py.

Why explicit maps (hf_maps.py) rather than transformers' own conversion: every tensor's name,
shape and layout is checked, and each tensor is read straight into its target sharding, so a
model larger than one host's memory never exists unsharded on a host.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from typing import Any

import jax
import numpy as np

from dpo_jax.models import hf_maps, quant
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.hf_config import check_exportable, model_config_to_hf, resolve_path
from dpo_jax.models.model import Model


class _Checkpoint:
    """Name -> safetensors handle over a single file or an index of shards (lazy, mmap'd).

    A missing file or shard, a truncated file (its header or data cut short) or an index
    naming no tensors is a FileNotFoundError / ValueError naming the file."""

    def __init__(self, path: str):
        from safetensors import SafetensorError, safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f).get("weight_map")
                except json.JSONDecodeError as e:
                    raise ValueError(f"{index}: not valid JSON (line {e.lineno}: {e.msg})") from None
            if not weight_map:
                raise ValueError(f"{index}: field 'weight_map' is absent or empty")
            files = sorted(set(weight_map.values()))
            for shard in files:
                if not os.path.exists(os.path.join(path, shard)):
                    tensor = next(k for k, v in weight_map.items() if v == shard)
                    raise FileNotFoundError(
                        f"{index}: field 'weight_map' puts {tensor!r} (and "
                        f"{sum(v == shard for v in weight_map.values()) - 1} more tensors) in "
                        f"shard {shard!r}, which is not in {path}")
        else:
            single = os.path.join(path, "model.safetensors")
            if not os.path.exists(single):
                ggufs = [n for n in sorted(os.listdir(path)) if n.endswith(".gguf")]
                hint = (f"; {ggufs} are GGUF (llama.cpp) files, which dpo_jax does not read: "
                        "convert to safetensors with transformers first" if ggufs else
                        "; *.bin (pickle) checkpoints are not read: convert with transformers' "
                        "save_pretrained(safe_serialization=True)" if glob.glob(
                            os.path.join(path, "*.bin")) else "")
                raise FileNotFoundError(f"{path}: no model.safetensors nor "
                                        f"model.safetensors.index.json{hint}")
            files, weight_map = ["model.safetensors"], None
        self.handles = {}
        for f in files:
            try:
                self.handles[f] = safe_open(os.path.join(path, f), framework="np")
            except SafetensorError as e:
                size = os.path.getsize(os.path.join(path, f))
                raise ValueError(f"{os.path.join(path, f)}: not a whole safetensors file "
                                 f"({size} bytes; {e}): truncated or corrupt download, fetch it "
                                 "again") from None
        self.where = weight_map or {k: files[0] for k in self.handles[files[0]].keys()}
        held = {f: set(h.keys()) for f, h in self.handles.items()}
        missing = sorted(k for k, f in self.where.items() if k not in held[f])
        if missing:
            raise ValueError(f"{index}: field 'weight_map' puts {missing[0]!r} (and "
                             f"{len(missing) - 1} more) in {self.where[missing[0]]!r}, which "
                             "does not hold it")

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self.where:
            return None
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        sl = self.handles[self.where[name]].get_slice(name)
        return sl[index] if index else sl[:]


def _find_prefix(ckpt: _Checkpoint, cfg: ModelConfig, specs: list) -> str:
    first = next(t.name for t in specs if not t.layered and t.name not in hf_maps.HEAD_NAMES)
    for prefix in hf_maps.FAMILY_MAPS[cfg.family][1]:
        if prefix + first in ckpt.where:
            return prefix
    raise KeyError(f"missing tensor {first!r} (tried prefixes "
                   f"{hf_maps.FAMILY_MAPS[cfg.family][1]}) for family {cfg.family!r}")


def _instances(t: hf_maps.HFTensor, cfg: ModelConfig) -> list[tuple[int | None, int | None]]:
    """The (layer, expert) pairs of a tensor's checkpoint entries (None: no such axis)."""
    layers = range(cfg.n_layer) if t.layered else [None]
    return [(i, e) for i in layers for e in (range(t.experts) if t.experts else [None])]


def _checked(path: str, cfg: ModelConfig) -> tuple[_Checkpoint, list, str]:
    """Open the checkpoint and check every tensor's presence and shape before reading any."""
    ckpt = _Checkpoint(path)
    specs = hf_maps.tensor_specs(cfg)
    prefix = _find_prefix(ckpt, cfg, specs)
    for t in specs:
        for i, e in _instances(t, cfg):
            name = hf_maps.full_name(t.name, prefix, i, e)
            got = ckpt.shape(name)
            if got is None:
                raise KeyError(f"missing tensor {name!r} (expected shape {t.shape}) in {path}")
            if got != t.shape:
                file = os.path.join(path, ckpt.where[name])
                raise ValueError(f"{file}: tensor {name!r} has shape {got} but config.json "
                                 f"implies {t.shape} (vocab_size {cfg.vocab_size}, d_model "
                                 f"{cfg.d_model}, n_layer {cfg.n_layer}): config.json and the "
                                 "weights are of different models")
    return ckpt, specs, prefix


def check_checkpoint(path: str, cfg: ModelConfig) -> None:
    """Check the safetensors checkpoint in directory `path` against `cfg` from headers only
    (no tensor data read): files present and whole (`_Checkpoint`), every tensor present with
    the shape `cfg` implies. Errors name the file and the tensor."""
    _checked(path, cfg)


class _Reader:
    """Blocks of our parameter leaves read from a checked checkpoint (``_checked``), in
    ``cfg.param_dtype``: :meth:`block` reads the part ``index`` of leaf ``key`` (a path of our
    tree) through ``hf_maps.slice_through`` where it can (only the layers and the contiguous HF
    range asked for), else one whole layer tensor, kept in a small LRU cache (fused qkv tensors,
    non-contiguous slices)."""

    def __init__(self, path: str, cfg: ModelConfig):
        self.ckpt, self.specs, self.prefix = _checked(path, cfg)
        self.dtype = (np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16"
                      else jax.numpy.bfloat16)
        self.owner: dict[tuple, tuple[int, int]] = {}
        for ti, t in enumerate(self.specs):
            for j, part in enumerate(t.parts):
                self.owner[(("layers",) + part) if t.layered else part] = (ti, j)
        self.parts_of = functools.lru_cache(maxsize=8)(self._parts)

    def _parts(self, t_index: int, layer: int | None, expert: int | None) -> list[np.ndarray]:
        t = self.specs[t_index]
        raw = self.ckpt.read(hf_maps.full_name(t.name, self.prefix, layer, expert))
        return [np.asarray(p, self.dtype) for p in t.split(raw)]

    def block(self, key: tuple, shape: tuple, index: tuple) -> np.ndarray:
        """Part ``index`` (a tuple of slices, possibly shorter than ``shape``) of the leaf at
        ``key`` whose whole shape is ``shape``. KeyError for a leaf no HF tensor maps to."""
        if key not in self.owner:
            raise KeyError(f"no HF tensor maps to parameter {'/'.join(key)}")
        ti, j = self.owner[key]
        t = self.specs[ti]
        lead = (1 if t.layered else 0) + (1 if t.experts else 0)  # layers, expert axes
        layer_shape = shape[lead:]

        def read(layer: int | None, expert: int | None, index: tuple) -> np.ndarray:
            plan = hf_maps.slice_through(t, layer_shape, index)
            if plan is None:  # fused qkv or a non-contiguous slice: whole tensor (cached)
                return self.parts_of(ti, layer, expert)[j][index]
            hf_index, block, residual = plan
            raw = self.ckpt.read(hf_maps.full_name(t.name, self.prefix, layer, expert),
                                 hf_index)
            raw = raw.T if t.layout == "T" else raw
            return np.asarray(raw.reshape(block)[residual], self.dtype)

        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if not t.layered:
            return read(None, None, index)
        layers = range(*index[0].indices(shape[0]))
        if not t.experts:
            return np.stack([read(i, None, index[1:]) for i in layers])
        experts = range(*index[1].indices(shape[1]))
        return np.stack([np.stack([read(i, e, index[2:]) for e in experts]) for i in layers])


def _key(path_keys) -> tuple:
    return tuple(getattr(k, "key", k) for k in path_keys)


def load_hf_params(path: str, cfg: ModelConfig, shardings: Any = None) -> dict:
    """Read a safetensors checkpoint into our parameter tree (dtype cfg.param_dtype).

    `shardings`: optional tree like the params of jax.sharding.Sharding. Each leaf is built by
    jax.make_array_from_callback, so a device only reads its own shard: stacked layer tensors
    read only the layers in the shard, and within a layer the contiguous HF range holding the
    device's slice (via get_slice; see hf_maps.slice_through). Fused qkv tensors (GPT-2,
    NeoX) and non-contiguous slices read one whole layer tensor, kept in a small LRU cache.
    """
    reader = _Reader(resolve_path(path), cfg)
    abstract = Model(cfg).abstract_params()
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def build(path_keys: tuple, leaf: jax.ShapeDtypeStruct, sharding) -> jax.Array:
        key = _key(path_keys)
        return jax.make_array_from_callback(
            leaf.shape, sharding or default, lambda index: reader.block(key, leaf.shape, index))

    if shardings is None:
        return jax.tree_util.tree_map_with_path(lambda p, x: build(p, x, None), abstract)
    return jax.tree_util.tree_map_with_path(build, abstract, shardings)


def load_hf_quantized(path: str, cfg: ModelConfig, kind: str, shardings: Any = None,
                      embedding: bool = False) -> dict:
    """``quant.quantize_tree(cfg, kind, load_hf_params(path, cfg), embedding)`` (a QLoRA run's
    frozen base, ``model.lora.base_quant``), bit for bit, without the float tree: each
    quantised weight (``quant.weights``: the projections, a mixture of experts' experts) is read
    one layer at a time (``[1, ...]`` in ``cfg.param_dtype``, all of a layer's experts
    together), quantised on the default device by the same ``quant.quantize`` and gathered on
    the host into its ``[layers, ...]`` leaves, which are then placed in their sharding. Peak
    host memory: the quantised model, plus one quantised weight's leaves (all layers) and one
    float layer of it in flight; a quantised input embedding (``embedding``) is read whole and
    then quantised (its NF4 offset is a mean over the whole table). The other leaves are read
    as :func:`load_hf_params` reads them.

    ``shardings``: optional tree like the result (``LoraModel.base_axes``' shardings) of
    jax.sharding.Sharding; default: the first device. ValueError for an unknown ``kind``."""
    if kind not in quant.KINDS[1:]:
        raise ValueError(f"unknown quantization {kind!r}; expected one of {quant.KINDS[1:]}")
    reader = _Reader(resolve_path(path), cfg)
    abstract = Model(cfg).abstract_params()
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    weights = {p: (n_lead, n_in) for p, n_lead, n_in in quant.weights(cfg, abstract).values()}
    embed = quant.quantizes_embedding(cfg, abstract, embedding)
    placed = lambda key: quant.get_path(shardings, key) if shardings is not None else None

    def quantized(key: tuple, leaf: jax.ShapeDtypeStruct, n_lead: int, n_in: int) -> dict:
        fn = jax.jit(lambda w: quant.quantize(kind, w, n_lead, n_in))
        full = (slice(None),) * (len(leaf.shape) - 1)
        out: dict[str, np.ndarray] = {}
        for i in range(leaf.shape[0]):
            layer = jax.device_get(fn(reader.block(key, leaf.shape, (slice(i, i + 1),) + full)))
            for k, v in layer.items():
                if k not in out:
                    out[k] = np.empty((leaf.shape[0],) + v.shape[1:], v.dtype)
                out[k][i] = v[0]
            del layer
        where = placed(key)
        return {k: jax.device_put(v, where[k] if where is not None else default)
                for k, v in out.items()}

    def build(path_keys: tuple, leaf: jax.ShapeDtypeStruct):
        key = _key(path_keys)
        if key in weights:
            return quantized(key, leaf, *weights[key])
        if embed and key == ("embed",):
            w = jax.make_array_from_callback(
                leaf.shape, default, lambda index: reader.block(key, leaf.shape, index))
            where = placed(key)
            return jax.jit(lambda w: quant.quantize_embedding(kind, w), out_shardings=(
                where if where is not None else default))(w)
        return jax.make_array_from_callback(
            leaf.shape, placed(key) or default, lambda index: reader.block(key, leaf.shape, index))

    return jax.tree_util.tree_map_with_path(build, abstract)


def hf_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """``params`` (gathered on this host) as the tensors of the family's HF checkpoint: full
    name (e.g. ``model.layers.0.self_attn.q_proj.weight``) -> array in the HF layout and the
    parameters' dtype (``hf_maps``' ``join``)."""
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    prefix = hf_maps.FAMILY_MAPS[cfg.family][1][0]

    def get(p: tuple) -> np.ndarray:
        node = host
        for k in p:
            node = node[k]
        return node

    tensors = {}
    for t in hf_maps.tensor_specs(cfg):
        for i, e in _instances(t, cfg):
            parts = [get(p) if i is None else get(("layers",) + p)[i] for p in t.parts]
            parts = parts if e is None else [x[e] for x in parts]
            tensors[hf_maps.full_name(t.name, prefix, i, e)] = np.ascontiguousarray(t.join(parts))
    return tensors


def save_hf(path: str, cfg: ModelConfig, params: dict, tokenizer: Any = None) -> None:
    """Write config.json + model.safetensors (+ tokenizer files) loadable by
    transformers.AutoModelForCausalLM.from_pretrained. Gathers the params on this host."""
    from safetensors.numpy import save_file

    hf_cfg = model_config_to_hf(cfg)
    check_exportable(cfg, hf_cfg)
    os.makedirs(path, exist_ok=True)
    try:
        import transformers

        conf = transformers.AutoConfig.for_model(**hf_cfg)
        conf.architectures = hf_cfg["architectures"]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            # the tokenizer's ids when given; a model_type default outside this vocabulary
            # (e.g. Phi-3's 32000 in a smaller model) is dropped
            value = getattr(tokenizer, key, None) if tokenizer is not None else None
            if value is None:
                value = getattr(conf, key, None)
                ids = value if isinstance(value, list) else [value]
                if any(i is not None and not 0 <= i < cfg.vocab_size for i in ids):
                    value = None
            setattr(conf, key, value)
        conf.save_pretrained(path)
    except ImportError:  # plain json is enough for transformers to read later
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)

    tensors = hf_tensors(cfg, params)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
