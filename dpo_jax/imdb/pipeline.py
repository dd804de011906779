"""The paper's IMDb experiment as one resumable pipeline (``config.task='imdb'``).

Stages, each caching its output under the workdir and skipped when that output exists
(training stages also resume from their own checkpoints when interrupted):

  tokenizer -> reward -> sft_data -> sft -> prefixes -> samples (k per train prefix from the
  SFT model) -> pairs (reward-labelled, ties dropped) -> runs (DPO per beta, Preferred-FT,
  Unlikelihood; each initialised from SFT) -> reward model (Bradley-Terry on the same pairs,
  prompts split into train/held-out) -> PPO runs (learned reward, one per target KL) and PPO-GT
  runs (the ground-truth reward) -> frontier (every checkpoint of every run: sample held-out
  TEST prefixes, mean reward, sequence KL(pi || pi_SFT); SFT itself and Best-of-N of SFT
  samples) -> frontier.csv + frontier.png; ``compute.json`` (wall time and tokens per method).

Why checkpoints rather than an eval hook in the loop: the frontier needs samples, rewards and
a reference forward, none of which belong in the training step; evaluating saved checkpoints
(every ``imdb.eval_every`` steps) gives the same points and a rerun recomputes nothing.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax import sft as sft_lib
from dpo_jax import train as train_lib
from dpo_jax.imdb import frontier as frontier_lib
from dpo_jax.imdb.kl import kl_estimate
from dpo_jax.imdb.pairs import build_pair_dataset, make_prefixes, write_pairs
from dpo_jax.imdb.text import load_imdb
from dpo_jax.models import Model
from dpo_jax.reward_model import RewardModel
from dpo_jax.sampling import SamplingConfig, generate, score_tokens, sequence_mask


def _jsonl_write(rows, path: pathlib.Path) -> None:
    """Atomic: a killed stage never leaves a file that looks finished."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _jsonl_read(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020; exact for distinct
    rewards), the x-coordinate of a Best-of-N point."""
    return math.log(n) - (n - 1) / n


class ImdbPipeline:
    """Runs the stages in order; ``stages_run`` / ``stages_skipped`` record what happened."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.c = config, config.imdb
        self.dir = pathlib.Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stages_run: list[str] = []
        self.stages_skipped: list[str] = []
        self._tok = self._reward = self._model = self._score = self._proxy = None
        # Wall seconds of every stage ever run in this workdir (kept across reruns).
        self._times_path = self.dir / "stage_times.json"
        self.stage_seconds: dict[str, float] = (
            json.loads(self._times_path.read_text()) if self._times_path.exists() else {})

    # ------------------------------------------------------------------ plumbing
    def _stage(self, name: str, outputs: list[pathlib.Path], fn: Callable[[], Any]) -> None:
        if all(p.exists() for p in outputs):
            logging.info("imdb stage %s: cached (%s)", name, outputs[0])
            self.stages_skipped.append(name)
            return
        t0 = time.time()
        fn()
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"stage {name} did not write {missing}")
        self.stage_seconds[name] = round(time.time() - t0, 1)
        logging.info("imdb stage %s: done in %.1fs", name, self.stage_seconds[name])
        self.stages_run.append(name)
        tmp = self._times_path.with_name("stage_times.json.tmp")
        tmp.write_text(json.dumps(self.stage_seconds, indent=2))
        os.replace(tmp, self._times_path)

    @property
    def tokenizer_dir(self) -> str:
        return self.c.tokenizer or str(self.dir / "tokenizer")

    @property
    def tokenizer(self):
        if self._tok is None:
            from dpo_jax.imdb.tokenizer import load_tokenizer

            self._tok = load_tokenizer(self.tokenizer_dir)
        return self._tok

    @property
    def reward(self):
        if self._reward is None:
            from dpo_jax.imdb.sentiment import HubSentimentReward, SentimentReward

            self._reward = (HubSentimentReward(self.c.hub_reward) if self.c.hub_reward
                            else SentimentReward.load(self.c.reward_dir or self.dir / "reward"))
        return self._reward

    def _texts(self, split: str, limit: int) -> list[str]:
        return load_imdb(self.c.data_dir, split, limit=limit or None)[0]

    def run_config(self, task: str, **sections) -> ml_collections.ConfigDict:
        """A copy of the experiment config for one training run, with the model's vocabulary
        taken from the tokenizer (a preset model) and ``sections`` (dicts) merged in."""
        c = self.config.copy_and_resolve_references()
        c.unlock()
        c.task = task
        if task == "ppo":
            from dpo_jax.ppo.config import default_ppo_config

            c.ppo = default_ppo_config()
        if not c.model.get("hf_path"):
            c.model.overrides.vocab_size = len(self.tokenizer)
        for section, values in sections.items():
            for k, v in values.items():
                c[section][k] = v
        return c

    def model(self) -> Model:
        """One Model per pipeline: it is a static argument of the jitted sampler, so a new
        instance would recompile it."""
        if self._model is None:
            self._model = Model(train_lib.model_config(self.run_config("sft")))
            self._score = jax.jit(lambda p, t, s: score_tokens(self._model, p, t, s))
        return self._model

    # ------------------------------------------------------------------ stages
    def build_tokenizer(self) -> None:
        from dpo_jax.imdb.tokenizer import build_imdb_tokenizer

        splits = ("train", "unsup") if self.c.use_unsup else ("train",)
        build_imdb_tokenizer(self.c.data_dir, self.dir / "tokenizer",
                             vocab_size=int(self.c.vocab_size), splits=splits,
                             limit=int(self.c.max_reviews) or None)

    def build_reward(self) -> None:
        from dpo_jax.imdb.sentiment import train_sentiment

        texts, labels = load_imdb(self.c.data_dir, "train", limit=int(self.c.max_reviews) or None)
        model = train_sentiment(texts, labels, n_features=int(self.c.reward_features),
                                steps=int(self.c.reward_steps))
        test_texts, test_labels = load_imdb(self.c.data_dir, "test",
                                            limit=int(self.c.max_test_reviews) or None)
        model.meta["test_accuracy"] = model.accuracy(test_texts, test_labels)
        model.save(self.dir / "reward")

    def build_sft_data(self) -> None:
        """Reviews -> token files: each review (cut to ``sft_max_length``, then EOS) is scored
        entirely (``sft.target='text'``): the SFT model learns to write reviews."""
        tok, n = self.tokenizer, int(self.c.sft_max_length)
        eos = int(tok.eos_token_id)

        def encode(texts):
            ids = tok(texts, add_special_tokens=False)["input_ids"]
            return [{"response": list(x[: n - 1]) + [eos]} for x in ids]

        splits = ["train", "unsup"] if self.c.use_unsup else ["train"]
        train = [r for s in splits for r in encode(self._texts(s, int(self.c.max_reviews)))]
        test = encode(self._texts("test", int(self.c.max_test_reviews))[: int(self.c.sft_eval_size)])
        out = self.dir / "sft_data"
        out.mkdir(exist_ok=True)
        sft_lib.write_token_examples(test, str(out / "eval.jsonl.gz"))
        sft_lib.write_token_examples(train, str(out / "train.tmp.jsonl.gz"))
        os.replace(out / "train.tmp.jsonl.gz", out / "train.jsonl.gz")

    def train_sft(self) -> None:
        s = self.c.sft
        c = self.run_config(
            "sft", sft={"source": "tokens", "target": "text", "objective": "nll",
                        "train_path": str(self.dir / "sft_data" / "train.jsonl.gz"),
                        "eval_path": str(self.dir / "sft_data" / "eval.jsonl.gz")},
            train={"steps": s.steps, "batch_size": s.batch_size, "eval_every": s.eval_every,
                   "eval_batch_size": s.batch_size, "checkpoint_every": s.checkpoint_every},
            optim={"lr": s.lr, "warmup_steps": s.warmup_steps},
            data={"max_length": int(self.c.sft_max_length)})
        sft_lib.SFTRun(c, str(self.dir / "sft")).train()

    def build_prefixes(self) -> None:
        for split, n, seed in (("train", self.c.num_train_prefixes, 0),
                               ("test", self.c.num_test_prefixes, 1)):
            limit = int(self.c.max_reviews if split == "train" else self.c.max_test_reviews)
            pre = make_prefixes(self._texts(split, limit), self.tokenizer,
                                int(self.c.min_prefix_tokens), int(self.c.max_prefix_tokens), seed)
            _jsonl_write([{"prompt": p.text, "prompt_ids": list(p.token_ids),
                           "source": f"{split}:{p.source_index}"} for p in pre[: int(n)]],
                         self.dir / f"prefixes_{split}.jsonl")

    def sample(self, params, prompts: list[dict], k: int, rng: jax.Array,
               ref_params=None) -> list[dict]:
        """``k`` completions per prompt: text, reward, and (with ``ref_params``) the summed
        policy and reference log-probs of each completion. Fixed batch shapes: one compile."""
        c, tok, model = self.c, self.tokenizer, self.model()
        cfg = SamplingConfig(max_new_tokens=int(c.max_new_tokens), temperature=float(c.temperature),
                             eos_id=int(tok.eos_token_id), pad_id=int(tok.eos_token_id))
        rows = [p for p in prompts for _ in range(k)]
        B, P = int(c.sample_batch), int(c.max_prefix_tokens)
        out = []
        for start in range(0, len(rows), B):
            chunk = rows[start:start + B]
            ids = np.zeros((B, P), np.int32)
            lens = np.ones((B,), np.int32)
            for i, r in enumerate(chunk):
                ids[i, :len(r["prompt_ids"])] = r["prompt_ids"]
                lens[i] = len(r["prompt_ids"])
            s = generate(model, params, ids, lens, jax.random.fold_in(rng, start), cfg)
            mask = np.asarray(s.completion_mask_BT)
            toks = np.asarray(s.tokens_BT)
            pol = np.asarray(s.logps_BT).sum(1)
            ref = None
            if ref_params is not None:
                seg = sequence_mask(s, jnp.asarray(lens))
                ref = np.asarray(self._score(ref_params, s.tokens_BT, seg) * s.completion_mask_BT).sum(1)
            for i, r in enumerate(chunk):
                comp = [int(t) for t, m in zip(toks[i], mask[i]) if m > 0 and t != tok.eos_token_id]
                row = {"prompt": r["prompt"], "prompt_ids": list(r["prompt_ids"]),
                       "completion": tok.decode(comp), "completion_ids": comp,
                       "policy_logp": float(pol[i])}
                if ref is not None:
                    row["ref_logp"] = float(ref[i])
                out.append(row)
        rewards = self.reward([r["prompt"] for r in out], [r["completion"] for r in out])
        for r, v in zip(out, rewards):
            r["reward"] = float(v)
        return out

    def _params(self, run_dir: pathlib.Path, step: int | None = None, head: bool = False):
        """(decoder Model, params) of a run's checkpoint. ``head``: the run saved
        ``{"decoder", "value_head"}`` (PPO, reward model); the full tree is returned."""
        model = self.model()
        tree = RewardModel(model) if head else model
        c = self.run_config("sft")
        from dpo_jax import sharding as shard_lib

        mesh = shard_lib.make_mesh(dict(c.mesh.shape))
        shardings = shard_lib.tree_shardings(tree.abstract_params(), tree.logical_axes(), mesh,
                                             tuple(tuple(r) for r in c.mesh.rules))
        like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            tree.abstract_params(), shardings)
        return model, ckpt_lib.restore_params(str(run_dir), like, step)

    def sample_train(self) -> None:
        model, params = self._params(self.dir / "sft")
        prompts = _jsonl_read(self.dir / "prefixes_train.jsonl")
        k = int(self.c.samples_per_prefix)
        rows = self.sample(params, prompts, k, jax.random.key(int(self.config.seed) + 1))
        grouped = [{"prompt": prompts[i]["prompt"],
                    "completions": [r["completion"] for r in rows[i * k:(i + 1) * k]],
                    "rewards": [r["reward"] for r in rows[i * k:(i + 1) * k]]}
                   for i in range(len(prompts))]
        _jsonl_write(grouped, self.dir / "samples_train.jsonl")

    def build_pairs(self) -> None:
        groups = _jsonl_read(self.dir / "samples_train.jsonl")
        pairs = build_pair_dataset([g["prompt"] for g in groups],
                                   [g["completions"] for g in groups],
                                   [g["rewards"] for g in groups])
        write_pairs(pairs, self.dir / "pairs.tmp.jsonl")
        os.replace(self.dir / "pairs.tmp.jsonl", self.dir / "pairs.jsonl")

    def build_rm_pairs(self) -> None:
        """``rm_pairs/{train,test}.jsonl``: the DPO pairs split by PROMPT (a seeded fraction of
        the prompts held out), so the reward model's held-out accuracy is on unseen prompts."""
        rows = _jsonl_read(self.dir / "pairs.jsonl")
        prompts = sorted({r["prompt"] for r in rows})
        n_eval = max(1, int(round(len(prompts) * float(self.c.reward_model.eval_fraction))))
        order = np.random.default_rng(int(self.config.seed)).permutation(len(prompts))
        held = {prompts[i] for i in order[:n_eval]}
        out = self.dir / "rm_pairs"
        out.mkdir(exist_ok=True)
        _jsonl_write([r for r in rows if r["prompt"] in held], out / "test.jsonl")
        _jsonl_write([r for r in rows if r["prompt"] not in held], out / "train.jsonl")

    def _pair_data(self, path: str, **extra) -> dict:
        return dict({"source": "generic", "path": path, "tokenizer": self.tokenizer_dir,
                     "max_length": int(self.c.max_prefix_tokens) + int(self.c.max_new_tokens) + 2,
                     "max_prompt_length": int(self.c.max_prefix_tokens) + 1}, **extra)

    def reward_model_config(self) -> ml_collections.ConfigDict:
        m = self.c.reward_model
        return self.run_config(
            "reward",
            train={"steps": m.steps, "batch_size": m.batch_size, "eval_every": m.steps,
                   "eval_batch_size": m.batch_size, "checkpoint_every": m.steps},
            data=self._pair_data(str(self.dir / "rm_pairs"), train_split="train",
                                 eval_split="test", eval_size=0),
            init={"policy": str(self.dir / "sft"), "reference": ""},
            optim={"lr": m.lr, "name": "adamw", "warmup_steps": m.warmup_steps})

    def train_reward_model(self) -> None:
        from dpo_jax.reward_model import RewardRun

        RewardRun(self.reward_model_config(), str(self.dir / "reward_model")).train()

    def ppo_variants(self) -> dict[str, tuple[str, str, ml_collections.ConfigDict]]:
        """PPO against the learned reward model, one run per target KL, and PPO-GT (the
        ground-truth reward) per target KL: same code and settings (``imdb.ppo``), only the
        reward differs, plus the few fields ``imdb.ppo_gt`` overrides for PPO-GT."""
        tok = self.tokenizer
        eos = int(tok.eos_token_id)
        out = {}
        for method, kls in (("ppo", self.c.ppo_target_kls), ("ppo_gt", self.c.ppo_gt_target_kls)):
            p = self.c.ppo.to_dict()
            if method == "ppo_gt":
                p.update(self.c.get("ppo_gt", ml_collections.ConfigDict()).to_dict())
            every = int(p["eval_every"])
            train = {"steps": p["steps"], "batch_size": p["batch_size"], "eval_every": 0,
                     "checkpoint_every": every, "log_every": 1,
                     "keep_checkpoints": p["steps"] // every + 2}
            base = {"prompt_file": str(self.dir / "prefixes_train.jsonl"), "eval_prompt_file": "",
                    "prompt_width": int(self.c.max_prefix_tokens),
                    "max_new_tokens": int(self.c.max_new_tokens),
                    "temperature": float(self.c.temperature), "eos_id": eos, "pad_id": eos,
                    "init_kl_coef": float(p["init_kl_coef"]), "adaptive_kl": True,
                    "kl_horizon": int(p["kl_horizon"]), "epochs": int(p["epochs"]),
                    "minibatches": int(p["minibatches"]),
                    "detach_value_head": bool(p.get("detach_value_head", False))}
            for target in kls:
                reward = ({"reward": "model", "reward_model": str(self.dir / "reward_model")}
                          if method == "ppo" else
                          {"reward": "sentiment", "sentiment_path": self.c.reward_dir
                           or ("" if self.c.hub_reward else str(self.dir / "reward"))})
                out[f"{method}_kl{target:g}"] = (method, f"target_kl={target:g}", self.run_config(
                    "ppo", train=train, init={"policy": str(self.dir / "sft"), "reference": ""},
                    data={"tokenizer": self.tokenizer_dir,
                          "max_prompt_length": int(self.c.max_prefix_tokens)},
                    optim={"lr": p["lr"], "name": "adamw", "warmup_steps": p["warmup_steps"],
                           "max_grad_norm": p["max_grad_norm"]},
                    ppo=dict(base, target_kl=float(target), **reward)))
        return out

    def variants(self) -> dict[str, tuple[str, str, ml_collections.ConfigDict]]:
        """run name -> (method, setting, run config) for DPO betas and the baselines."""
        r = self.c.runs
        train = {"steps": r.steps, "batch_size": r.batch_size, "eval_every": r.eval_every,
                 "eval_batch_size": r.batch_size, "checkpoint_every": int(self.c.eval_every),
                 "keep_checkpoints": r.steps // int(self.c.eval_every) + 2}
        data = self._pair_data(str(self.dir / "pairs.jsonl"), eval_split="",
                               eval_size=r.eval_pairs)
        init = {"policy": str(self.dir / "sft"), "reference": ""}
        out = {}
        for beta in self.c.betas:
            out[f"dpo_beta{beta:g}"] = ("dpo", f"beta={beta:g}", self.run_config(
                "dpo", train=train, data=data, init=init, optim={"lr": r.lr, "name": r.optim,
                                                                 "warmup_steps": r.warmup_steps},
                loss={"name": "sigmoid", "beta": float(beta)}))
        for name in self.c.baselines:
            sft = {"source": "preference", "target": "response",
                   "objective": "unlikelihood" if name == "unlikelihood" else "nll",
                   "unlikelihood_alpha": float(self.c.unlikelihood_alpha)}
            lr = r.lr if name == "unlikelihood" else r.sft_lr
            out[name] = (name, "", self.run_config(
                "sft", train=train, data=data, init=init, sft=sft,
                optim={"lr": lr, "name": r.optim, "warmup_steps": r.warmup_steps}))
        return out

    def train_variant(self, name: str, method: str, config) -> None:
        workdir = str(self.dir / "runs" / name)
        if config.task == "ppo":
            from dpo_jax.ppo.rewards import text_reward
            from dpo_jax.ppo.run import PPORun

            tok = self.tokenizer
            # PPO-GT optimises exactly the pipeline's ground-truth reward object (the offline
            # classifier or the hub one); PPO builds its learned reward from the config.
            gt = (text_reward(self.reward, lambda ids: tok.decode(ids, skip_special_tokens=True))
                  if method == "ppo_gt" else None)
            PPORun(config, workdir, reward_fn=gt).train()
            return
        cls = train_lib.Run if config.task == "dpo" else sft_lib.SFTRun
        cls(config, workdir).train()

    def proxy_scores(self, rows: list[dict]) -> np.ndarray:
        """The learned reward model's score of sampled rows, through the same reward function
        PPO optimised (``model_reward``: prompt + completion + EOS, as the model was trained),
        to set PPO's proxy against the ground truth."""
        from dpo_jax.ppo.rewards import model_reward
        from dpo_jax.sampling import Samples

        eos = int(self.tokenizer.eos_token_id)
        if self._proxy is None:
            model, params = self._params(self.dir / "reward_model", head=True)
            self._proxy = model_reward(RewardModel(model), params, eos_id=eos)
        T = int(self.c.max_prefix_tokens) + int(self.c.max_new_tokens) + 1
        B = int(self.c.sample_batch)
        out = []
        for start in range(0, len(rows), B):
            chunk = rows[start:start + B]
            ids = np.full((B, T), eos, np.int32)
            mask = np.zeros((B, T), np.float32)
            mask[len(chunk):, 0] = 1  # filler rows: any valid position
            for i, r in enumerate(chunk):
                # completion_ids hold no EOS (the sampler's, if any, was dropped): restore it
                seq = list(r["prompt_ids"]) + list(r["completion_ids"]) + [eos]
                ids[i, :len(seq)] = seq
                mask[i, len(r["prompt_ids"]):len(seq)] = 1
            zeros = np.zeros((B,), np.int32)
            samples = Samples(tokens_BT=jnp.asarray(ids), completion_mask_BT=jnp.asarray(mask),
                              logps_BT=jnp.zeros((B, T)), lengths_B=jnp.asarray(zeros))
            out.append(np.asarray(self._proxy(samples))[:len(chunk)])
        return np.concatenate(out)

    def frontier_points(self, name: str, method: str, setting: str) -> None:
        """One point per saved checkpoint of run ``name`` on the held-out test prefixes (PPO
        points also carry ``proxy_reward``, the learned reward model's mean score)."""
        run_dir = self.dir / "runs" / name
        model, ref = self._params(self.dir / "sft")
        manager = ckpt_lib.Checkpointer(str(run_dir / "checkpoints"), async_save=False)
        steps = sorted(manager.manager.all_steps())
        manager.close()
        prompts = _jsonl_read(self.dir / "prefixes_test.jsonl")
        ppo = method.startswith("ppo")
        points, examples = [], []
        for step in steps:
            _, params = self._params(run_dir, step, head=ppo)
            if ppo:
                params = params["decoder"]
            rows = self.sample(params, prompts, int(self.c.eval_samples_per_prefix),
                               jax.random.key(1000 + step), ref_params=ref)
            points.append(self._point(method, setting, step, rows))
            if ppo and (self.dir / "reward_model" / "summary.json").exists():
                proxy = self.proxy_scores(rows)
                for r, v in zip(rows, proxy):
                    r["proxy_reward"] = float(v)
                points[-1]["proxy_reward"] = float(proxy.mean())
            examples = rows
        _jsonl_write(examples, run_dir / "test_samples.jsonl")
        _jsonl_write(points, run_dir / "frontier_points.jsonl")

    @staticmethod
    def _point(method, setting, step, rows) -> dict:
        kl = kl_estimate(np.array([r["policy_logp"] for r in rows]),
                         np.array([r["ref_logp"] for r in rows]))
        rewards = np.array([r["reward"] for r in rows])
        return {"method": method, "setting": setting, "step": int(step), "kl": kl.mean,
                "kl_stderr": kl.stderr, "mean_reward": float(rewards.mean()),
                "reward_stderr": float(rewards.std(ddof=1) / math.sqrt(len(rows)))}

    def sft_and_best_of_n(self) -> None:
        """SFT's own point (KL 0 up to MC noise) and Best-of-n of its samples, n in best_of_n."""
        model, ref = self._params(self.dir / "sft")
        prompts = _jsonl_read(self.dir / "prefixes_test.jsonl")
        k = max([int(self.c.eval_samples_per_prefix)] + [int(n) for n in self.c.best_of_n])
        rows = self.sample(ref, prompts, k, jax.random.key(999), ref_params=ref)
        points = [self._point("sft", "", 0, rows)]
        rewards = np.array([r["reward"] for r in rows]).reshape(len(prompts), k)
        for n in self.c.best_of_n:
            best = rewards[:, :int(n)].max(axis=1)
            points.append({"method": "best_of_n", "setting": f"n={int(n)}", "step": 0,
                           "kl": best_of_n_kl(int(n)), "kl_stderr": 0.0,
                           "mean_reward": float(best.mean()),
                           "reward_stderr": float(best.std(ddof=1) / math.sqrt(len(best)))})
        _jsonl_write(rows[::k], self.dir / "sft_test_samples.jsonl")
        _jsonl_write(points, self.dir / "sft_frontier_points.jsonl")

    def write_compute(self, variants: dict) -> dict:
        """``compute.json``: what each run cost to train (wall seconds of its training stage,
        optimizer steps, tokens through the policy with gradient, tokens sampled during
        training) and the stages it depends on. Frontier evaluation is reported apart (the
        same for every method)."""
        times = self.stage_seconds
        runs = {}
        for name, (method, setting, cfg) in variants.items():
            run_dir = self.dir / "runs" / name
            if not (run_dir / "summary.json").exists():
                continue
            summary = json.loads((run_dir / "summary.json").read_text())
            steps, B = int(summary["steps"]), int(cfg.train.batch_size)
            row = {"method": method, "setting": setting, "steps": steps,
                   "train_wall_s": times.get(f"train:{name}", summary.get("wall_s")),
                   "frontier_eval_s": times.get(f"frontier:{name}")}
            if method.startswith("ppo"):
                recs = [json.loads(x) for x in open(run_dir / "metrics.jsonl") if x.strip()]
                recs = [r for r in recs if "rollout/tokens" in r]
                scale = steps / max(len(recs), 1)  # log_every > 1: extrapolate the logged mean
                seq = sum(r["rollout/tokens"] for r in recs) * scale
                row.update(sampled_tokens=round(sum(r["completion/length"] for r in recs) * B * scale),
                           forward_tokens=round(2 * seq),  # rollout-time policy and reference
                           trained_tokens=round(seq * int(cfg.ppo.epochs)),
                           depends_on=["sft"] + (["samples", "pairs", "reward_model"]
                                                 if method == "ppo" else []))
            else:
                data = summary["data"]
                if "lengths" in data:  # preference batches: prompt + chosen + rejected
                    L = data["lengths"]
                    p, c, r = (L[k]["mean"] for k in ("prompt", "chosen", "rejected"))
                    per_pair = p + c if method == "preferred_ft" else 2 * p + c + r
                else:  # text examples (Preferred-FT: prompt + chosen)
                    per_pair = data["tokens"] / max(int(data["examples"]), 1)
                row.update(sampled_tokens=0, trained_tokens=round(steps * B * per_pair),
                           forward_tokens=round(steps * B * per_pair) if method == "dpo" else 0,
                           depends_on=["sft", "samples", "pairs"])
            runs[name] = row
        shared = {k: times.get(k) for k in ("tokenizer", "reward", "sft_data", "sft", "samples",
                                            "pairs", "reward_model")}
        out = {"stages": shared, "runs": runs,
               "note": "wall seconds on this machine; trained_tokens = real (unpadded) tokens "
                       "through the policy with gradient (DPO: from mean pair lengths); "
                       "forward_tokens = no-grad forwards (DPO reference; PPO rollout-time "
                       "policy + reference); sampled_tokens = tokens generated during training"}
        tmp = self.dir / "compute.json.tmp"
        tmp.write_text(json.dumps(out, indent=2))
        os.replace(tmp, self.dir / "compute.json")
        return out

    def write_frontier(self, names: list[str]) -> None:
        points = _jsonl_read(self.dir / "sft_frontier_points.jsonl")
        for name in names:
            points += _jsonl_read(self.dir / "runs" / name / "frontier_points.jsonl")
        kl_max = float(self.c.get("plot_kl_max", 0.0)) or None
        frontier_lib.write_frontier(points, self.dir, kl_max=kl_max)

    # ------------------------------------------------------------------ driver
    def run(self) -> dict[str, Any]:
        d = self.dir
        if not self.c.tokenizer:
            self._stage("tokenizer", [d / "tokenizer" / "tokenizer.json"], self.build_tokenizer)
        if not (self.c.reward_dir or self.c.hub_reward):
            self._stage("reward", [d / "reward" / "sentiment.npz"], self.build_reward)
        self._stage("sft_data", [d / "sft_data" / "train.jsonl.gz"], self.build_sft_data)
        self._stage("sft", [d / "sft" / "summary.json"], self.train_sft)
        self._stage("prefixes", [d / "prefixes_train.jsonl", d / "prefixes_test.jsonl"],
                    self.build_prefixes)
        self._stage("samples", [d / "samples_train.jsonl"], self.sample_train)
        self._stage("pairs", [d / "pairs.jsonl"], self.build_pairs)
        variants = self.variants()
        ppo = self.ppo_variants()
        if ppo:
            self._stage("rm_pairs", [d / "rm_pairs" / "train.jsonl", d / "rm_pairs" / "test.jsonl"],
                        self.build_rm_pairs)
            if any(m == "ppo" for m, _, _ in ppo.values()):
                self._stage("reward_model", [d / "reward_model" / "summary.json"],
                            self.train_reward_model)
        variants.update(ppo)
        for name, (method, setting, cfg) in variants.items():
            self._stage(f"train:{name}", [d / "runs" / name / "summary.json"],
                        lambda n=name, m=method, c=cfg: self.train_variant(n, m, c))
            self._stage(f"frontier:{name}", [d / "runs" / name / "frontier_points.jsonl"],
                        lambda n=name, m=method, s=setting: self.frontier_points(n, m, s))
        self._stage("frontier:sft", [d / "sft_frontier_points.jsonl"], self.sft_and_best_of_n)
        # Always re-assembled (cheap: it reads the per-run point files), so the CSV and plot
        # hold exactly the configured variants, also when a rerun adds a beta.
        self.write_frontier(list(variants))
        self.write_compute(variants)
        self.stages_run.append("frontier")
        summary = {"stages_run": self.stages_run, "stages_skipped": self.stages_skipped,
                   "frontier": [r for r in frontier_lib.read_frontier_csv(d / "frontier.csv")]}
        summary["frontier"] = [dict(p.__dict__) for p in summary["frontier"]]
        with open(d / "pipeline_summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        return summary


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """``config.task='imdb'`` entry point (see ``configs/imdb.py``)."""
    return ImdbPipeline(config, workdir).run()
