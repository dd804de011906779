"""Config files: variants apply in order, unknown variants are errors, CLI-typed fields exist."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_apply_in_order_and_typos_fail():
    ppo = _load("ppo_synthetic")
    c = ppo.get_config("gt,quick")
    assert (c.ppo.reward, c.train.steps, c.train.eval_every, c.train.checkpoint_every) == (
        "synthetic", 20, 20, 20)
    assert _load("default").get_config("quick").train.steps == 60
    with pytest.raises(ValueError, match="unknown variant 'qiuck'.*known: quick"):
        _load("default").get_config("qiuck")


def test_optional_fields_are_typed_for_command_line_overrides():
    c = _load("default").get_config("")
    assert c.loss.label_smoothing is None and c.model.overrides.n_layer is None
    c.loss.label_smoothing = 0.1  # typed placeholders accept their type
    c.model.overrides.n_layer = 4
    with pytest.raises(TypeError):
        c.model.overrides.n_layer = "four"
