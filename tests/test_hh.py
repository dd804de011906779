"""configs/hh.py (DPO on HH dialogues with a chat model) end to end, export back to transformers.

Fast: the config's shape (hh source with ``data.hh_chat``, held-out split by prompt, stored
reference, prefix sharing, reward model as the judge of samples, ``experiments/hh/run.py``'s
report) on a tiny random Llama saved by ``transformers`` with a ChatML tokenizer, and its
export: ``transformers`` loads it with the chat template and a generation config that stops at
the turn end, and its greedy generations equal dpo_jax's sampler's on held-out prompts.
Slow (``--run-slow``, and SmolLM2-135M-Instruct under ``$DPO_JAX_MODELS``, written by
``../shared/models/smollm2.sh``): the same on the real model and the real HH pairs.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.config import data_block
from dpo_jax.data.prompts import stop_ids
from dpo_jax.data.testing import chatml_tokenizer, find_shared_data
from dpo_jax.export import export_run, write_generation_eos
from dpo_jax.models import Model, model_config_from
from dpo_jax.models.local import SMOLLM2, find_local_model
from dpo_jax.sampling import SamplingConfig, generate
from tests import helpers, runs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = ("what is the capital of France Paris movie great loved terrible boring hello how are "
         "you today fine thank very much friend late help").split()


hh_config = helpers.load_module("configs/hh.py", "configs_hh")
hh_run = helpers.load_module("experiments/hh/run.py", "experiments_hh_run")
hh_displacement = helpers.load_module("experiments/hh/displacement.py",
                                      "experiments_hh_displacement")


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


def write_hh(path: pathlib.Path, n: int = 48, seed: int = 0) -> str:
    """HH-format rows (``chosen`` / ``rejected`` full dialogues, one to three Human turns, a
    shared prompt), gzipped jsonl like the real file."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        turns = ""
        for t in range(int(rng.integers(1, 4))):
            turns += f"\n\nHuman: {_sentence(rng, 4)} {i}?"
            if t < 2 and rng.random() < 0.5:
                turns += f"\n\nAssistant: {_sentence(rng, 3)}."
                continue
            break
        if turns.endswith("."):
            turns += f"\n\nHuman: {_sentence(rng, 2)}?"
        prompt = turns + "\n\nAssistant:"
        rows.append({"chosen": prompt + " " + _sentence(rng, 5),
                     "rejected": prompt + " " + _sentence(rng, 6)})
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer random Llama (GQA, tied embeddings) saved by transformers with a ChatML
    tokenizer whose EOS '<|im_end|>' closes the assistant turn, as SmolLM2's does."""
    tok = chatml_tokenizer()
    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def tiny_hh_config(model_dir: str, data_path: str, variants: str = "smoke"):
    """``configs/hh.py`` with ``variants``, on the tiny model and HH-format file."""
    c = hh_config.get_config(variants)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    c.model.hf_path = model_dir
    c.data.path = data_path
    c.data.eval_size = 8
    c.data.buckets = "64,128"
    c.eval.update(pad_id=tok.pad_token_id, max_new_tokens=8)
    c.train.async_checkpointing = False
    return c


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tmp_path_factory):
    """The experiment's two stages on the tiny model: reward model, then DPO judged by it."""
    root = tmp_path_factory.mktemp("hh")
    data = write_hh(root / "hh-test.jsonl.gz")
    reward = runs.run(tiny_hh_config(tiny_llama, data, "reward,smoke"), root / "reward")
    dpo_cfg = tiny_hh_config(tiny_llama, data)
    dpo_cfg.eval.judge = str(root / "reward")
    dpo = runs.run(dpo_cfg, root / "dpo")
    return root, dpo_cfg, reward, dpo


