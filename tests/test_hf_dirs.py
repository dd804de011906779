"""Bad model directories (issue 28 item 7): each is refused with an error naming the file and
the field or tensor, before anything is written to the workdir. Tiny directories built here."""

import json
import os

import jax
import pytest

from dpo_jax.config import base_config
from dpo_jax.models import Model, preset, save_hf
from dpo_jax.models.hf_dir import check_hf_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture
def good(tmp_path):
    """A whole tiny Llama directory (config.json, model.safetensors, tokenizer of 400 ids) whose
    embedding has 512 rows (a padded embedding: legitimate)."""
    from dpo_jax.data.testing import gpt2_style_tokenizer

    cfg = preset("tiny-llama", vocab_size=512)
    path = tmp_path / "model"
    save_hf(str(path), cfg, Model(cfg).init(jax.random.key(0)), tokenizer=gpt2_style_tokenizer())
    return path, cfg


def test_good_directory_passes(good):
    path, cfg = good
    assert check_hf_dir(str(path)).vocab_size == 512


def test_gguf_only(tmp_path):
    (tmp_path / "m.Q4_1.gguf").write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(FileNotFoundError, match=r"config.json: absent.*GGUF file\(s\) \['m\.Q4_1\.gguf'\]"):
        check_hf_dir(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"model.hf_path=.*m\.Q4_1\.gguf' is a GGUF file"):
        check_hf_dir(str(tmp_path / "m.Q4_1.gguf"))


def _edit_config(path, change: dict) -> None:
    """``path/config.json`` with the fields of ``change`` set (a None value removes one)."""
    c = {**json.loads((path / "config.json").read_text()), **change}
    (path / "config.json").write_text(json.dumps(
        {k: v for k, v in c.items() if k not in change or change[k] is not None}))


def test_tokenizer_larger_than_embedding(good, tmp_path):
    from dpo_jax.data.testing import gpt2_style_tokenizer

    path, cfg = good
    _edit_config(path, {"vocab_size": 300})
    # the config now disagrees with the embedding too: the tokenizer check names the tokenizer
    # when the weights agree, so check it on its own first
    from dpo_jax.models.hf_dir import check_tokenizer

    small = preset("tiny-llama", vocab_size=300)
    with pytest.raises(ValueError, match=r"tokenizer.json: the tokenizer has 400 token ids but "
                       r".*config.json field 'vocab_size' = 300"):
        check_tokenizer(str(path), small, str(path / "config.json"))
    # a whole directory whose embedding (300 rows) is smaller than its tokenizer (400 ids)
    other = tmp_path / "small"
    save_hf(str(other), small, Model(small).init(jax.random.key(0)),
            tokenizer=gpt2_style_tokenizer())
    with pytest.raises(ValueError, match=r"tokenizer.json: the tokenizer has 400 token ids"):
        check_hf_dir(str(other))


def test_config_and_embedding_disagree(good):
    path, _ = good
    _edit_config(path, {"vocab_size": 1024})
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.embed_tokens.weight' "
                       r"has shape \(512, .*config.json implies \(1024,"):
        check_hf_dir(str(path))


def test_missing_safetensors(good):
    path, _ = good
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors nor model.safetensors.index"):
        check_hf_dir(str(path))


def test_truncated_safetensors(good):
    path, _ = good
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"model.safetensors: not a whole safetensors file"):
        check_hf_dir(str(path))


def test_index_names_a_missing_shard(good):
    from safetensors.numpy import load_file, save_file

    path, _ = good
    tensors = load_file(str(path / "model.safetensors"))
    os.remove(path / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(path / "model-00001-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" if i < half
                  else "model-00002-of-00002.safetensors" for i, k in enumerate(names)}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match=r"model.safetensors.index.json: field 'weight_map' "
                       r"puts .* in shard 'model-00002-of-00002.safetensors', which is not in"):
        check_hf_dir(str(path))


