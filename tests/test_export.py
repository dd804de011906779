"""dpo_jax.export keeps the source checkpoint's configuration: config.json field by field,
generation_config.json and the tokenizer's files (chat template) as they were."""

import json

import jax
import numpy as np
import pytest

from dpo_jax.checkpoint import Checkpointer
from dpo_jax.config import base_config
from dpo_jax.data.testing import gpt2_style_tokenizer
from dpo_jax.export import TOKENIZER_FILES, export_run, source_config, write_hf
from dpo_jax.models import load_hf_config, load_hf_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture
def source(tmp_path):
    """A tiny GPT-2 whose config.json differs from transformers' defaults (dropouts 0.0, a
    dtype, token ids), with a generation config and a tokenizer carrying a chat template."""
    tok = gpt2_style_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    src = tmp_path / "src"
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, layer_norm_epsilon=1e-6)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.generation_config = transformers.GenerationConfig(
        do_sample=True, top_p=0.9, temperature=0.7, eos_token_id=tok.eos_token_id,
        max_new_tokens=17)
    model.save_pretrained(src)
    tok.save_pretrained(src)
    return src


def _trained(src):
    """Parameters as after training: the source's, moved."""
    cfg = load_hf_config(str(src))
    params = load_hf_params(str(src), cfg)
    return cfg, jax.tree.map(lambda x: x + 0.01 * np.sign(np.asarray(x)), params)


def _json(path):
    return json.loads(path.read_text())


def test_export_writes_the_source_config_back_field_by_field(source, tmp_path):
    cfg, params = _trained(source)
    out = tmp_path / "out"
    write_hf(str(out), cfg, params, source=str(source), tokenizer=str(source))
    want, got = _json(source / "config.json"), _json(out / "config.json")
    assert set(got) == set(want)
    for key in want:
        assert got[key] == want[key], key
    assert got["resid_pdrop"] == got["embd_pdrop"] == got["attn_pdrop"] == 0.0
    assert _json(out / "generation_config.json") == _json(source / "generation_config.json")
    copied = [n for n in TOKENIZER_FILES if (source / n).exists()]
    assert "tokenizer_config.json" in copied or "chat_template.jinja" in copied
    for name in copied:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    # transformers reads it back as that configuration, with the moved weights
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.resid_pdrop == 0.0 and reloaded.config.layer_norm_epsilon == 1e-6
    assert reloaded.generation_config.top_p == 0.9
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
    np.testing.assert_allclose(reloaded.transformer.wte.weight.detach().numpy(),
                               np.asarray(params["embed"]), rtol=0, atol=0)


def test_source_config_takes_only_the_fields_training_changed(source):
    cfg = load_hf_config(str(source), max_len=32)  # as model.overrides.max_len = 32
    want = _json(source / "config.json")
    got = source_config(want, cfg, "bfloat16")
    changed = sorted(k for k in want if got[k] != want[k])
    dtype_keys = [k for k in ("torch_dtype", "dtype") if k in want]
    assert changed == sorted(["n_positions"] + dtype_keys)
    assert got["n_positions"] == 32 and all(got[k] == "bfloat16" for k in dtype_keys)


def test_export_run_from_a_run_directory(source, tmp_path):
    """The CLI path: the run's config.json names the source; its checkpoint holds the params."""
    cfg, params = _trained(source)
    c = base_config()
    c.model.hf_path = str(source)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(c.to_json())
    ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    ckpt.save(3, params, {"count": np.zeros((), np.int32)}, {"data": {}})
    ckpt.close()
    out = export_run(str(workdir), str(tmp_path / "out"))
    with open(f"{out}/config.json") as f:
        assert json.load(f) == _json(source / "config.json")
    assert (tmp_path / "out" / "tokenizer_config.json").read_bytes() == (
        source / "tokenizer_config.json").read_bytes()
