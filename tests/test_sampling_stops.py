"""The sampler stops where responses were trained to end: the stop set comes from the data's
tokenizer and chat template (several ids), and lengths, KL and judge scores read the completion
through its first stop token only. Tokenizers are built here (no hub): ChatML with EOS != the
turn end, ChatML with EOS == the turn end, Llama-3 with two end tokens, GPT-2 (EOS only)."""

import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpo_jax import evaluation
from dpo_jax.config import base_config
from dpo_jax.data import default_data_config
from dpo_jax.data.errors import BadRows
from dpo_jax.data.prompts import stop_ids
from dpo_jax.data.sources import RawPair
from dpo_jax.data.testing import chatml_tokenizer, gpt2_style_tokenizer, llama3_style_tokenizer
from dpo_jax.data.tokenize import PairTokenizer
from dpo_jax.online import default_online_config, read_online
from dpo_jax.ppo.config import default_ppo_config, read_ppo
from dpo_jax.sampling import SamplingConfig, completion_kl, generate
from tests import helpers

jax.config.update("jax_default_matmul_precision", "highest")

# family -> (builder, the end tokens by name: the template's turn end first, then EOS)
FAMILIES = {
    "chatml_base_eos": (lambda: chatml_tokenizer("<|endoftext|>"), ["<|im_end|>", "<|endoftext|>"]),
    "chatml": (chatml_tokenizer, ["<|im_end|>"]),
    "llama3": (llama3_style_tokenizer, ["<|eot_id|>", "<|end_of_text|>"]),
    "gpt2": (gpt2_style_tokenizer, ["<|endoftext|>"]),
}
QUESTION = "Is the sky blue?"


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    build, names = FAMILIES[request.param]
    tok = build()
    path = tmp_path_factory.mktemp(request.param)
    tok.save_pretrained(path)
    return request.param, tok, str(path), [tok.convert_tokens_to_ids(n) for n in names]


def _data_cfg(tok_dir):
    c = default_data_config()
    c.source, c.path, c.tokenizer = "generic", "unused.jsonl", tok_dir
    return c


def test_stop_ids_are_the_end_tokens_responses_end_with(family):
    """The default stop set is the tokenizer's turn end and EOS (looked up by name here), the
    same ids the pair tokenizer ends text and chat responses with; every config block that
    samples reads it; an explicit list overrides it; the synthetic task keeps 0."""
    name, tok, tok_dir, expected = family
    data = _data_cfg(tok_dir)
    assert stop_ids(data) == tuple(expected)
    if name == "chatml_base_eos":
        assert expected == [2, 0]  # turn end 2, EOS 0: the old default 0 missed the turn end
    enc = PairTokenizer(tok, data)
    pairs = [RawPair("Q: " + QUESTION + "\nA:", " Yes.", " No.")]
    if tok.chat_template:
        pairs.append(RawPair([{"role": "user", "content": QUESTION}], "Yes.", "No."))
    ends = {int(p[f][-1]) for p in enc(pairs, BadRows("error")) for f in ("chosen", "rejected")}
    assert ends == set(expected)  # each end token ends some response

    config = base_config()
    config.data = data
    config.train.eval_every = 2
    config.eval.sample_every = 4
    config.online, config.ppo = default_online_config(), default_ppo_config()
    assert evaluation.read_eval(config).sampling.stop_ids == tuple(expected)
    assert read_online(config).sampling.stop_ids == tuple(expected)
    assert read_ppo(config).sampling.stop_ids == tuple(expected)
    config.eval.stop_ids, config.online.stop_ids = (7, 9), (5,)
    assert evaluation.read_eval(config).sampling.stop_ids == (7, 9)
    assert read_online(config).sampling.stop_ids == (5,)
    assert stop_ids(default_data_config()) == (0,)


def scripted_params(model, params, prompt, script, big=30.0):
    """``params`` with an untied LM head solved (least squares, float64) so that the logits
    after ``prompt + script[:i]`` are ``big`` at ``script[i]`` and 0 elsewhere: a policy that,
    sampled greedily, writes ``script``."""
    seq = np.asarray(list(prompt) + list(script), np.int32)[None]
    T = seq.shape[1]
    h = np.asarray(model.hidden(params, jnp.asarray(seq), jnp.arange(T)[None],
                                jnp.ones((1, T), jnp.int32))[0], np.float64)
    H = h[len(prompt) - 1:T - 1]
    Y = np.zeros((len(script), model.cfg.vocab_size))
    Y[np.arange(len(script)), script] = big
    W, *_ = np.linalg.lstsq(H, Y, rcond=None)
    np.testing.assert_allclose(H @ W, Y, atol=1e-6)
    return dict(params, lm_head=jnp.asarray(W.T, jnp.float32))


