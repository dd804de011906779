"""Shared pure-function test builders: a tiny model, its state and optimizer, real batches.

Step tests call the pure step functions (``dpo_jax.step.make_train_step`` / ``make_eval_step``)
directly with what these builders return; end-to-end tests start from ``tests/runs.py``.

    model = tiny_model()
    params = init_params(model, seed=0)
    tx, schedule = optimizer(name="sgd", lr=1.0)
    state = train_state(model, params, tx, ref_params=init_params(model, seed=1))
    pairs = synthetic_pairs(8)
    batch, max_scored = device_batch(pair_batch(pairs))

Everything is small enough that one jitted step compiles and runs in about a second on CPU.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import pathlib
import types
from typing import Any

import jax
import numpy as np
import pytest

from dpo_jax import losses as losses_lib
from dpo_jax import sharding as shard_lib
from dpo_jax.data import PreferencePipeline, default_data_config, load_tokenizer, to_global
from dpo_jax.data.synthetic import SyntheticTask, make_pairs
from dpo_jax.data.testing import find_shared_data
from dpo_jax.data.tokenize import PairTokenizer
from dpo_jax.logprobs import LogprobConfig, max_scored_tokens
from dpo_jax.models import Model, ModelConfig
from dpo_jax.models.config import preset
from dpo_jax.optim import OptimConfig, make_optimizer
from dpo_jax.state import Frozen, TrainState, create_state, param_shardings
from dpo_jax.step import StepConfig, make_train_step

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_module(path: str, name: str | None = None):
    """The Python file ``path`` (relative to the repository root: ``configs/*.py``, an
    experiment's script) imported as a module named ``name`` (default: the file's stem)."""
    spec = importlib.util.spec_from_file_location(name or pathlib.Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- model and state


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """The ``tiny-gpt2`` preset (2 layers, d_model 32, 4 heads, vocab 128 = the synthetic
    task's, 64 positions), float32; ``overrides`` replace ModelConfig fields."""
    return preset("tiny-gpt2", **overrides)


def tiny_model(**overrides: Any) -> Model:
    return Model(tiny_model_config(**overrides))


def init_params(model: Model, seed: int = 0):
    """Seeded random parameters of ``model`` on the default device (unsharded)."""
    return jax.jit(model.init)(jax.random.key(seed))


def perturbed(params, scale: float = 0.02, seed: int = 1):
    """``params`` plus float32 normal noise of std ``scale`` on every leaf, drawn on the host:
    a second model (e.g. a reference that differs from the policy) without another init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + rng.normal(0.0, scale, np.shape(x)).astype(np.asarray(x).dtype), params)


def optimizer(total_steps: int = 10, **fields: Any):
    """``(tx, schedule)`` from ``OptimConfig(**fields)``; the defaults here make the update
    easy to compute by hand: SGD, lr 1, no warmup, no clipping."""
    fields = {"name": "sgd", "lr": 1.0, "warmup_steps": 0, "max_grad_norm": 0.0, **fields}
    return make_optimizer(OptimConfig(**fields), total_steps)


def mesh(shape: dict[str, int] | None = None):
    """A ('data', 'fsdp', 'context', 'tensor') mesh over the 8 fake CPU devices (default: all
    on data)."""
    return shard_lib.make_mesh(shape or {"data": -1, "fsdp": 1, "tensor": 1})


def train_state(model: Model, params, tx, ref_params=None, mesh_=None) -> TrainState:
    """A step-0 TrainState built by ``dpo_jax.state.create_state`` on ``mesh_`` (default
    :func:`mesh`), parameters placed in their shardings."""
    mesh_ = mesh_ if mesh_ is not None else mesh()
    shardings = param_shardings(model, mesh_, shard_lib.DEFAULT_RULES)
    params = jax.device_put(params, shardings)
    frozen = (None if ref_params is None
              else Frozen(reference=jax.device_put(ref_params, shardings)))
    return create_state(params, tx, mesh_, shardings, frozen)


def step_config(grad_accum: int = 1, forward_logprobs: LogprobConfig | None = None,
                **logprob_fields: Any) -> StepConfig:
    """``StepConfig`` with ``LogprobConfig(**logprob_fields)`` for the training head."""
    return StepConfig(grad_accum=grad_accum, logprobs=LogprobConfig(**logprob_fields),
                      forward_logprobs=forward_logprobs)


def loss_config(name: str = "sigmoid", **options: Any) -> losses_lib.LossConfig:
    """A validated LossConfig: ``loss_config(beta=0.5)``, ``loss_config('ipo', beta=0.5)``."""
    block = losses_lib.default_loss_config()
    block.name = name
    for k, v in options.items():
        block[k] = v
    return losses_lib.loss_config_from(block)


# ----------------------------------------------------------------------------- data


def synthetic_pairs(num_pairs: int, seed: int = 0, task: SyntheticTask | None = None):
    """Tokenised pairs ``{prompt, chosen, rejected}`` (int32, EOS ending each response) of the
    synthetic task (``dpo_jax/data/synthetic.py``; vocabulary 128 by default)."""
    return make_pairs(task or SyntheticTask(), num_pairs, seed)


def head_batch(seed: int = 0, rows: int = 4, length: int = 19, dim: int = 8, vocab: int = 37):
    """``(h, w, b, ids, mask)``: seeded normal float32 hidden states ``h`` [rows, length, dim],
    output weights ``w`` [vocab, dim] and bias ``b`` [vocab], int32 token ``ids``
    [rows, length] and a float32 ``mask`` scoring tokens ``3 + r`` to ``length - 2 r`` of row
    ``r`` (a prompt, a response, then right padding): inputs of the chunked log-prob head."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(rows, length, dim)).astype(np.float32)
    w = rng.normal(size=(vocab, dim)).astype(np.float32)
    b = rng.normal(size=(vocab,)).astype(np.float32)
    ids = rng.integers(0, vocab, size=(rows, length)).astype(np.int32)
    mask = np.zeros((rows, length), np.float32)
    for r in range(rows):
        mask[r, 3 + r:length - 2 * r] = 1.0
    return h, w, b, ids, mask


def packed_seq_index(mask) -> np.ndarray:
    """int32 ``seq_index`` shaped like ``mask`` [R, L] as if each row packed two sequences:
    row ``r``'s scored columns split in halves, slot ``r`` then slot ``r + R`` (R = 2: row 0
    packs slots 0 and 2, row 1 slots 1 and 3); -1 at unscored columns."""
    rows = len(mask)
    seq_index = np.full(np.shape(mask), -1, np.int32)
    for r in range(rows):
        cols = np.nonzero(mask[r])[0]
        half = len(cols) // 2
        seq_index[r, cols[:half]] = r
        seq_index[r, cols[half:]] = r + rows
    return seq_index


def packed_tokens(mask, seq_index):
    """``(slot, row, column)`` of every scored token ``t >= 1`` of ``mask`` [R, L], row by row
    in order: its sequence slot ``seq_index[row, t]`` and the column ``t - 1`` of the log-prob
    that predicts it (what a packed per-sequence sum adds up)."""
    for r in range(len(mask)):
        for t in range(1, np.shape(mask)[1]):
            if mask[r, t]:
                yield int(seq_index[r, t]), r, t - 1


def write_jsonl(path, rows, gz: bool = False) -> str:
    """``rows`` (dicts) written to ``path`` one JSON object a line, gzip-compressed when
    ``gz``; the path as a string."""
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def shared_gpt2_tokenizer(required: bool = True):
    """The real GPT-2 tokenizer in the shared data directory (``gpt2_tokenizer`` under
    ``dpo_jax.data.testing.find_shared_data``). Absent: the calling test is skipped when
    ``required``, else None."""
    root = find_shared_data(__file__)
    if root is None or not (root / "gpt2_tokenizer").is_dir():
        if required:
            pytest.skip("shared GPT-2 tokenizer absent")
        return None
    return load_tokenizer(str(root / "gpt2_tokenizer"))


def data_config(**fields: Any):
    """``default_data_config()`` (the synthetic source) with ``fields`` set."""
    c = default_data_config()
    for k, v in fields.items():
        c[k] = v
    return c


def pair_tokenizer(tok, **data_fields: Any) -> PairTokenizer:
    """The pair tokenizer of ``tok`` under :func:`data_config` with ``data_fields`` set."""
    return PairTokenizer(tok, data_config(**data_fields))


def pipeline(pairs, batch_size: int | None = None, *, train: bool = False, seed: int = 0,
             **data_fields: Any) -> PreferencePipeline:
    """The real ``PreferencePipeline`` over ``pairs`` (one process). Eval (default): one pass in
    order, the last batch padded with ``pair_weight`` 0 pairs; train: shuffled, full batches."""
    return PreferencePipeline(list(pairs), data_config(**data_fields), train=train,
                              global_batch_size=batch_size or len(pairs), seed=seed,
                              pad_id=0)


def assert_resumes(make, batches, after: int, through_json: bool = True) -> dict:
    """A pipeline from ``make()`` advanced ``after`` batches; its ``state_dict`` (round-tripped
    through JSON when ``through_json``) loaded into a fresh ``make()``: the fresh pipeline
    yields ``batches[after:]`` (the uninterrupted pipeline's), every array equal. The state."""
    part = make()
    for _ in range(after):
        next(part)
    state = part.state_dict()
    if through_json:
        state = json.loads(json.dumps(state))
    resumed = make()
    resumed.load_state_dict(state)
    for want in batches[after:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    return state


def rollout_batch(B=4, max_prompt=3, n=4, vocab=128, seed=0, completion_lengths=None):
    """A rollout batch as PPO's step reads it: right-padded ``tokens [B, max_prompt + n]``,
    each row's prompt then 1..n completion tokens (``completion_mask``; drawn, or
    ``completion_lengths(b)``), ``prompt_lengths``."""
    rng = np.random.default_rng(seed)
    prompt_lengths = rng.integers(1, max_prompt + 1, B).astype(np.int32)
    tokens = np.zeros((B, max_prompt + n), np.int32)
    mask = np.zeros((B, max_prompt + n), np.float32)
    for b, p in enumerate(prompt_lengths):
        k = int(rng.integers(1, n + 1)) if completion_lengths is None else completion_lengths(b)
        tokens[b, :p + k] = rng.integers(1, vocab, p + k)
        mask[b, p:p + k] = 1
    return {"tokens": jax.numpy.asarray(tokens), "completion_mask": jax.numpy.asarray(mask),
            "prompt_lengths": jax.numpy.asarray(prompt_lengths)}


def pair_batch(pairs, batch_size: int | None = None, **data_fields: Any) -> dict[str, np.ndarray]:
    """The first eval batch of ``pairs`` as the pipeline builds it (numpy, ARCHITECTURE.md
    layout); with the default ``batch_size`` (all pairs) no pair is padding."""
    return next(iter(pipeline(pairs, batch_size, **data_fields)))


def device_batch(batch_np: dict[str, np.ndarray], mesh_=None):
    """``(batch, max_scored)``: the numpy batch as global arrays sharded over ``mesh_``'s batch
    axes (default :func:`mesh`; rows must divide by its data x fsdp size) and the static bound
    on scored tokens per row that the step takes."""
    mesh_ = mesh_ if mesh_ is not None else mesh()
    batch = to_global(batch_np, shard_lib.batch_shardings(batch_np, mesh_))
    return batch, max_scored_tokens(batch_np["loss_mask"])


def one_device_dpo_step(model: Model, params, loss_cfg, num_pairs: int = 4, lr: float = 1e-3):
    """One DPO train step (``make_train_step``: SGD at ``lr``, the default StepConfig) of
    ``params`` beside a reference perturbed by 0.02, on a one-device mesh (the math, not the
    sharding), over the pair batch of ``num_pairs`` synthetic pairs. A namespace of ``state``
    (before), ``new_state``, ``metrics``, ``batch_np`` (numpy) and ``batch`` (on device)."""
    mesh_ = shard_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
    tx, schedule = optimizer(lr=lr)
    state = train_state(model, params, tx, ref_params=perturbed(params, 0.02), mesh_=mesh_)
    batch_np = pair_batch(synthetic_pairs(num_pairs))
    batch, max_scored = device_batch(batch_np, mesh_)
    step = jax.jit(make_train_step(model, loss_cfg, tx, schedule, step_config()),
                   static_argnums=2)
    new_state, metrics = step(state, batch, max_scored)
    return types.SimpleNamespace(state=state, new_state=new_state, metrics=metrics,
                                 batch_np=batch_np, batch=batch)


def qlora_step(model, base, adapters, batch, mesh_):
    """One SGD step of sigmoid DPO (beta 0.5) of a LoRA ``model`` over the float ``base``
    quantised into its sharding on ``mesh_`` as ``state.setup`` places it, traced under
    ``jax.set_mesh(mesh_)`` (so expert parallelism applies): (the new adapters and the metrics
    on the host, the new state)."""
    rules = shard_lib.DEFAULT_RULES
    tx, schedule = optimizer()
    ad_sh = shard_lib.tree_shardings(model.abstract_adapters(), model.adapter_axes(), mesh_, rules)
    base_sh = shard_lib.tree_shardings(model.abstract_base(), model.base_axes(), mesh_, rules)
    qbase = jax.jit(model.quantize_base, out_shardings=base_sh)(base)
    state = create_state(jax.device_put(adapters, ad_sh), tx, mesh_, ad_sh,
                         Frozen(lora_base=qbase))
    step = jax.jit(make_train_step(model, loss_config(beta=0.5), tx, schedule, StepConfig()),
                   static_argnums=2)
    with jax.set_mesh(mesh_):
        new, metrics = step(state, batch, None)
    return jax.device_get(new.trainable), jax.device_get(metrics), new


def assert_qlora_step_on_mesh_equals_one_device(model_one, model_mesh, base, adapters, mesh_):
    """:func:`qlora_step` of ``model_one`` on one device and of ``model_mesh`` (the same model,
    e.g. with expert parallelism) on ``mesh_``, from the same base and adapters on 8 synthetic
    pairs: equal metrics and updated adapters (float32 round-off). Returns the mesh step's
    :func:`qlora_step` result."""
    b = pair_batch(synthetic_pairs(8))
    one = shard_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    want = qlora_step(model_one, base, adapters, b, one)
    got = qlora_step(model_mesh, base, adapters, b, mesh_)
    for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=2e-5, atol=2e-6, err_msg=k)
    for x, y in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    return got


def leaves(tree) -> list[np.ndarray]:
    """The leaves of a pytree as host numpy arrays (for exact / allclose comparisons)."""
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def global_norm(tree) -> float:
    """float64 global L2 norm of a pytree (host side)."""
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves(tree))))


def rel_diff(a, b) -> float:
    """Global relative L2 difference ``|a - b| / |b|`` of two pytrees (float64, host side)."""
    diff = jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)
    return global_norm(diff) / max(global_norm(b), 1e-30)


def logps_and_vjp(model: Model, params, batch_np: dict[str, np.ndarray], cfg: StepConfig,
                  cotangent):
    """``(logps [S], counts [S], d sum(cotangent * logps) / d params)`` of one jitted
    ``step.sequence_stats`` forward over the numpy batch ``batch_np``: what the layout parity
    tests (prefix sharing, preference trees) compare, since every loss is a function of the
    per-sequence sums and counts."""
    from dpo_jax.step import sequence_stats

    batch = {k: jax.numpy.asarray(v) for k, v in batch_np.items()}
    max_scored = max_scored_tokens(batch_np["loss_mask"])

    def f(p, b):
        s = sequence_stats(model, p, b, cfg, max_scored)
        return jax.numpy.sum(cotangent * s.logps), (s.logps, s.lengths)

    (_, (logps, counts)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params, batch)
    return np.asarray(logps), np.asarray(counts), grads


def sgd_step(model: Model, params, ref_params, batch_np: dict[str, np.ndarray], loss_cfg,
             mesh_, cfg: StepConfig | None = None):
    """``(update, metrics)`` of one jitted train step (SGD, lr 1: the update is minus the
    gradient) on ``batch_np`` over ``mesh_``, as host numpy."""
    tx, schedule = optimizer()
    state = train_state(model, params, tx, ref_params=ref_params, mesh_=mesh_)
    batch, max_scored = device_batch(batch_np, mesh_)
    step = jax.jit(make_train_step(model, loss_cfg, tx, schedule, cfg or StepConfig()),
                   static_argnums=2)
    new_state, metrics = step(state, batch, max_scored)
    update = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                          jax.device_get(new_state.trainable), jax.device_get(params))
    return update, jax.device_get(metrics)


# ----------------------------------------------------------------------------- transformers parity
# torch and transformers are imported inside these functions: only the HF tests need them.

# The fields every tiny transformers config of the parity tests shares (random_hf_models'
# ``common``): 2 layers, width 32, 4 query and 2 key/value heads, the synthetic vocabulary.
TINY_HF_FIELDS = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)


def padded_ids(lens: list[int], low: int = 0, vocab: int = 128, seed: int = 0):
    """``(ids, mask)``, int32 [len(lens), max(lens)]: seeded tokens in ``[low, vocab)``, row
    ``b`` real for its first ``lens[b]`` positions, then right padding with token 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low, vocab, (len(lens), max(lens))).astype(np.int32)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    return ids * mask, mask


def hf_logits(hf_model, ids, mask=None) -> np.ndarray:
    """float32 logits [B, L, V] of a transformers causal LM on ``ids`` (``mask``: the
    attention mask, default all ones), without gradients."""
    import torch

    mask = np.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long))
    return out.logits.float().numpy()


def assert_logits_close(ours, ref, mask) -> None:
    """``ours`` equals the reference logits ``ref`` at the positions ``mask`` marks, to 1e-4
    relative and 1e-5 of ``ref``'s largest magnitude there."""
    sel = mask.astype(bool)
    scale = np.abs(ref[sel]).max()
    np.testing.assert_allclose(np.asarray(ours)[sel], ref[sel], rtol=1e-4, atol=1e-5 * scale)


def random_hf_models(tmp_path_factory, cases, common: dict, ids, mask, **from_config: Any):
    """name -> (directory, model, its logits on ``ids``/``mask``) for each
    ``name: (config class name, fields)`` of ``cases``: a transformers causal LM of
    ``common`` and those fields, seeded torch weights of std 0.2 (larger than the init's, so
    attention patterns are non-trivial), saved with ``save_pretrained``. ``from_config`` goes
    to ``AutoModelForCausalLM.from_config``."""
    import torch
    import transformers

    out = {}
    for name, (cls, fields) in cases.items():
        torch.manual_seed(0)
        conf = getattr(transformers, cls)(**common, **fields)
        model = transformers.AutoModelForCausalLM.from_config(conf, **from_config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (str(path), model, hf_logits(model, ids, mask))
    return out


def routed_experts(rng: np.random.Generator, T: int, E: int, others, D: int = 6, F: int = 5,
                   K: int = 2):
    """Random inputs of a top-2 expert MLP with skewed routing: ``T`` tokens of width ``D``,
    ``E`` experts of width ``F``; slot 0 routes about 60% of the tokens to expert 1 and the rest
    to one of ``others``, slot 1 every token to expert 3. Returns ``(x [T, D], index [T, K]
    int32, weight [T, K], gate [E, D, F], up [E, D, F], down [E, F, D])``, float32."""
    x = rng.normal(size=(T, D)).astype(np.float32)
    index = np.stack([np.where(rng.random(T) < 0.6, 1, rng.choice(list(others), T)),
                      np.full(T, 3)], 1).astype(np.int32)
    weight = rng.random((T, K)).astype(np.float32)
    gate, up = (rng.normal(size=(E, D, F)).astype(np.float32) for _ in range(2))
    down = rng.normal(size=(E, F, D)).astype(np.float32)
    return x, index, weight, gate, up, down


def fast_cases(cases, fast):
    """``cases`` as pytest parameters, those not in ``fast`` marked ``slow`` (run with
    ``--run-slow``): the default suite keeps one or two cases of a kind whose other cases
    exercise the same code path (the suite's 8-minute budget, README); ``--run-slow`` runs
    them all."""
    return [c if c in fast else pytest.param(*(c if isinstance(c, tuple) else (c,)),
                                             marks=pytest.mark.slow) for c in cases]