def test_hh_config_runs_end_to_end_and_reports(tiny_run):
    """The config's shape on a tiny Llama: chat-rendered HH pairs held out by prompt, TRL's
    optimizer defaults (noted in the summary), step-1 metrics of a policy equal to its
    reference are exact zeros (TRL's convention), samples and a judged win rate, and the
    experiment script's report of it."""
    root, cfg, reward, dpo = tiny_run
    holdout = dpo["data"]["eval"]["split"]["holdout"]
    assert holdout == dpo["data"]["train"]["split"]["holdout"]
    assert holdout["eval_pairs"] >= 8 and dpo["data"]["eval"]["eval_prompts_in_train"] == 0
    assert holdout["note"].startswith(f"eval holds out {holdout['eval_prompts']} of ")
    assert any("TRL DPOConfig" in n for n in dpo["config_notes"])
    saved = json.loads((root / "dpo" / "config.json").read_text())
    assert saved["optim"] | {"defaults": "auto"} == saved["optim"]
    assert (saved["optim"]["lr"], saved["optim"]["schedule"], saved["optim"]["warmup_steps"],
            saved["optim"]["max_grad_norm"]) == (1e-6, "linear", 0, 1.0)
    first = dpo["first_train"]
    assert (first["rewards/chosen"], first["rewards/rejected"], first["rewards/margins"],
            first["rewards/accuracies"]) == (0.0, 0.0, 0.0, 0.0)
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-6)
    final = dpo["final_eval"]
    assert 0.0 <= final["win_rate"] <= 1.0 and final["win_rate_se"] >= 0.0
    assert 0.0 <= reward["final_eval"]["accuracy"] <= 1.0  # the judge was evaluated

    out = hh_run.report(str(root))
    assert [h["step"] for h in out["held_out"]] == [3]
    assert out["win_rate"]["win_rate"] == final["win_rate"]
    assert out["win_rate"]["se"] == final["win_rate_se"]
    assert [t["step"] for t in out["train"]] == [1, 2, 3]
    assert out["train"][0]["logps/chosen"] == first["logps/chosen"]
    assert out["samples"] and all(s["before"] is not None for s in out["samples"])
    assert (root / "report.md").read_text().startswith("config: ")
    # the chat template reached the data: every sampled prompt is a rendered conversation
    samples = [json.loads(x) for x in (root / "dpo" / "samples.jsonl").read_text().splitlines()]
    assert {s["model"] for s in samples} == {"reference", "policy"}


def test_displacement_variants_differ_only_by_the_filter():
    """``displacement`` turns diagnostics on at LD_LR for LD_STEPS, evaluating every
    LD_EVAL_EVERY steps without samples; ``ches_filter`` adds the filter and nothing else;
    ``ches_random`` the same filter with random scores."""
    plain = hh_config.get_config("displacement").to_dict()
    filtered = hh_config.get_config("displacement,ches_filter").to_dict()
    control = hh_config.get_config("displacement,ches_random").to_dict()
    assert control["data"].pop("ches_filter") == {"mode": "drop", "score": "random",
                                                  "quantile": 0.5, "weight": 0.1, "seed": 0}
    assert plain["train"]["diagnostics"] and plain["optim"]["lr"] == hh_config.LD_LR
    assert (plain["train"]["steps"], plain["train"]["eval_every"]) == (
        hh_config.LD_STEPS, hh_config.LD_EVAL_EVERY)
    assert plain["data"]["ches_filter"]["mode"] == "" and plain["eval"]["sample_every"] == 0
    assert filtered["data"].pop("ches_filter") == {"mode": "drop", "score": "ln_ches",
                                                   "quantile": 0.5, "weight": 0.1, "seed": 0}
    plain["data"].pop("ches_filter")
    assert filtered == plain == control


