"""Weight-only quantization of a frozen base's projections (QLoRA, Dettmers et al. 2023,
*QLoRA: Efficient Finetuning of Quantized LLMs*): int8 per output channel, or 4-bit NormalFloat
(NF4) in blocks of 64 with double-quantised block constants, dequantised inside each matmul.

Kinds (``model.lora.base_quant``, ``dpo_jax/lora.py``):

* ``'int8'``: ``w = q * s`` with ``s = absmax / 127`` over each output channel's inputs and
  ``q = round(w * 127 / absmax)`` in int8 (bitsandbytes' row-wise ``int8_vectorwise_quant``
  without the outlier split, bit for bit). Stored in the weight's own layout ``[*lead, *in, *out]`` with ``scale``
  float32 ``[*lead, *out]``; the matmul is ``(x @ q) * s`` (float32 accumulation), so no scaled
  weight is formed. 1 byte per parameter + 4 per output channel.
* ``'nf4'``: each layer's weight read as the HF ``[out, in]`` matrix (``[*out, *in]``, row-major:
  bitsandbytes' flattening of a ``Linear``'s weight), cut into blocks of 64; block ``b`` holds
  ``absmax_b`` and, per value, the index of the nearest of the 16 NF4 levels (:data:`NF4`,
  Appendix E of the paper) to ``w / absmax_b``, two per uint8 (first value in the high nibble).
  The block constants are quantised again (the paper's double quantisation): their per-layer
  mean ``offset`` is subtracted and the rest quantised blockwise, 256 per block, to the 8-bit
  dynamic map (:func:`dynamic_map`) with a float32 ``absmax2`` per 256 blocks. About 0.516
  bytes per parameter (0.5 + 1/64 + 4/16384). Bit for bit bitsandbytes' ``quantize_4bit(W,
  blocksize=64, quant_type='nf4', compress_statistics=True)`` on each layer's HF weight
  (``tests/test_quant.py``).

A quantised weight is a dict of arrays in the parameter tree where the float weight was
(:func:`quantize_tree`), read by a :class:`QuantLinear` module in its place (:func:`attach`).
Its matmul dequantises one layer's weight (the decoder scans layers) inside ``jax.checkpoint``,
so neither the forward nor the backward keeps a dequantised copy: the backward recomputes it
from the codes (``dx = dy @ w^T``; the base gets no gradient). Quantised: every attention
projection (q, k, v, o) and dense MLP projection (up, gate, down); a mixture of experts'
experts, each expert's matrix on its own (read as HF's per-expert ``[out, in]`` Linear, as
bitsandbytes quantises it), held as :class:`Experts` and dequantised one expert at a time by
the tiled kernel, one layer's experts at a time by the dense and ``ragged_dot`` dispatches
(``models/moe_dispatch.py``), and Qwen2-MoE's shared expert. Kept in ``param_dtype`` as QLoRA
keeps them: embeddings, the LM head, norms, biases, the router and the shared expert's gate.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KINDS = ("none", "int8", "nf4")
LEAVES = {"int8": ("codes", "scale"), "nf4": ("codes", "absmax", "absmax2", "offset")}
BLOCK, BLOCK2 = 64, 256  # NF4 block; double-quantisation block (of block constants)

# The 16 NF4 levels: QLoRA Appendix E (= bitsandbytes' ``get_4bit_type('nf4')``).
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

# name -> (path in the parameter tree, number of input axes after the `layers` axis)
PROJECTIONS = {
    "q": (("layers", "attn", "q"), 1), "k": (("layers", "attn", "k"), 1),
    "v": (("layers", "attn", "v"), 1), "o": (("layers", "attn", "o"), 2),
    "up": (("layers", "mlp", "up"), 1), "gate": (("layers", "mlp", "gate"), 1),
    "down": (("layers", "mlp", "down"), 1)}
# a mixture of experts' MLP (models/moe.py): name -> (path, stacked axes, input axes); the
# experts [layers, expert, *in, *out] are quantised per (layer, expert) matrix, the shared
# expert (Qwen2-MoE) as dense projections; the router and the shared expert's gate stay float
EXPERT_WEIGHTS = {
    "gate": (("layers", "mlp", "gate"), 2, 1), "up": (("layers", "mlp", "up"), 2, 1),
    "down": (("layers", "mlp", "down"), 2, 1),
    "shared/gate": (("layers", "mlp", "shared", "gate"), 1, 1),
    "shared/up": (("layers", "mlp", "shared", "up"), 1, 1),
    "shared/down": (("layers", "mlp", "shared", "down"), 1, 1)}


def check_settings(kind: str, embedding: bool, rank: int) -> None:
    """ValueError for ``model.lora`` settings no quantised base can have: an unknown kind, a
    quantised base without adapters (rank 0), ``quant_embedding`` without a kind."""
    if kind not in KINDS:
        raise ValueError(f"model.lora.base_quant={kind!r}: expected one of {KINDS}")
    if kind != "none" and rank <= 0:
        raise ValueError(f"model.lora.base_quant={kind!r} quantises LoRA's frozen base; it "
                         "needs model.lora.rank > 0")
    if embedding and kind == "none":
        raise ValueError("model.lora.quant_embedding=True quantises the input embedding with "
                         "model.lora.base_quant, which is 'none'; set 'int8' or 'nf4'")


def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic quantisation map [256] (Dettmers 2015; bitsandbytes'
    ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``, the map of the
    paper's double quantisation), sorted, float32."""
    data = []
    for i in range(7):
        bounds = np.linspace(0.1, 1, 2 ** i + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        data += (np.float32(10.0 ** (-6 + i)) * means).tolist()
        data += (-np.float32(10.0 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return np.sort(np.array(data + [0.0] * (256 - len(data)), np.float32))


def quantize_blockwise(x: jax.Array, code, block: int) -> tuple[jax.Array, jax.Array]:
    """Flat ``x`` [n] -> (uint8 index [n] of the code level nearest to ``x / absmax`` of its
    block, absmax float32 [ceil(n / block)]): bitsandbytes' blockwise rule (levels chosen by
    the midpoints of the sorted ``code``; the last block may be short)."""
    code = jnp.asarray(code, jnp.float32)
    n = x.shape[0]
    nb = -(-n // block)
    x = jnp.pad(x.astype(jnp.float32), (0, nb * block - n)).reshape(nb, block)
    absmax = jnp.max(jnp.abs(x), axis=1)
    scaled = jnp.clip(x * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1, 1)
    q = jnp.searchsorted((code[:-1] + code[1:]) / 2, scaled.reshape(-1), side="left")
    return q[:n].astype(jnp.uint8), absmax


def dequantize_blockwise(q: jax.Array, absmax: jax.Array, code, block: int) -> jax.Array:
    """Inverse of :func:`quantize_blockwise`: ``code[q] * absmax`` of each block, float32 [n]."""
    n = q.shape[0]
    v = jnp.pad(jnp.asarray(code, jnp.float32)[q], (0, absmax.shape[0] * block - n))
    return (v.reshape(-1, block) * absmax[:, None]).reshape(-1)[:n]


def _fold(dims: tuple, axes: tuple, k: int) -> tuple[tuple, tuple]:
    """``dims`` with its shortest suffix whose size ``k`` divides folded into one axis of that
    size / k (named as the suffix when it is one axis, else None): the storage of per-``k``
    quantities of a row-major array, sharded like the array where its axes survive."""
    for j in range(len(dims) - 1, -1, -1):
        size = math.prod(dims[j:])
        if size % k == 0:
            return dims[:j] + (size // k,), axes[:j] + ((axes[j] if j == len(dims) - 1 else None),)
    raise ValueError(f"a weight of shape {dims} has {math.prod(dims)} values per layer, not a "
                     f"multiple of the NF4 block ({k}); use model.lora.base_quant='int8'")


def _nf4_layer(w_OI: jax.Array) -> dict:
    """One layer's ``[*out, *in]`` weight -> its NF4 leaves (see the module docstring)."""
    dims = w_OI.shape
    q, absmax = quantize_blockwise(w_OI.reshape(-1), NF4, BLOCK)
    offset = jnp.mean(absmax)
    q2, absmax2 = quantize_blockwise(absmax - offset, dynamic_map(), BLOCK2)
    return {"codes": ((q[0::2] << 4) | q[1::2]).reshape(_fold(dims, dims, 2)[0]),
            "absmax": q2.reshape(_fold(dims, dims, BLOCK)[0]), "absmax2": absmax2,
            "offset": offset}


def _nf4_values(leaf: Mapping, dims: tuple) -> jax.Array:
    """One layer's dequantised ``[*out, *in]`` weight, float32."""
    absmax = dequantize_blockwise(leaf["absmax"].reshape(-1), leaf["absmax2"], dynamic_map(),
                                  BLOCK2) + leaf["offset"]
    c = leaf["codes"].reshape(-1)
    q = jnp.stack([c >> 4, c & 15], axis=1).reshape(-1)
    return dequantize_blockwise(q, absmax, NF4, BLOCK).reshape(dims)


def _split(shape: tuple, n_lead: int, n_in: int):
    return shape[:n_lead], shape[n_lead:n_lead + n_in], shape[n_lead + n_in:]


def quantize(kind: str, w: jax.Array, n_lead: int, n_in: int) -> dict:
    """Weight ``w`` [*lead, *in, *out] (``n_lead`` stacked axes, then ``n_in`` input axes) as
    ``kind``'s leaves (module docstring); jittable. ValueError for an unknown kind."""
    lead, i_s, o_s = _split(w.shape, n_lead, n_in)
    if kind == "int8":
        w32 = w.astype(jnp.float32)
        in_axes = tuple(range(n_lead, n_lead + n_in))
        absmax = jnp.max(jnp.abs(w32), axis=in_axes, keepdims=True)
        q = jnp.round(w32 * (127.0 / jnp.where(absmax == 0, 1.0, absmax)))
        return {"codes": q.astype(jnp.int8), "scale": (absmax / 127.0).reshape(lead + o_s)}
    if kind == "nf4":
        i, o = math.prod(i_s), math.prod(o_s)
        w_LOI = jnp.swapaxes(w.reshape(-1, i, o), 1, 2).reshape((-1,) + o_s + i_s)
        out = jax.vmap(_nf4_layer)(w_LOI)
        return jax.tree.map(lambda x: x.reshape(lead + x.shape[1:]), out)
    raise ValueError(f"unknown quantization {kind!r}; expected one of {KINDS[1:]}")


def dequantize(kind: str, leaf: Mapping, shape: tuple, n_lead: int, n_in: int) -> jax.Array:
    """The float32 weight [*lead, *in, *out] (``shape``) that ``leaf`` stands for."""
    lead, i_s, o_s = _split(tuple(shape), n_lead, n_in)
    if kind == "int8":
        scale = leaf["scale"].reshape(lead + (1,) * len(i_s) + o_s)
        return leaf["codes"].astype(jnp.float32) * scale
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[n_lead:]), dict(leaf))
    w_LOI = jax.vmap(lambda lf: _nf4_values(lf, o_s + i_s))(flat)
    i, o = math.prod(i_s), math.prod(o_s)
    return jnp.swapaxes(w_LOI.reshape(-1, o, i), 1, 2).reshape(shape)


def leaf_axes(kind: str, shape: tuple, axes: tuple, n_lead: int, n_in: int) -> dict:
    """Logical axes of :func:`quantize`'s leaves for a weight of ``shape`` and ``axes``: the
    codes and per-block constants keep the weight's axis names where their axes are the
    weight's (so they shard like it); the second level and the offset are per layer."""
    lead, i_s, o_s = _split(tuple(shape), n_lead, n_in)
    la, ia, oa = _split(tuple(axes), n_lead, n_in)
    if kind == "int8":
        return {"codes": tuple(axes), "scale": la + oa}
    return {"codes": la + _fold(o_s + i_s, oa + ia, 2)[1],
            "absmax": la + _fold(o_s + i_s, oa + ia, BLOCK)[1],
            "absmax2": la + (None,), "offset": la}


def quantize_embedding(kind: str, w_VD: jax.Array) -> dict:
    """An input embedding [V, D] quantised row by row (``model.lora.quant_embedding``): int8
    with one scale per token row, or NF4 in blocks of 64 along each row (HF's layout, as
    bitsandbytes would quantise it; D a multiple of 64) with double-quantised constants."""
    if kind == "int8":
        w = w_VD.astype(jnp.float32)
        absmax = jnp.max(jnp.abs(w), axis=1, keepdims=True)
        q = jnp.round(w * (127.0 / jnp.where(absmax == 0, 1.0, absmax)))
        return {"codes": q.astype(jnp.int8), "scale": absmax[:, 0] / 127.0}
    if w_VD.shape[1] % BLOCK:
        raise ValueError(f"model.lora.quant_embedding with NF4 needs d_model a multiple of "
                         f"{BLOCK} (blocks along each token's row); d_model={w_VD.shape[1]}")
    return _nf4_layer(w_VD)


def embedding_lookup(kind: str, leaf: Mapping, ids: jax.Array) -> jax.Array:
    """Rows ``ids`` [...] of a :func:`quantize_embedding` table, dequantised: float32 [..., D];
    only the gathered rows are read."""
    if kind == "int8":
        return leaf["codes"][ids].astype(jnp.float32) * leaf["scale"][ids][..., None]
    c = leaf["codes"][ids]
    q = jnp.stack([c >> 4, c & 15], axis=-1).reshape(*ids.shape, -1)
    nb = leaf["absmax"].shape[1]  # blocks per row
    block = ids[..., None] * nb + jnp.arange(nb)  # the blocks' flat index in the table
    absmax = (jnp.asarray(dynamic_map())[leaf["absmax"][ids]] * leaf["absmax2"][block // BLOCK2]
              + leaf["offset"])
    v = jnp.asarray(NF4)[q].reshape(*ids.shape, nb, BLOCK) * absmax[..., None]
    return v.reshape(*ids.shape, -1)


def hf_quantization_config(kind: str, compute_dtype: str, moe: bool = False) -> dict:
    """transformers' ``BitsAndBytesConfig`` (``to_dict`` form) of the same weight quantisation:
    NF4 with double quantisation (bit for bit the same codes; bitsandbytes computes in
    ``compute_dtype`` on the dequantised weight, as here), or 8-bit with the outlier split off
    (the same row-wise weights; bitsandbytes' LLM.int8() also quantises the activations, which
    this module does not). The LM head is left out, as QLoRA leaves it; with ``moe`` (a mixture
    of experts) also the modules named ``gate``: the router (Mixtral's
    ``block_sparse_moe.gate``, Qwen2/3-MoE's ``mlp.gate``) and Qwen2-MoE's
    ``mlp.shared_expert_gate``, which stay float here (transformers 5 matches the name as a
    suffix, 4.x by module name: neither matches ``gate_proj``)."""
    skip = ["lm_head", "gate"] if moe else ["lm_head"]
    if kind == "nf4":
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": skip}
    return {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True,
            "llm_int8_threshold": 0.0, "llm_int8_skip_modules": skip}


# ------------------------------------------------------------------------------ the module
class QuantParam(nnx.Variable):
    """A leaf of a quantised weight (codes, block constants) inside the module graph."""


class QuantLinear(nnx.Module):
    """A quantised projection in place of its ``nnx.Param``: called on one layer's leaves,
    ``x [..., I] -> x @ W [..., O]`` (input / output axes flattened) in ``x``'s dtype with
    float32 accumulation, dequantising ``W`` inside ``jax.checkpoint``."""

    def __init__(self, kind: str, leaves: Mapping, in_shape: tuple, out_shape: tuple):
        self.kind, self.in_shape, self.out_shape = kind, tuple(in_shape), tuple(out_shape)
        for k, s in leaves.items():
            setattr(self, k, QuantParam(jnp.zeros(s.shape, s.dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        leaf = {k: getattr(self, k)[...] for k in LEAVES[self.kind]}
        return _matmul(self.kind, self.in_shape, self.out_shape, x, leaf)


class QuantEmbedding(nnx.Module):
    """A quantised input embedding in place of its ``nnx.Param`` (:func:`embedding_lookup`)."""

    def __init__(self, kind: str, leaves: Mapping):
        self.kind = kind
        for k, s in leaves.items():
            setattr(self, k, QuantParam(jnp.zeros(s.shape, s.dtype)))

    def lookup(self, ids: jax.Array) -> jax.Array:
        return embedding_lookup(self.kind, {k: getattr(self, k)[...] for k in LEAVES[self.kind]},
                                ids)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["leaves"],
                   meta_fields=["kind", "in_dim", "out_dim"])
@dataclasses.dataclass(frozen=True)
class Experts:
    """One layer's quantised expert weights, standing for a float ``[E, in_dim, out_dim]``
    (``models/moe.py``: gate / up ``[E, D, F]``, down ``[E, F, D]``): ``kind``'s leaves (see
    :func:`quantize`) with a leading expert axis. A pytree (the leaves are its children), so it
    passes through ``lax.scan``, ``jax.checkpoint`` and ``shard_map`` (split on the expert
    axis) like the float weight."""

    leaves: dict
    kind: str
    in_dim: int
    out_dim: int

    @property
    def n(self) -> int:
        """The number of experts E."""
        return self.leaves["codes"].shape[0]

    def expert(self, e: jax.Array, dtype) -> jax.Array:
        """Expert ``e``'s weight (a traced index) dequantised: ``[in_dim, out_dim]`` in ``dtype``
        (float32 levels x constants, then cast, as :class:`QuantLinear`)."""
        leaf = {k: jax.lax.dynamic_index_in_dim(v, e, 0, keepdims=False)
                for k, v in self.leaves.items()}
        return dequantize(self.kind, leaf, (self.in_dim, self.out_dim), 0, 1).astype(dtype)

    def whole(self, dtype) -> jax.Array:
        """Every expert's weight dequantised: ``[E, in_dim, out_dim]`` in ``dtype``."""
        return dequantize(self.kind, self.leaves, (self.n, self.in_dim, self.out_dim), 1,
                          1).astype(dtype)


class QuantExperts(nnx.Module):
    """A mixture of experts' quantised expert weights in place of their ``nnx.Param``
    (``[layers, E, *in, *out]``); :meth:`experts` gives one layer's :class:`Experts`."""

    def __init__(self, kind: str, leaves: Mapping, in_dim: int, out_dim: int):
        self.kind, self.in_dim, self.out_dim = kind, int(in_dim), int(out_dim)
        for k, s in leaves.items():
            setattr(self, k, QuantParam(jnp.zeros(s.shape, s.dtype)))

    def experts(self) -> Experts:
        return Experts({k: getattr(self, k)[...] for k in LEAVES[self.kind]}, self.kind,
                       self.in_dim, self.out_dim)


def _matmul(kind, i_s, o_s, x, leaf):
    i, o = math.prod(i_s), math.prod(o_s)

    @jax.checkpoint
    def mm(x_NI, leaf):
        if kind == "int8":
            y = jnp.dot(x_NI, leaf["codes"].reshape(i, o).astype(x.dtype),
                        preferred_element_type=jnp.float32)
            return (y * leaf["scale"].reshape(o)).astype(x.dtype)
        w_OI = _nf4_values(leaf, o_s + i_s).reshape(o, i).astype(x.dtype)
        return jax.lax.dot_general(x_NI, w_OI, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32).astype(x.dtype)

    return mm(x.reshape(-1, i), leaf).reshape(*x.shape[:-1], o)


# ------------------------------------------------------------------------------ trees
def get_path(tree, path):
    """``tree[path[0]][path[1]]...``, or None where the path leaves the tree."""
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _with(tree: Mapping, path: tuple, value) -> dict:
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _with(tree[path[0]], path[1:], value)
    return out


def projections(cfg, tree) -> dict[str, tuple[tuple, int]]:
    """The quantised dense projections present in ``tree``: name -> (path, input axes) (a
    mixture of experts' MLP is not among them: :func:`weights`)."""
    return {n: (p, k) for n, (p, k) in PROJECTIONS.items()
            if get_path(tree, p) is not None and not (cfg.n_experts and p[1] == "mlp")}


def weights(cfg, tree) -> dict[str, tuple[tuple, int, int]]:
    """Every weight :func:`quantize_tree` quantises in ``tree``: name -> (path, stacked axes,
    input axes): the :func:`projections` (1 stacked axis, the layers) and a mixture of experts'
    :data:`EXPERT_WEIGHTS` (the experts: 2, layers and expert)."""
    out = {n: (p, 1, k) for n, (p, k) in projections(cfg, tree).items()}
    if cfg.n_experts:
        out.update({n: v for n, v in EXPERT_WEIGHTS.items() if get_path(tree, v[0]) is not None})
    return out


def quantizes_embedding(cfg, tree, embedding: bool) -> bool:
    """Whether ``tree``'s input embedding is quantised: asked for, and not tied to the LM head
    (a tied table is read whole by the head, so it stays in ``param_dtype``)."""
    return embedding and not cfg.tie_embeddings and "embed" in tree


def is_quantized(tree) -> bool:
    """Whether ``tree``'s query projection is a quantised weight (a dict of leaves)."""
    return isinstance(get_path(tree, PROJECTIONS["q"][0]), Mapping)


def quantize_tree(cfg, kind: str, params, embedding: bool = False) -> dict:
    """``params`` with every projection (:func:`projections`) replaced by its ``kind`` leaves,
    and with ``embedding`` an untied input embedding (:func:`quantize_embedding`); other leaves
    unchanged. Jittable."""
    if quantizes_embedding(cfg, params, embedding):
        params = {**params, "embed": quantize_embedding(kind, params["embed"])}
    for name, (path, n_lead, n_in) in weights(cfg, params).items():
        params = _with(params, path, quantize(kind, get_path(params, path), n_lead, n_in))
    return params


def dequantize_tree(cfg, kind: str, params, shapes, dtype) -> dict:
    """The float tree (``dtype``) a :func:`quantize_tree` output stands for; ``shapes`` is the
    float tree's ``abstract_params``."""
    if isinstance(params.get("embed"), Mapping):
        ids = jnp.arange(shapes["embed"].shape[0])
        params = {**params, "embed": embedding_lookup(kind, params["embed"], ids).astype(dtype)}
    for name, (path, n_lead, n_in) in weights(cfg, shapes).items():
        w = dequantize(kind, get_path(params, path), get_path(shapes, path).shape, n_lead, n_in)
        params = _with(params, path, w.astype(dtype))
    return params


def tree_axes(cfg, kind: str, shapes, axes, embedding: bool = False) -> dict:
    """Logical axes of :func:`quantize_tree`'s output, from the float tree's ``shapes`` and
    ``axes``."""
    if quantizes_embedding(cfg, shapes, embedding):  # rows stay on `vocab`, blocks on `embed`
        v, d = axes["embed"]
        axes = {**axes, "embed": {"codes": (v, d), "scale": (v,)} if kind == "int8" else {
            "codes": (v, d), "absmax": (v, d), "absmax2": (None,), "offset": ()}}
    for name, (path, n_lead, n_in) in weights(cfg, shapes).items():
        axes = _with(axes, path, leaf_axes(kind, get_path(shapes, path).shape,
                                           tuple(get_path(axes, path)), n_lead, n_in))
    return axes


def attach(module: nnx.Module, cfg, kind: str, shapes, embedding: bool = False) -> None:
    """Put a :class:`QuantLinear` in place of every projection parameter of a decoder
    ``module`` (abstract, under ``nnx.eval_shape``), a :class:`QuantExperts` in place of a
    mixture of experts' expert weights, and with ``embedding`` a :class:`QuantEmbedding` in
    place of an untied input embedding, so ``nnx.merge`` takes a :func:`quantize_tree` tree."""
    if quantizes_embedding(cfg, shapes, embedding):
        module.embed = QuantEmbedding(kind, jax.eval_shape(lambda w: quantize_embedding(kind, w),
                                                           shapes["embed"]))
    for name, (path, n_lead, n_in) in weights(cfg, shapes).items():
        owner = module
        for k in path[:-1]:
            owner = getattr(owner, k)  # an nnx.Dict (the shared expert) too
        shape = get_path(shapes, path).shape
        leaves = jax.eval_shape(lambda w: quantize(kind, w, n_lead - 1, n_in),
                                jax.ShapeDtypeStruct(shape[1:], jnp.float32))
        leaves = {k: jax.ShapeDtypeStruct((shape[0],) + v.shape, v.dtype)
                  for k, v in leaves.items()}
        _, i_s, o_s = _split(shape, n_lead, n_in)
        setattr(owner, path[-1], QuantLinear(kind, leaves, i_s, o_s) if n_lead == 1 else
                QuantExperts(kind, leaves, math.prod(i_s), math.prod(o_s)))