@pytest.mark.parametrize("change,match", [
    ({"model_type": "deepseek_v3"}, r"config.json: field 'model_type' = 'deepseek_v3' is not a "
                                     r"supported family"),
    ({"model_type": None, "architectures": ["DeepseekV3ForCausalLM"]},
     r"config.json: field 'model_type' is absent"),
])
def test_unsupported_family(good, change, match):
    path, _ = good
    _edit_config(path, change)
    with pytest.raises(ValueError, match=match):
        check_hf_dir(str(path))


def test_invalid_json(good):
    path, _ = good
    (path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(line 1"):
        check_hf_dir(str(path))


def test_nothing_written_before_the_error(good, tmp_path):
    """A run on a bad directory fails before its workdir exists."""
    from dpo_jax.train import train_and_evaluate

    path, _ = good
    os.remove(path / "model.safetensors")
    c = base_config()
    c.model.hf_path = str(path)
    workdir = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        train_and_evaluate(c, str(workdir))
    assert not workdir.exists()
    c.model.hf_path = str(tmp_path / "nowhere" / "model")
    with pytest.raises(FileNotFoundError, match=r"model.hf_path=.*nowhere/model': no such"):
        train_and_evaluate(c, str(workdir))
    assert not workdir.exists()


def _tokenizer_json(path, model_vocab, added=()):
    path.mkdir(exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(
        {"model": {"vocab": model_vocab}, "added_tokens": [{"id": i} for i in added]}))
    return path


def test_tokenizer_size_is_the_largest_id_plus_one(tmp_path):
    """Hand-written tokenizer files: a BPE vocabulary with a gap in its ids and an added token
    far above it (451 ids, though 4 entries), a Unigram list of 3 pieces (ids 0..2: 3), a
    vocab.json with added_tokens.json (ids up to 9: 10)."""
    from dpo_jax.models.hf_dir import tokenizer_size

    bpe = _tokenizer_json(tmp_path / "bpe", {"a": 0, "b": 1, "c": 7}, added=[450])
    assert tokenizer_size(str(bpe)) == (str(bpe / "tokenizer.json"), 451)
    uni = _tokenizer_json(tmp_path / "uni", [["<unk>", 0.0], ["a", -1.0], ["b", -2.0]])
    assert tokenizer_size(str(uni))[1] == 3
    old = tmp_path / "old"
    old.mkdir()
    (old / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (old / "added_tokens.json").write_text(json.dumps({"<x>": 9}))
    assert tokenizer_size(str(old)) == (str(old / "vocab.json"), 10)


def test_tokenizer_at_the_embedding_size_passes_one_more_is_refused(tmp_path):
    from dpo_jax.models.hf_dir import check_tokenizer

    tok = _tokenizer_json(tmp_path / "t", {"a": 0, "b": 1}, added=[399])  # 400 ids
    check_tokenizer(str(tok), preset("tiny-llama", vocab_size=400), "config.json")
    with pytest.raises(ValueError, match=r"400 token ids but config.json field 'vocab_size' = "
                       r"399 .*ids 399..399 have no embedding"):
        check_tokenizer(str(tok), preset("tiny-llama", vocab_size=399), "config.json")


def test_data_tokenizer_is_checked_not_the_model_directorys(good, tmp_path):
    """`data.tokenizer` (another directory) is the tokenizer checked against the embedding."""
    path, _ = good  # its own tokenizer (400 ids) fits the 512 rows
    big = _tokenizer_json(tmp_path / "big", {"a": 0}, added=[600])
    assert check_hf_dir(str(path)).vocab_size == 512
    with pytest.raises(ValueError, match=r"big/tokenizer.json: the tokenizer has 601 token ids"):
        check_hf_dir(str(path), tokenizer=str(big))


def test_ref_hf_path_is_checked_before_the_workdir_is_written(good, tmp_path):
    from dpo_jax.workdir import check_model_dirs

    path, _ = good
    c = base_config()
    c.model.hf_path = str(path)
    c.model.ref_hf_path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"model.ref_hf_path=.*nowhere': no such"):
        check_model_dirs(c)