@pytest.mark.slow
def test_displacement_runs_with_and_without_the_ches_filter(tiny_llama, tmp_path):
    """Issue 34's experiment shape (``configs/hh.py:displacement[,ches_filter]``,
    ``experiments/hh/displacement.py``) on the tiny Llama: diagnostics with stored reference
    log-probs and prefix-shared rows, the filter keeping half the train pairs (its scores
    cached), equal steps, the comparison report and the inspect report's decoded text."""
    from dpo_jax import inspect as inspect_lib

    data = write_hh(tmp_path / "hh-test.jsonl.gz")
    out = {}
    for stage, variants in (("dpo", "displacement,smoke"),
                            ("dpo_ches", "displacement,ches_filter,smoke"),
                            ("dpo_random", "displacement,ches_random,smoke")):
        cfg = tiny_hh_config(tiny_llama, data, variants)
        assert cfg.train.diagnostics and cfg.optim.lr == hh_config.LD_LR
        assert cfg.eval.sample_every == 0 and cfg.data.prefix_sharing
        out[stage] = runs.run(cfg, tmp_path / stage)
    plain, filtered = out["dpo"], out["dpo_ches"]
    f = filtered["data"]["train"]["ches_filter"]
    n = plain["data"]["train"]["num_pairs"]
    assert f["pairs_before"] == n and filtered["data"]["train"]["num_pairs"] == f["pairs_after"]
    assert f["pairs_after"] == n - f["flagged"] and n // 2 - 1 <= f["flagged"] <= n // 2
    assert os.path.dirname(f["path"]) == str(tmp_path / "dpo_ches" / "ches_scores")
    assert "ches_filter" not in plain["data"]["train"]
    for summary in (plain, filtered):
        assert summary["steps"] == 3
        for key in ("logps_delta/chosen", "displacement/chosen_fell", "ches/q50"):
            assert key in summary["final_eval"], key
    r = out["dpo_random"]["data"]["train"]["ches_filter"]
    assert (r["score"], r["flagged"], r["pairs_after"]) == ("random", f["flagged"],
                                                            f["pairs_after"])
    assert r["ln_ches_mean_after"] >= f["score_mean_after"]  # CHES kept the lowest half
    rep = hh_displacement.compare(str(tmp_path))
    assert rep["chosen_delta_final"] == {
        s: out[s]["final_eval"]["logps_delta/chosen"] for s in out}
    assert (tmp_path / "chosen_delta.png").exists() and "dpo_ches" in (
        tmp_path / "report.md").read_text()
    assert "ln_ches_mean_after" in (tmp_path / "report.md").read_text()  # the control's line
    assert hh_displacement.compare(str(tmp_path), ("dpo",))["chosen_delta_final"] == {
        "dpo": plain["final_eval"]["logps_delta/chosen"]}
    ins = inspect_lib.inspect_run(str(tmp_path / "dpo_ches"), top=2)
    assert all("<|im_start|>" in r["text"]["prompt"] or r["text"]["prompt"]
               for r in ins["top_pairs"])


def _held_out_prompts(cfg, n):
    from dpo_jax.data.prompts import load_prompts

    rc_data = cfg.data
    rc_data.tokenizer = cfg.model.hf_path
    return load_prompts("eval", prompt_file="", eval_prompt_file="", max_prompts=n,
                        data_cfg=rc_data)[:n]


