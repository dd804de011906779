"""Config files: variants apply in order, unknown variants are errors, CLI-typed fields exist."""

import json
import os

import pytest

from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    return helpers.load_module(f"configs/{name}.py")


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


def _main_config(*args):
    """The config ``python -m dpo_jax.main ARGS`` would run, parsed by main's own flags in a
    fresh process (absl flags are process-global); nothing is trained."""
    import json
    import subprocess
    import sys
    code = ("import json, sys; from absl import flags; import dpo_jax.main as m; "
            "flags.FLAGS(sys.argv); print(json.dumps(m._CONFIG.value.to_dict()))")
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_field_overrides_work_with_and_without_config_flag():
    import json
    from dpo_jax.config import base_config
    plain = _main_config()
    assert plain == json.loads(json.dumps(base_config().to_dict()))  # the offline default
    over = _main_config("--config.loss.beta=0.5", "--config.train.batch_size=16",
                        "--config.data.max_length=128")
    assert (over["loss"]["beta"], over["train"]["batch_size"], over["data"]["max_length"]) == (
        0.5, 16, 128)
    assert {k: v for k, v in over.items() if k not in ("loss", "train", "data")} == {
        k: v for k, v in plain.items() if k not in ("loss", "train", "data")}
    quick = _main_config("--config=configs/default.py:quick", "--config.optim.lr=0.01")
    assert (quick["train"]["steps"], quick["optim"]["lr"]) == (60, 0.01)


@pytest.mark.parametrize("data", [
    {"source": "hh"},
    {"source": "generic", "path": "pairs.jsonl"},
    {"sources": [{"source": "hh", "path": "a.jsonl"}, {"source": "tldr", "path": "b.jsonl"}]},
])
def test_a_text_source_without_a_tokenizer_is_named_before_the_workdir_is_written(tmp_path,
                                                                                  data):
    from dpo_jax.config import _check_tokenizer, base_config, read_config
    from dpo_jax.train import train_and_evaluate
    c = base_config()
    for k, v in data.items():
        c.data[k] = v
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"needs a tokenizer.*data\.tokenizer.*model\.hf_path"):
        train_and_evaluate(c, str(workdir))
    assert not workdir.exists()
    c.data.tokenizer = "some/tokenizer"  # named: the check passes (loading is the pipeline's)
    assert read_config(c).data.tokenizer == "some/tokenizer"
    c.data.tokenizer, c.model.hf_path = "", "some/model"  # the model directory's tokenizer
    _check_tokenizer(c)  # passes (read_config would load the model's config.json)


def test_optimizer_defaults_follow_the_model_unless_the_config_sets_them(tmp_path):
    """optim fields left unset: TRL DPOConfig's values for an imported checkpoint, the offline
    default's otherwise (the same numbers as before the presets existed); a field the config or
    command line sets wins; config.json gets the resolved values; a preset chosen for the user is
    a note."""
    from dpo_jax.config import base_config, read_config, resolve_defaults
    from dpo_jax.optim import OptimConfig

    def optim(**fields):
        c = base_config()
        c.update_from_flattened_dict(fields)
        return read_config(c).optim, resolve_defaults(c)

    offline, (resolved, notes) = optim()
    assert offline == OptimConfig(name="adamw", lr=1e-3, schedule="constant", warmup_steps=20,
                                  b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                  max_grad_norm=10.0)
    assert notes == [] and resolved.optim.lr == 1e-3 and resolved.optim.warmup_steps == 20
    # an imported checkpoint: TRL DPOConfig / TrainingArguments (transformers 5: learning_rate
    # overridden to 1e-6 by DPOConfig, linear schedule, warmup 0, max_grad_norm 1.0, AdamW
    # betas 0.9/0.999, eps 1e-8, weight decay 0)
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}))
    hf = {"model.hf_path": str(tmp_path)}
    trl, (resolved, notes) = optim(**hf)
    assert (trl.name, trl.lr, trl.schedule, trl.warmup_steps, trl.max_grad_norm, trl.b1, trl.b2,
            trl.eps, trl.weight_decay) == ("adamw", 1e-6, "linear", 0, 1.0, 0.9, 0.999, 1e-8, 0.0)
    assert resolved.optim.to_dict() | {"defaults": "auto", "grad_accum": 1,
                                       "rms_decay": 0.99} == resolved.optim.to_dict()
    assert resolved.optim.lr == 1e-6 and len(notes) == 1 and "TRL DPOConfig" in notes[0]
    set_lr, (_, notes) = optim(**hf, **{"optim.lr": 5e-7, "optim.max_grad_norm": 10.0})
    assert (set_lr.lr, set_lr.max_grad_norm, set_lr.schedule) == (5e-7, 10.0, "linear")
    assert "lr=" not in notes[0] and "max_grad_norm=" not in notes[0]
    back, _ = optim(**hf, **{"optim.defaults": "offline"})
    assert back == offline
    with pytest.raises(ValueError, match="optim.defaults='trl'.*'hf', 'offline'"):
        optim(**{"optim.defaults": "trl"})