@pytest.fixture(scope="module")
def model():
    m = helpers.tiny_model(vocab_size=512, tie_embeddings=False)
    return m, helpers.init_params(m)


def _answers(tok, tok_dir):
    """(prompt ids, chosen ids) of training pairs whose chosen answer is short: a chat pair
    (ends with the turn end) when the tokenizer has a template, and a text pair (ends with
    EOS), both tokenised by the pipeline's pair tokenizer."""
    enc = PairTokenizer(tok, _data_cfg(tok_dir))
    raw = [RawPair("Q: " + QUESTION + "\nA:", " ok", " No.")]
    if tok.chat_template:
        raw.append(RawPair([{"role": "user", "content": QUESTION}], "ok", "No."))
    return [(list(p["prompt"]), list(p["chosen"])) for p in enc(raw, BadRows("error"))]


def test_a_short_answer_stops_at_its_end_token(family, model):
    """A policy that answers 'ok' and its end token (then 'ok' again, forever) yields exactly
    the trained response under the data's stop set, by either end token of a two-end-token
    tokenizer; under the old fixed id 0 the ChatML policy runs to max_new_tokens."""
    name, tok, tok_dir, expected = family
    m, params = model
    N = 12
    cfg = SamplingConfig(max_new_tokens=N, temperature=0.0, stop_ids=stop_ids(_data_cfg(tok_dir)))
    finals = set()
    for prompt, chosen in _answers(tok, tok_dir):
        assert 2 <= len(chosen) <= 4 and chosen[-1] in expected
        finals.add(chosen[-1])
        policy = scripted_params(m, params, prompt, (chosen * N)[:N])
        s = generate(m, policy, np.asarray([prompt]), np.asarray([len(prompt)]),
                     jax.random.key(0), cfg)
        P = len(prompt)
        assert int(s.lengths_B[0]) == len(chosen) and bool(s.stopped_B[0])
        np.testing.assert_array_equal(np.asarray(s.tokens_BT)[0, P:P + len(chosen)], chosen)
        np.testing.assert_array_equal(np.asarray(s.completion_mask_BT)[0],
                                      np.r_[np.zeros(P), np.ones(len(chosen)),
                                            np.zeros(N - len(chosen))])
        old = generate(m, policy, np.asarray([prompt]), np.asarray([len(prompt)]),
                       jax.random.key(0), SamplingConfig(max_new_tokens=N, temperature=0.0,
                                                         stop_ids=(0,)))
        if 0 not in chosen:  # the old default stops only when the end token happens to be 0
            assert int(old.lengths_B[0]) == N and not bool(old.stopped_B[0])
    assert finals == set(expected)  # every end token stops a response


