"""A QLoRA base quantised as it is read (``hf.load_hf_quantized``, ``state.init_base``): bit
for bit ``quant.quantize_tree`` of the whole float tree, for dense, fused-qkv (GPT-2) and
mixture-of-experts checkpoints (experts, shared expert), with a quantised input embedding and
into an 8-device mesh; a LoRA run's setup from ``model.hf_path`` never builds the float base;
and its peak host memory is below that of loading the float tree whole (slow:
experiments/qlora/load_memory.py in subprocesses)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from dpo_jax import config as config_lib
from dpo_jax import lora as lora_lib
from dpo_jax import sharding as shard_lib
from dpo_jax import state as state_lib
from dpo_jax.models import hf, preset, quant
from dpo_jax.models.hf_config import model_config_to_hf
from tests import helpers, runs

MOE = dict(n_kv_head=2, rope_scaling=None, family="mixtral", n_experts=4, n_experts_per_tok=2,
           moe_d_ff=32)
QWEN_MOE = dict(n_kv_head=2, rope_scaling=None, family="qwen2_moe", n_experts=4,
                n_experts_per_tok=2, moe_d_ff=32, moe_renormalize=False, shared_expert_d_ff=64,
                qkv_bias=True)


def _checkpoint(path: pathlib.Path, cfg, seed: int = 0) -> dict:
    """A random checkpoint of ``cfg`` written as HF safetensors in ``path``; its parameters."""
    model = lora_lib.LoraModel(cfg, lora_lib.LoraConfig(rank=2))
    params = jax.tree.map(lambda x: x * 4 if x.ndim >= 3 else x,
                          helpers.init_params(model, seed))
    path.mkdir(parents=True, exist_ok=True)
    save_file(hf.hf_tensors(cfg, params), str(path / "model.safetensors"))
    return params


def _assert_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                         strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, p
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))


@pytest.mark.parametrize("kind,name,over,dtype,embedding", [
    pytest.param("nf4", "tiny-llama", {}, "bfloat16", False, marks=pytest.mark.slow),
    ("int8", "tiny-gpt2", {}, "float32", False),  # fused qkv (Conv1D layout)
    pytest.param("nf4", "tiny-neox", {}, "bfloat16", True,  # fused qkv, untied embedding
                 marks=pytest.mark.slow),
    ("int8", "tiny-neox", {}, "float32", True),
    ("nf4", "tiny-llama", MOE, "float32", False),  # experts [layers, expert, ...]
    pytest.param("int8", "tiny-llama", QWEN_MOE, "bfloat16", False,  # + the shared expert
                 marks=pytest.mark.slow)])
def test_quantised_while_read_is_bit_identical_to_quantising_the_float_tree(
        tmp_path, kind, name, over, dtype, embedding):
    cfg = preset(name, param_dtype=dtype, **over)
    _checkpoint(tmp_path, cfg)
    got = hf.load_hf_quantized(str(tmp_path), cfg, kind, embedding=embedding)
    want = jax.jit(lambda p: quant.quantize_tree(cfg, kind, p, embedding))(
        hf.load_hf_params(str(tmp_path), cfg))
    _assert_identical(got, want)
    assert isinstance(got["layers"]["attn"]["o"], dict)
    if cfg.n_experts:
        assert got["layers"]["mlp"]["up"]["codes"].shape[:2] == (cfg.n_layer, cfg.n_experts)
        assert not isinstance(got["layers"]["mlp"]["router"], dict)
    assert isinstance(got["embed"], dict) == embedding


def test_quantised_while_read_into_a_mesh(tmp_path):
    """Into the quantised base's shardings on 2 x 2 x 2 (experts over fsdp): each leaf in its
    sharding, the values those of the whole-tree quantisation."""
    cfg = preset("tiny-llama", **MOE)
    _checkpoint(tmp_path, cfg)
    model = lora_lib.LoraModel(cfg, lora_lib.LoraConfig(rank=2, base_quant="nf4"))
    mesh = helpers.mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sh = shard_lib.tree_shardings(model.abstract_base(), model.base_axes(), mesh,
                                  shard_lib.DEFAULT_RULES)
    got = hf.load_hf_quantized(str(tmp_path), cfg, "nf4", sh)
    for a, s in zip(jax.tree.leaves(got), jax.tree.leaves(sh), strict=True):
        assert a.sharding == s
    assert got["layers"]["mlp"]["up"]["codes"].sharding.spec[1] == "fsdp"
    want = jax.jit(model.quantize_base)(hf.load_hf_params(str(tmp_path), cfg))
    _assert_identical(got, want)


def test_lora_setup_from_hf_path_never_builds_the_float_base(tmp_path, monkeypatch):
    """A QLoRA DPO run's setup (``model.hf_path``, bfloat16 base, mesh 2 x 2 x 2) reads the base
    through load_hf_quantized (load_hf_params would build the float tree: it is made to fail)
    and holds the whole-tree quantisation in the base's shardings; the unquantised LoRA base
    still comes from load_hf_params."""
    cfg = preset("tiny-llama")
    _checkpoint(tmp_path / "hf", cfg)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(model_config_to_hf(cfg)))
    config = runs.dpo_config(steps=2)
    config.model.update(hf_path=str(tmp_path / "hf"), param_dtype="bfloat16")
    config.model.lora.update(rank=2, base_quant="nf4")
    config.mesh.shape.update({"data": 2, "fsdp": 2, "tensor": 2})
    rc = config_lib.read_config(config)
    model = lora_lib.LoraModel(rc.model, rc.lora)
    float_base = hf.load_hf_params(str(tmp_path / "hf"), rc.model)
    want = jax.jit(model.quantize_base)(float_base)

    def refuse(*a, **k):
        raise AssertionError("the float base was loaded whole")

    monkeypatch.setattr(hf, "load_hf_params", refuse)
    setup = state_lib.setup(rc, model, reference=True)
    got = setup.frozen.lora_base
    _assert_identical(got, want)
    sh = shard_lib.tree_shardings(model.abstract_base(), model.base_axes(), setup.mesh,
                                  rc.mesh_rules)
    for a, s in zip(jax.tree.leaves(got), jax.tree.leaves(sh), strict=True):
        assert a.sharding == s
    monkeypatch.undo()
    plain = lora_lib.LoraModel(rc.model, lora_lib.LoraConfig(rank=2))
    one = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                       plain.abstract_params())
    _assert_identical(state_lib.init_base(plain, one, rc.param_sources), float_base)


@pytest.mark.slow  # two subprocesses, each importing jax and reading a 160 MB checkpoint
def test_peak_host_memory_is_below_loading_the_float_tree(tmp_path):
    """experiments/qlora/load_memory.py on a random Llama-shaped float32 checkpoint (about
    160 MB): quantising while reading (NF4) peaks, in anonymous resident memory, at least 40%
    of the float checkpoint's size below loading the float tree whole and then quantising
    it."""
    path = pathlib.Path(__file__).parents[1] / "experiments" / "qlora" / "load_memory.py"
    spec = importlib.util.spec_from_file_location("load_memory", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ckpt = script.write_random_checkpoint(str(tmp_path / "ckpt"), d_model=512, n_layer=8,
                                          d_ff=2048, vocab=8192)
    size_mb = sum(f.stat().st_size for f in (tmp_path / "ckpt").glob("*.safetensors")) / 2 ** 20
    whole = script.peak_rss(ckpt, "nf4", "whole")
    layers = script.peak_rss(ckpt, "nf4", "layers")
    assert whole["base_mb"] == layers["base_mb"]
    assert whole["anon_peak_mb"] - layers["anon_peak_mb"] > 0.4 * size_mb, (whole, layers)
