"""The config is read once into one typed ``RunConfig``: the data block as a ``DataConfig``,
each task's own block by the reader it declares (``tasks.TASK_BLOCKS``), and what a data source
is (tokenised, file-backed, its end tokens) asked of its declaration (``SOURCE_SPECS``), never
of its name.

Expected values come from the schema itself (``default_data_config``, the blocks' defaults)
or from the values a test sets, never from the reader under test.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from dpo_jax import evaluation, tasks
from dpo_jax.config import base_config, data_block, read_config
from dpo_jax.data import config as data_config
from dpo_jax.data.config import (SOURCE_SPECS, DataConfig, SourceSpec, default_data_config,
                                 read_data)
from dpo_jax.data.prompts import stop_ids
from dpo_jax.eval_config import EvalConfig
from dpo_jax.online_config import OnlineConfig, default_online_config
from dpo_jax.ppo.config import PPOSettings, default_ppo_config
from dpo_jax.sft_config import SFTConfig, add_sft_config
from tests import runs

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the data block


def test_the_typed_data_block_has_every_schema_field_with_its_value():
    schema = default_data_config().to_dict()
    cfg = read_data(default_data_config())
    assert isinstance(cfg, DataConfig)
    assert sorted(f.name for f in dataclasses.fields(DataConfig)) == sorted(schema)
    for key, value in schema.items():
        if key == "synthetic":
            assert dataclasses.asdict(cfg.synthetic) == {
                k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        elif key == "sources":
            assert cfg.sources == () and value == []
        elif key == "ches_filter":
            assert dataclasses.asdict(cfg.ches_filter) == value
        else:
            assert getattr(cfg, key) == value, key
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_length = 7


def test_an_older_data_block_takes_the_defaults_and_an_unknown_field_is_named():
    old = {k: v for k, v in default_data_config().to_dict().items()
           if k not in ("format", "prefix_sharing", "weight_field", "shuffle")}
    old["synthetic"] = {"num_train": 64}  # a partial synthetic block
    cfg = read_data(old)
    assert (cfg.format, cfg.prefix_sharing, cfg.weight_field, cfg.shuffle) == (
        "pairs", False, "", True)
    assert cfg.synthetic.num_train == 64 and cfg.synthetic.num_eval == 512
    with pytest.raises(ValueError, match=r"data\.tokeniser: not a field.*tokenizer"):
        read_data({"tokeniser": "gpt2"})
    with pytest.raises(ValueError, match=r"data\.synthetic\.vocab: not a field.*vocab_size"):
        read_data({"synthetic": {"vocab": 64}})


def test_a_bad_mixture_entry_is_named_when_the_block_is_read():
    block = default_data_config()
    block.tokenizer = "tok"
    block.sources = [{"source": "generic", "path": "a.jsonl"},
                     {"source": "generic", "path": "b.jsonl", "max_length": 64}]
    with pytest.raises(ValueError, match=r"data\.sources\[1\].*max_length.*not per-source"):
        read_data(block)
    block.sources = [{"source": "generic", "path": "a.jsonl", "weight": 2.0},
                     {"source": "hh", "name": "h"}]
    cfg = read_data(block)
    assert [(m.name, m.weight, m.cfg.source, m.cfg.sources) for m in cfg.sources] == [
        ("generic", 2.0, "generic", ()), ("h", 1.0, "hh", ())]
    assert cfg.mixed and not cfg.tokenised and cfg.source_names() == ["generic", "hh"]


# ----------------------------------------------------------------------------- source specs


def test_every_source_is_declared_and_only_tokenised_ones_need_no_tokenizer():
    assert set(SOURCE_SPECS) == {"synthetic", "generic", "hh", "shp", "tldr", "ultrafeedback",
                                 "se"}
    for name, spec in SOURCE_SPECS.items():
        block = {"source": name, "path": "x.jsonl"}
        if spec.tokenised:
            assert read_data(block).tokenised
        else:
            with pytest.raises(ValueError, match=f"data.tokenizer is required for source "
                                                 f"'{name}'"):
                read_data(block)


@pytest.fixture
def toy_source(monkeypatch):
    """A second tokenised, file-less source declared only in SOURCE_SPECS."""
    monkeypatch.setitem(SOURCE_SPECS, "toy", SourceSpec("toy", tokenised=True, files=False,
                                                        end_ids=(5, 6)))
    return "toy"


def test_modules_ask_the_declaration_not_the_name(toy_source):
    cfg = read_data({"source": toy_source})  # no tokenizer needed: it is tokenised
    assert cfg.tokenised and stop_ids(cfg) == (5, 6)  # its declared end tokens
    assert stop_ids(cfg, (9,)) == (9,)
    assert evaluation.token_decoder(cfg)([3, 4]) == "3 4"  # tokens shown as ids
    with pytest.raises(ValueError, match="weight_field.*the toy source has none"):
        read_data({"source": toy_source, "weight_field": "w"})
    mixed = {"source": "generic", "path": "a", "tokenizer": "t",
             "sources": [{"source": "generic", "path": "a"}, {"source": toy_source}]}
    with pytest.raises(ValueError, match=r"data\.sources\[1\].*toy source has no files to mix"):
        read_data(mixed)
    c = base_config()
    c.data.source = toy_source
    assert read_config(c).data.tokenised  # the run-level tokenizer check passes too


def test_no_module_compares_a_value_with_a_source_name():
    """'synthetic' appears in comparisons nowhere in the library: what the source is lives
    in its declaration (data/config.py) and the ground-truth rewards in ppo.rewards."""
    hits = []
    for path in (REPO / "dpo_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                    isinstance(x, ast.Constant) and x.value == "synthetic"
                    for x in [node.left, *node.comparators]):
                hits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert hits == []


def test_a_mixture_behind_the_default_source_resolves_its_tokenizer_from_the_model():
    """The kind: a text source without data.tokenizer takes model.hf_path, whether it is the
    single source or a mixture entry (the top-level source may stay 'synthetic')."""
    c = base_config()
    c.model.hf_path = "some/model"
    c.data.sources = [{"source": "generic", "path": "a.jsonl"}]
    got = data_block(c)
    assert got.tokenizer == "some/model" and not got.tokenised
    assert [m.cfg.tokenizer for m in got.sources] == ["some/model"]
    c.data.sources = []
    assert data_block(c).tokenizer == ""  # the synthetic task has no tokenizer to resolve


# ----------------------------------------------------------------------------- task blocks


def test_each_block_is_read_once_into_the_run_config():
    c = base_config()
    c.loss.beta = 0.25
    c.eval.update(sample_every=0, max_new_tokens=5)
    rc = read_config(c)
    assert rc.task_block is None and rc.loss.beta == 0.25 and rc.loss.names == ("sigmoid",)
    assert isinstance(rc.eval, EvalConfig) and rc.eval.sampling.max_new_tokens == 5
    assert isinstance(rc.data, DataConfig)

    sft = add_sft_config(base_config())
    sft.sft.objective, sft.sft.unlikelihood_alpha = "unlikelihood", 0.5
    block = read_config(sft).task_block
    assert isinstance(block, SFTConfig) and (block.objective, block.unlikelihood_alpha) == (
        "unlikelihood", 0.5)

    online = base_config()
    online.task, online.online = "online_dpo", default_online_config()
    online.online.update(samples_per_prompt=3, stop_ids=(4,))
    block = read_config(online).task_block
    assert isinstance(block, OnlineConfig) and block.samples_per_prompt == 3
    assert block.sampling.stop_ids == (4,)

    ppo = base_config()
    ppo.task, ppo.ppo = "ppo", default_ppo_config()
    ppo.ppo.update(reward="synthetic", epochs=2)
    block = read_config(ppo).task_block
    assert isinstance(block, PPOSettings) and block.update.epochs == 2
    assert block.reward == "synthetic"
    assert set(tasks.TASK_BLOCKS) <= set(tasks.TASKS)


@pytest.mark.parametrize("task, field, value, match", [
    ("online_dpo", "samples_per_prompt", 1, r"online\.samples_per_prompt=1"),
    ("online_dpo", "iterations", 3, r"online\.iterations=3.*divisor of train\.steps=4"),
    ("sft", "target", "prompt", r"sft\.target must be 'response' or 'text'"),
    ("sft", "source", "text", r"sft\.source must be 'preference' or 'tokens'"),
])
def test_a_bad_task_block_is_refused_before_the_workdir_is_written(tmp_path, task, field,
                                                                    value, match):
    c = runs.tiny(add_sft_config(base_config()) if task == "sft" else base_config())
    if task == "online_dpo":
        c.task, c.online = task, default_online_config()
    getattr(c, "sft" if task == "sft" else "online")[field] = value
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        tasks.get_task(task)(c, str(workdir))
    assert not workdir.exists()


def test_judge_names_are_the_declared_true_rewards_and_a_bad_one_names_its_field():
    data = read_data(default_data_config())
    with pytest.raises(ValueError, match=r"online\.reward='nope'.*\['synthetic'\]"):
        evaluation.build_judge("nope", data, None, (), (0,), field="online.reward")
    assert evaluation.build_judge("", data, None, (), (0,)) is None


# ----------------------------------------------------------------------------- layers


def test_the_config_layer_does_not_import_the_step():
    tree = ast.parse((REPO / "dpo_jax" / "config.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "dpo_jax.step" not in imported
    out = subprocess.run(
        [sys.executable, "-c", "import sys, dpo_jax.config; "
         "print('dpo_jax.step' in sys.modules, 'dpo_jax.evaluation' in sys.modules)"],
        capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """Every dpo_jax module ``path`` imports, function-local imports included."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        names = ([f"{n.module}.{a.name}" for a in n.names] + [n.module]
                 if isinstance(n, ast.ImportFrom) and n.module else
                 [a.name for a in n.names] if isinstance(n, ast.Import) else [])
        out |= {m for m in names if m in modules}
    return out


def test_the_config_layer_is_in_no_import_cycle():
    """No module that config.py reaches (function-local imports included) imports it back."""
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / "dpo_jax").rglob("*.py")}
    graph = {m: _imports(p, set(files)) - {m} for m, p in files.items()}
    for start in ("dpo_jax.config", "dpo_jax.data.config", "dpo_jax.tasks"):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        assert start not in seen, start


def test_config_json_keeps_the_keys_of_the_schema():
    """The blocks moved next to their readers; the ConfigDict a run writes is unchanged."""
    c = base_config().to_dict()
    assert c["eval"] == {"sample_every": 0, "sample_prompts": 16, "seed": 0,
                         "max_new_tokens": 32, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                         "stop_ids": (), "pad_id": 0, "judge": ""}
    assert add_sft_config(base_config()).sft.to_dict() == {
        "objective": "nll", "target": "response", "source": "preference", "train_path": "",
        "eval_path": "", "unlikelihood_alpha": 1.0}
    assert isinstance(base_config().data, ml_collections.ConfigDict)
    assert data_config.default_data_config().to_dict() == c["data"]