def test_lengths_and_kl_on_the_true_completion_match_numpy(model, tmp_path):
    """Sampled (temperature 1) from a policy that mostly answers 'ok<|im_end|>': each row's
    length, stop flag and summed log pi - log pi_ref equal float64 numpy on full forwards of
    the policy and the reference, over the generated tokens through the first stop token found
    by scanning the tokens (nothing after it)."""
    tok = chatml_tokenizer("<|endoftext|>")
    tok.save_pretrained(tmp_path)
    stops = stop_ids(_data_cfg(str(tmp_path)))
    m, params = model
    (prompt, _), (chat_prompt, chosen) = _answers(tok, str(tmp_path))
    N, B = 6, 8
    policy = scripted_params(m, params, chat_prompt, (chosen * N)[:N], big=7.0)
    ref = helpers.perturbed(policy, scale=0.05)
    prompts = [chat_prompt, prompt] * (B // 2)
    P = max(len(p) for p in prompts)
    ids = np.zeros((B, P), np.int32)
    lens = np.asarray([len(p) for p in prompts], np.int32)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    cfg = SamplingConfig(max_new_tokens=N, temperature=1.0, stop_ids=stops, pad_id=0)
    s = generate(m, policy, ids, lens, jax.random.key(3), cfg)
    kl_B = np.asarray(completion_kl(m, ref, s, jnp.asarray(lens)))

    toks = np.asarray(s.tokens_BT)
    T = toks.shape[1]
    pos, seg = np.broadcast_to(np.arange(T), (B, T)), np.ones((B, T), np.int32)
    lp = {}
    for key, prm in (("pi", policy), ("ref", ref)):
        logits = np.asarray(m.logits(prm, jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(seg)),
                            np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        # lp[b, t - 1] = log p(token t | tokens < t)
        lp[key] = (np.take_along_axis(logits[:, :-1], toks[:, 1:, None], -1)[..., 0]
                   - logz[:, :-1])
    stopped_rows = 0
    for b in range(B):
        n = lens[b]
        gen = toks[b, n:n + N]
        hits = np.flatnonzero(np.isin(gen, stops))
        k = int(hits[0]) + 1 if hits.size else N
        stopped_rows += bool(hits.size)
        assert int(s.lengths_B[b]) == k and bool(s.stopped_B[b]) == bool(hits.size)
        assert (toks[b, n + k:] == 0).all()  # pad after the stop
        want = sum(lp["pi"][b, t - 1] - lp["ref"][b, t - 1] for t in range(n, n + k))
        np.testing.assert_allclose(kl_B[b], want, atol=1e-4)
        np.testing.assert_allclose(np.asarray(s.logps_BT)[b, n:n + k],
                                   [lp["pi"][b, t - 1] for t in range(n, n + k)], atol=1e-4)
    assert 0 < stopped_rows < B  # both kinds of row occur with this seed


def test_evaluator_lengths_judge_and_truncation_flag(model, tmp_path):
    """The evaluation sampler with the data's stop set: 'ok<|im_end|>' is 2 + 1 tokens long,
    the judge sees only those (a judge that scores the completion's length agrees), nothing is
    truncated and samples.jsonl says so; with the old id 0 every sample is marked truncated."""
    tok = chatml_tokenizer("<|endoftext|>")
    tok.save_pretrained(tmp_path / "tok")
    stops = stop_ids(_data_cfg(str(tmp_path / "tok")))
    m, params = model
    (_, _), (chat_prompt, chosen) = _answers(tok, str(tmp_path / "tok"))
    N = 10
    policy = scripted_params(m, params, chat_prompt, (chosen * N)[:N])
    judge = lambda samples: jnp.sum(samples.completion_mask_BT, axis=1)  # noqa: E731
    out = {}
    for label, ids in (("data", stops), ("old", (0,))):
        cfg = evaluation.EvalConfig(sample_every=1, sample_prompts=3, seed=0, judge="",
                                    sampling=SamplingConfig(max_new_tokens=N, temperature=0.0,
                                                            stop_ids=ids))
        ev = evaluation.SampleEvaluator(
            cfg, workdir=str(tmp_path / label), model=m, mesh=helpers.mesh(),
            prompts=[np.asarray(chat_prompt, np.int32)] * 3, reference_params=policy,
            total_steps=1, decode=lambda t: tok.decode(t, skip_special_tokens=True), judge=judge)
        (tmp_path / label).mkdir()
        out[label] = ev(types.SimpleNamespace(step=jnp.int32(1), trainable=policy))
        ev.close()
        rows = [json.loads(x) for x in open(tmp_path / label / "samples.jsonl")]
        assert [r["stopped"] for r in rows] == [label == "data"] * 6  # reference and policy
    assert out["data"]["samples/length"] == len(chosen) == out["data"]["samples/reward"]
    assert out["data"]["samples/truncated"] == 0.0
    assert out["old"]["samples/length"] == N and out["old"]["samples/truncated"] == 1.0


def test_a_stop_token_as_the_last_allowed_token_is_a_stop(model, tmp_path):
    """max_new_tokens exactly the trained answer's length: the last allowed token is the end
    token, so the row stopped (not truncated) at full length; one token fewer, it did not."""
    tok = chatml_tokenizer("<|endoftext|>")
    tok.save_pretrained(tmp_path)
    m, params = model
    (_, _), (prompt, chosen) = _answers(tok, str(tmp_path))
    policy = scripted_params(m, params, prompt, chosen * 2)
    for N, stopped in ((len(chosen), True), (len(chosen) - 1, False)):
        cfg = SamplingConfig(max_new_tokens=N, temperature=0.0,
                             stop_ids=stop_ids(_data_cfg(str(tmp_path))))
        s = generate(m, policy, np.asarray([prompt]), np.asarray([len(prompt)]),
                     jax.random.key(0), cfg)
        assert int(s.lengths_B[0]) == N and bool(s.stopped_B[0]) == stopped