def assert_greedy_matches_transformers(workdir, cfg, out_dir, n_prompts: int, new_tokens: int):
    """Export ``workdir`` to ``out_dir``; transformers loads it with the chat template and a
    generation config whose EOS ids include the turn end, and its greedy generations of
    ``n_prompts`` held-out prompts equal dpo_jax's sampler's (temperature 0) token for token."""
    export_run(str(workdir), str(out_dir))
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    src_tok = transformers.AutoTokenizer.from_pretrained(cfg.model.hf_path)
    assert tok.chat_template == src_tok.chat_template and tok.chat_template
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    eos = hf.generation_config.eos_token_id
    stops = stop_ids(data_block(cfg))  # the data's end tokens: what the sampler stops at
    assert set(stops) <= set(eos if isinstance(eos, list) else [eos])

    config = json.loads((pathlib.Path(workdir) / "config.json").read_text())
    model = Model(model_config_from(cfg.model))
    from dpo_jax.models import load_hf_params

    params = load_hf_params(str(out_dir), model.cfg)
    prompts = _held_out_prompts(cfg, n_prompts)
    assert len(prompts) == n_prompts
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0,
                              stop_ids=stops, pad_id=int(cfg.eval.pad_id))
    for prompt in prompts:
        ours = generate(model, params, jnp.asarray(prompt[None]), jnp.asarray([len(prompt)]),
                        jax.random.key(0), sampling)
        n = int(ours.lengths_B[0])
        ours_ids = np.asarray(ours.tokens_BT[0, len(prompt):len(prompt) + n]).tolist()
        with torch.no_grad():
            theirs = hf.generate(torch.tensor(prompt[None].astype(np.int64)), do_sample=False,
                                 max_new_tokens=new_tokens,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert theirs[0, len(prompt):].tolist()[:n] == ours_ids
        assert len(theirs[0]) - len(prompt) == n  # transformers stopped where we did
    assert config["model"]["hf_path"] == cfg.model.hf_path


def test_export_loads_in_transformers_and_greedy_generations_match(tiny_run, tmp_path):
    root, cfg, _, _ = tiny_run
    assert_greedy_matches_transformers(root / "dpo", cfg, tmp_path / "export", n_prompts=4,
                                       new_tokens=8)


def test_hh_chat_turns_become_messages(tmp_path):
    """data.hh_chat: each Human / Assistant turn a user / assistant message (stripped), the
    final empty Assistant turn left to the template's generation prompt; responses stripped;
    an empty response is a bad row."""
    from dpo_jax.data.config import default_data_config
    from dpo_jax.data.errors import DataError
    from dpo_jax.data.sources import parse_hh

    cfg = default_data_config()
    cfg.hh_chat = True
    prompt = "\n\nHuman: hi there \n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant:"
    pair = parse_hh({"chosen": prompt + " Sure: knock knock.", "rejected": prompt + " No."},
                    "f", 3, cfg)
    assert pair.prompt == [{"role": "user", "content": "hi there"},
                           {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "a joke?"}]
    assert (pair.chosen, pair.rejected) == ("Sure: knock knock.", "No.")
    with pytest.raises(DataError, match="row 3.*'rejected'.*empty assistant response"):
        parse_hh({"chosen": prompt + " x", "rejected": prompt + "  "}, "f", 3, cfg)
    cfg.hh_chat = False
    assert parse_hh({"chosen": prompt + " x", "rejected": prompt + " y"}, "f", 0, cfg).prompt \
        == prompt


def test_generation_config_gets_the_turn_end_it_lacks(tmp_path):
    """A source whose generation config stops only at EOS gets the chat turn end added (a
    checkpoint whose config names '<|endoftext|>' while its template ends turns with
    '<|im_end|>'); one that names them all is left byte for byte; none: written."""
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 5, "pad_token_id": 0}))
    gen = tmp_path / "generation_config.json"
    gen.write_text(json.dumps({"eos_token_id": 0, "do_sample": True}))
    assert write_generation_eos(str(tmp_path), [0, 2]) == [2]
    assert json.loads(gen.read_text()) == {"eos_token_id": [0, 2], "do_sample": True}
    before = gen.read_bytes()
    assert write_generation_eos(str(tmp_path), [2, 0]) == [] and gen.read_bytes() == before
    gen.unlink()
    assert write_generation_eos(str(tmp_path), [2]) == [2]
    assert json.loads(gen.read_text()) == {"bos_token_id": 5, "eos_token_id": 2,
                                           "pad_token_id": 0}


# ----------------------------------------------------------------------------- the real model

def _smollm2_or_skip() -> str:
    path = find_local_model(SMOLLM2)
    if path is None:
        pytest.skip(f"{SMOLLM2} not under $DPO_JAX_MODELS (bash ../shared/models/smollm2.sh)")
    if find_shared_data() is None or not (find_shared_data() / "hh_rlhf").is_dir():
        pytest.skip("no ../shared/data/hh_rlhf ($DPO_JAX_DATA)")
    return path


@pytest.mark.slow
def test_smollm2_hh_smoke_run_step1_ties_and_greedy_export(tmp_path):
    """configs/hh.py:smollm2,smoke on the real model and pairs (DPO only, no judge): step 1,
    where policy and reference are the same parameters, gives exact zero rewards and accuracy
    0 (TRL's convention), and the export's greedy generations in transformers equal dpo_jax's
    on held-out prompts."""
    _smollm2_or_skip()
    cfg = hh_config.get_config("smollm2,smoke")
    # as a user runs it: its own process on one CPU device; inside this test process (8 fake
    # devices, XLA backend optimisation off) the run grew past 24 GB and was killed
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "XLA_FLAGS": " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                 if "device_count" not in f and "optimization_level" not in f
                                 and "fusion_emitters" not in f)}
    subprocess.run([sys.executable, "-m", "dpo_jax.main",
                    f"--config={REPO}/configs/hh.py:smollm2,smoke",
                    f"--workdir={tmp_path / 'dpo'}", "--config.eval.sample_every=0",
                    "--config.train.async_checkpointing=False"], check=True, env=env, cwd=REPO)
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    first = summary["first_train"]
    assert (first["rewards/chosen"], first["rewards/rejected"], first["rewards/margins"],
            first["rewards/accuracies"]) == (0.0, 0.0, 0.0, 0.0)
    assert_greedy_matches_transformers(tmp_path / "dpo", cfg, tmp_path / "export", n_prompts=2,
                                       new_tokens=24)
    assert os.path.isfile(tmp_path / "export" / "chat_template.jinja")
