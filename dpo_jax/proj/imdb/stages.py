"""The IMDb pipeline's data stages: each a function of the experiment that writes its outputs
under the workdir (every file written whole or not at all: ``data.io.write_jsonl`` renames a
finished temporary file), so the stage runner can take an existing output as a finished stage.

  tokenizer -> reward -> sft_data -> prefixes -> samples -> pairs -> rm_pairs

(``samples`` needs the trained SFT model: ``runs.train_sft`` runs between sft_data and
prefixes.)
"""

from __future__ import annotations

import jax
import numpy as np

from dpo_jax.data.io import read_jsonl, write_jsonl
from dpo_jax.data.text import write_token_examples
from dpo_jax.proj.imdb.evaluate import sample
from dpo_jax.proj.imdb.experiment import Experiment
from dpo_jax.proj.imdb.pairs import build_pair_dataset, make_prefixes, write_pairs
from dpo_jax.proj.imdb.text import load_imdb
from dpo_jax.proj.imdb.tokenizer import build_imdb_tokenizer
from dpo_jax.proj.imdb.sentiment import train_sentiment


def _sft_splits(exp: Experiment) -> tuple[str, ...]:
    return ("train", "unsup") if exp.imdb.use_unsup else ("train",)


def build_tokenizer(exp: Experiment) -> None:
    """``tokenizer/``: the IMDb byte-level BPE on the SFT splits (never on test)."""
    c = exp.imdb
    build_imdb_tokenizer(c.data_dir, exp.workdir / "tokenizer", vocab_size=int(c.vocab_size),
                         splits=_sft_splits(exp), limit=int(c.max_reviews) or None)


def build_reward(exp: Experiment) -> None:
    """``reward/``: the offline ground-truth classifier fitted on IMDb train, with its test
    accuracy in its metadata."""
    c = exp.imdb
    texts, labels = load_imdb(c.data_dir, "train", limit=int(c.max_reviews) or None)
    model = train_sentiment(texts, labels, n_features=int(c.reward_features),
                            steps=int(c.reward_steps))
    test_texts, test_labels = load_imdb(c.data_dir, "test",
                                        limit=int(c.max_test_reviews) or None)
    model.meta["test_accuracy"] = model.accuracy(test_texts, test_labels)
    model.save(exp.workdir / "reward")


def build_sft_data(exp: Experiment) -> None:
    """``sft_data/{eval,train}.jsonl.gz``: reviews as token files. Each review (cut to
    ``sft_max_length`` - 1 tokens, then EOS) is scored entirely (``sft.target='text'``): the SFT
    model learns to write reviews. ``train`` is written last: it marks the stage finished."""
    c, tok = exp.imdb, exp.tokenizer
    n, eos = int(c.sft_max_length), int(tok.eos_token_id)

    def encode(texts: list[str]) -> list[dict]:
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return [{"response": list(x[: n - 1]) + [eos]} for x in ids]

    train = [r for s in _sft_splits(exp) for r in encode(exp.texts(s, c.max_reviews))]
    test = encode(exp.texts("test", c.max_test_reviews)[: int(c.sft_eval_size)])
    out = exp.workdir / "sft_data"
    out.mkdir(exist_ok=True)
    write_token_examples(test, str(out / "eval.jsonl.gz"))
    write_token_examples(train, str(out / "train.jsonl.gz"))


def build_prefixes(exp: Experiment) -> None:
    """``prefixes_{train,test}.jsonl``: the prompts, review prefixes of 2-8 tokens; train
    prefixes become preference pairs and PPO prompts, test prefixes the frontier's."""
    c = exp.imdb
    for split, n, seed, limit in (("train", c.num_train_prefixes, 0, c.max_reviews),
                                  ("test", c.num_test_prefixes, 1, c.max_test_reviews)):
        pre = make_prefixes(exp.texts(split, limit), exp.tokenizer, int(c.min_prefix_tokens),
                            int(c.max_prefix_tokens), seed)
        write_jsonl([{"prompt": p.text, "prompt_ids": list(p.token_ids),
                      "source": f"{split}:{p.source_index}"} for p in pre[: int(n)]],
                    exp.workdir / f"prefixes_{split}.jsonl")


def sample_train(exp: Experiment) -> None:
    """``samples_train.jsonl``: ``samples_per_prefix`` SFT completions per train prefix and
    their ground-truth rewards, one row per prefix."""
    params = exp.restore(exp.workdir / "sft")
    prompts = read_jsonl(exp.workdir / "prefixes_train.jsonl")
    k = int(exp.imdb.samples_per_prefix)
    rows = sample(exp, params, prompts, k, jax.random.key(int(exp.config.seed) + 1))
    write_jsonl([{"prompt": p["prompt"],
                  "completions": [r["completion"] for r in rows[i * k:(i + 1) * k]],
                  "rewards": [r["reward"] for r in rows[i * k:(i + 1) * k]]}
                 for i, p in enumerate(prompts)], exp.workdir / "samples_train.jsonl")


def build_pairs(exp: Experiment) -> None:
    """``pairs.jsonl``: every strictly preferred pair of each prefix's samples (ties dropped)."""
    groups = read_jsonl(exp.workdir / "samples_train.jsonl")
    pairs = build_pair_dataset([g["prompt"] for g in groups], [g["completions"] for g in groups],
                               [g["rewards"] for g in groups])
    write_pairs(pairs, exp.workdir / "pairs.jsonl")


def build_rm_pairs(exp: Experiment) -> None:
    """``rm_pairs/{train,test}.jsonl``: the DPO pairs split by PROMPT (a seeded fraction of the
    prompts held out), so the reward model's held-out accuracy is on unseen prompts."""
    rows = read_jsonl(exp.workdir / "pairs.jsonl")
    prompts = sorted({r["prompt"] for r in rows})
    n_eval = max(1, int(round(len(prompts) * float(exp.imdb.reward_model.eval_fraction))))
    order = np.random.default_rng(int(exp.config.seed)).permutation(len(prompts))
    held = {prompts[i] for i in order[:n_eval]}
    out = exp.workdir / "rm_pairs"
    write_jsonl([r for r in rows if r["prompt"] in held], out / "test.jsonl")
    write_jsonl([r for r in rows if r["prompt"] not in held], out / "train.jsonl")
