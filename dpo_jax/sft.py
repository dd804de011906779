"""Supervised fine-tuning (``config.task='sft'``) and the Unlikelihood baseline, on the DPO loop.

Why a subclass of ``train.Run``: the mesh, sharded init/restore, the jit-once step, the
one-step-late metrics, eval, checkpoints and resume are the same for every task; SFT only
changes the loss (token-mean NLL) and the batches (single sequences instead of pairs).

Objectives (``config.sft.objective``):
  * ``nll``: mean negative log-likelihood over scored tokens of the whole global batch; scored
    tokens are the response (``sft.target='response'``: Preferred-FT when the data is the chosen
    side of a preference file) or every token after the first (``'text'``: LM pretraining).
  * ``unlikelihood``: the paper's Unlikelihood baseline (Welleck et al. 2019 token-level
    unlikelihood applied to dispreferred responses): on preference pairs,
    ``mean_t[-log p(y_w,t)] + alpha * mean_t[-log(1 - p(y_l,t))]`` with token means over the
    batch's chosen / rejected response tokens and ``1 - p`` clamped at 1e-5 as in Welleck et
    al.'s code. Batches are the DPO pipeline's (chosen rows then rejected rows).

SFT data (``config.sft.source``): ``'preference'`` -- (prompt, chosen) of ``config.data`` (any
source of the DPO pipeline, including the synthetic task); ``'tokens'`` -- jsonl(.gz) files of
pre-tokenised ``{"prompt": [ids], "response": [ids]}`` rows (``sft.train_path``/``eval_path``;
``prompt`` may be absent), which is how the IMDb pipeline feeds reviews.
"""

from __future__ import annotations

import gzip
import json
import math
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpo_jax import data as data_lib
from dpo_jax import sharding as shard_lib
from dpo_jax import train as train_lib
from dpo_jax.data import batching, config as data_config
from dpo_jax.data.errors import DataError
from dpo_jax.logprobs import compact_scored, token_logps

UL_MIN_ONE_MINUS_P = 1e-5


def add_sft_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the ``sft`` block to a base config and select the SFT task (returns ``c``)."""
    c.task = "sft"
    c.sft = ml_collections.ConfigDict()
    c.sft.objective = "nll"  # nll | unlikelihood
    c.sft.target = "response"  # response (prompt tokens unscored) | text (all tokens scored)
    c.sft.source = "preference"  # preference: (prompt, chosen) of config.data | tokens: jsonl
    c.sft.train_path = ""  # tokens source: jsonl(.gz) of {"prompt": [..], "response": [..]}
    c.sft.eval_path = ""  # tokens source: held-out file ('' = no eval data)
    c.sft.unlikelihood_alpha = 1.0  # weight of the unlikelihood term on rejected tokens
    return c


# ------------------------------------------------------------------------------- data
def read_token_examples(path: str) -> list[dict[str, np.ndarray]]:
    """Rows of a jsonl(.gz) token file as {"prompt", "response"} int32 arrays."""
    opener = gzip.open if path.endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "response" not in rec:
                raise DataError("token example without 'response'", file=path, row=i,
                                reason="missing_field")
            out.append({"prompt": np.asarray(rec.get("prompt", []), np.int32),
                        "response": np.asarray(rec["response"], np.int32)})
    return out


def write_token_examples(examples, path: str) -> None:
    """Inverse of :func:`read_token_examples` (gzip when the name ends in .gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": [int(t) for t in ex.get("prompt", [])],
                                "response": [int(t) for t in ex["response"]]}) + "\n")


class TextPipeline:
    """Fixed-shape batches of single sequences with ``loss_mask`` and ``example_weight``.

    Same contract as ``PreferencePipeline`` (endless reshuffled train stream, one padded eval
    pass, ``state_dict``/``load_state_dict``, ``stats``), same bucketing / packing code
    (``data.batching``); sequence slot s of a batch is example s. Packed row counts are
    multiples of ``row_multiple`` (the run passes its batch-shard count).
    """

    def __init__(self, examples: list[dict[str, np.ndarray]], cfg, *, train: bool,
                 global_batch_size: int, target: str = "response", process_index: int = 0,
                 process_count: int = 1, seed: int = 0, pad_id: int = 0,
                 row_multiple: int = 1):
        if target not in ("response", "text"):
            raise ValueError(f"sft.target must be 'response' or 'text', got {target!r}")
        if global_batch_size % process_count:
            raise ValueError("global batch size not divisible by the process count")
        max_len = int(cfg.max_length)
        self.seqs: list[tuple[np.ndarray, int]] = []
        truncated = 0
        for ex in examples:
            tokens = np.concatenate([ex["prompt"], ex["response"]]).astype(np.int32)
            p_len = 0 if target == "text" else len(ex["prompt"])
            if len(tokens) > max_len:
                truncated += 1
                tokens = tokens[:max_len]
            if len(tokens) - max(p_len, 1) >= 1:  # at least one scored token
                self.seqs.append((tokens, p_len))
        if not self.seqs or (train and len(self.seqs) < global_batch_size):
            raise DataError(f"{len(self.seqs)} usable examples for a batch of {global_batch_size}")
        self.cfg, self.train, self.B = cfg, train, global_batch_size
        self.p, self.P, self.seed, self.pad_id = process_index, process_count, int(seed), pad_id
        self.lengths = np.asarray([len(t) for t, _ in self.seqs], np.int64)
        self.row_multiple = math.lcm(int(cfg.row_multiple), int(row_multiple), process_count)
        self.epoch = self.position = 0
        buckets = data_config.parse_buckets(cfg.buckets)
        if buckets is None or self.lengths.max() > buckets[-1]:
            maxima = [self.lengths[np.maximum(b, 0)].max() for b in self._batches(0)]
            buckets = batching.choose_buckets(np.asarray(maxima), cfg.num_buckets,
                                              cfg.bucket_multiple)
        self.buckets = buckets
        self.pack_length = int(cfg.pack_length) or buckets[-1]
        self._stats = {"examples": len(self.seqs), "dropped": len(examples) - len(self.seqs),
                       "truncated": truncated, "tokens": int(self.lengths.sum())}

    @property
    def num_batches(self) -> int:
        n = len(self.seqs)
        return n // self.B if self.train else -(-n // self.B)

    def _batches(self, epoch: int) -> np.ndarray:
        n, B = len(self.seqs), self.B
        if not self.train:
            order = np.full(self.num_batches * B, -1, np.int64)
            order[:n] = np.arange(n)
            return order.reshape(-1, B)
        rng = np.random.default_rng([int(self.cfg.shuffle_seed), self.seed, epoch])
        return rng.permutation(n)[: self.num_batches * B].reshape(-1, B)

    def batch_at(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch ``position`` of ``epoch`` (pure)."""
        idx = self._batches(epoch)[position]
        weight = (idx >= 0).astype(np.float32)
        idx = np.where(idx >= 0, idx, 0)
        plan = batching.make_plan(self.lengths[idx], self.buckets, bool(self.cfg.packing),
                                  self.pack_length, self.row_multiple)
        rows = plan.rows // self.P
        r0, r1 = self.p * rows, (self.p + 1) * rows
        seqs = {s: self.seqs[int(idx[s])] for s in range(self.B) if r0 <= plan.row[s] < r1}
        out = batching.materialise(plan, seqs, r0, r1, self.pad_id)
        per_host = self.B // self.P
        out["example_weight"] = weight[self.p * per_host:(self.p + 1) * per_host]
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position >= self.num_batches:
            self.position = 0
            if not self.train:
                raise StopIteration
            self.epoch += 1
        batch = self.batch_at(self.epoch, self.position)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": len(self.seqs), "global_batch_size": self.B}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in (("num_examples", len(self.seqs)), ("global_batch_size", self.B),
                     ("seed", self.seed)):
            if k in state and int(state[k]) != v:
                raise DataError(f"cannot resume: state has {k}={state[k]}, pipeline has {v}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self._stats, buckets=list(self.buckets), batches_per_epoch=self.num_batches)


def load_examples(config, split: str) -> tuple[list[dict[str, np.ndarray]], int]:
    """SFT examples of ``split`` ('train' | 'eval') and the pad id."""
    s = config.sft
    if s.source == "tokens":
        path = s.train_path if split == "train" else s.eval_path
        if not path:
            raise ValueError(f"sft.source='tokens' needs sft.{split}_path")
        return read_token_examples(path), 0
    if s.source == "preference":
        from dpo_jax.data.pipeline import load_tokenised_pairs
        from dpo_jax.data import synthetic

        data_config.validate(config.data)
        tok = None if config.data.source == "synthetic" else data_lib.load_tokenizer(
            config.data.tokenizer)
        pairs, _ = load_tokenised_pairs(config.data, split, tok)
        pad = synthetic.EOS_ID if tok is None else int(
            tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id)
        return [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs], pad
    raise ValueError(f"sft.source must be 'preference' or 'tokens', got {s.source!r}")


# ------------------------------------------------------------------------------- math
def scored_token_logps(model, params, batch, lp_cfg, num_scored):
    """Per-token log-probs of scored tokens: (logps [R,S], mask [R,S], slot [R,S]).

    ``slot`` is the sequence slot of each token: ``seq_index`` in packed batches, else the row.
    """
    h = model.hidden(params, batch["input_ids"], batch["positions"], batch["segment_ids"])
    w, b = model.unembedding(params)
    h, targets = h[:, :-1], batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    rows, length = targets.shape
    if "seq_index" in batch:
        slot = batch["seq_index"][:, 1:]
    else:
        slot = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], (rows, length))
    if lp_cfg.scored_only:
        width = length if num_scored is None else min(num_scored, length)
        order, mask = compact_scored(mask, width)
        h = jnp.take_along_axis(h, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        slot = jnp.take_along_axis(slot, order, axis=1)
    logps = token_logps(h, targets, w, b, lp_cfg) * mask
    return logps, mask, jnp.where(mask > 0, slot, 0)


def nll_sums(model, params, batch, lp_cfg, num_scored) -> dict[str, jax.Array]:
    """Weighted sums over scored tokens: ``nll`` (of -log p) and ``tokens``."""
    logps, mask, slot = scored_token_logps(model, params, batch, lp_cfg, num_scored)
    w = batch["example_weight"][slot] * mask
    return {"nll": -jnp.sum(w * logps), "tokens": jnp.sum(w)}


def unlikelihood_sums(model, params, batch, lp_cfg, num_scored) -> dict[str, jax.Array]:
    """Sums for the Unlikelihood loss on a preference batch (slots < B are chosen)."""
    logps, mask, slot = scored_token_logps(model, params, batch, lp_cfg, num_scored)
    B = batch["pair_weight"].shape[0]
    w = batch["pair_weight"][slot % B] * mask
    chosen = (slot < B).astype(jnp.float32)
    one_minus_p = jnp.maximum(-jnp.expm1(logps), UL_MIN_ONE_MINUS_P)
    return {"nll": -jnp.sum(w * chosen * logps), "tokens": jnp.sum(w * chosen),
            "ul": -jnp.sum(w * (1 - chosen) * jnp.log(one_minus_p)),
            "rejected_p": jnp.sum(w * (1 - chosen) * jnp.exp(logps)),
            "rejected_tokens": jnp.sum(w * (1 - chosen))}


def ratios(sums: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """Token means from sums: nll, ppl, loss (+ ul terms). Works on jax or python numbers."""
    exp = jnp.exp if isinstance(sums["nll"], jax.Array) else math.exp
    nll = sums["nll"] / jnp.maximum(sums["tokens"], 1e-9)
    out = {"nll": nll, "ppl": exp(nll), "loss": nll}
    if "ul" in sums:
        rej = jnp.maximum(sums["rejected_tokens"], 1e-9)
        out["ul"] = sums["ul"] / rej
        out["rejected_token_p"] = sums["rejected_p"] / rej
        out["loss"] = nll + alpha * out["ul"]
    return out


def make_sft_train_step(model, objective: str, alpha: float, tx, schedule, lp_cfg):
    """``train_step(state, batch, num_scored) -> (state, metrics)`` minimising the token mean."""
    sums_fn = unlikelihood_sums if objective == "unlikelihood" else nll_sums

    def loss_fn(params, batch, num_scored):
        sums = sums_fn(model, params, batch, lp_cfg, num_scored)
        out = ratios(sums, alpha)
        return out["loss"], out

    def train_step(state, batch, num_scored=None):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, num_scored)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


# ------------------------------------------------------------------------------- the task
class SFTRun(train_lib.Run):
    """``train.Run`` with the SFT / Unlikelihood objective and single-sequence batches."""

    def setup_task(self) -> None:
        s = self.config.sft
        if s.objective not in ("nll", "unlikelihood"):
            raise ValueError(f"sft.objective must be 'nll' or 'unlikelihood', got {s.objective!r}")
        if self.step_cfg.grad_accum != 1:
            raise ValueError("the SFT task does not accumulate gradients; set optim.grad_accum=1")
        self.objective, self.alpha = s.objective, float(s.unlikelihood_alpha)

    def needs_reference(self) -> bool:
        return False

    def make_train_step(self):
        return make_sft_train_step(self.model, self.objective, self.alpha, self.tx,
                                   self.schedule, self.step_cfg.logprobs)

    def make_eval_step(self):
        sums_fn = unlikelihood_sums if self.objective == "unlikelihood" else nll_sums
        lp_cfg = self.step_cfg.logprobs
        return lambda params, ref_params, batch, num_scored=None: sums_fn(
            self.model, params, batch, lp_cfg, num_scored)

    def build_data(self, split: str, global_batch_size: int):
        if self.objective == "unlikelihood":
            return super().build_data(split, global_batch_size)
        examples, pad_id = load_examples(self.config, split)
        return TextPipeline(examples, self.config.data, train=split == "train",
                            global_batch_size=global_batch_size, target=self.config.sft.target,
                            process_index=jax.process_index(),
                            process_count=jax.process_count(), seed=int(self.config.seed),
                            pad_id=pad_id,
                            row_multiple=shard_lib.num_batch_shards(self.mesh))

    def evaluate(self) -> dict[str, float]:
        """Token means over the whole held-out set (sums first, then ratios)."""
        totals: dict[str, float] = {}
        for batch_np in self.eval_data:
            batch, num_scored = self._device_batch(batch_np)
            sums = jax.device_get(self._eval_step(self.state.params, None, batch, num_scored))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return {k: float(v) for k, v in ratios(totals, self.alpha).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    return SFTRun(config, workdir).train()
