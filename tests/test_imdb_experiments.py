"""The experiments/imdb glue scripts, end to end on synthetic data (no real data needed)."""

from __future__ import annotations

import json
import runpy
import sys

import numpy as np

from dpo_jax.proj.imdb import sentiment
from dpo_jax.proj.imdb.pairs import read_pairs
from dpo_jax.proj.imdb.tokenizer import save_tokenizer, train_bpe
from tests._imdb_common import synthetic_reviews

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def run_script(name: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(ROOT / "experiments" / "imdb" / name), run_name="__main__")


def test_prompts_samples_pairs_frontier(tmp_path, monkeypatch, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, labels = synthetic_reviews(300, seed=0)
    data = tmp_path / "imdb"
    data.mkdir()
    pq.write_table(pa.table({"text": texts, "label": labels}), data / "train-0.parquet")
    save_tokenizer(train_bpe(texts, vocab_size=300), tmp_path / "tok")
    sentiment.train_sentiment(texts, labels, n_features=2**12, steps=50).save(tmp_path / "rw")

    run_script("make_prompts.py", [f"--data={data}", f"--tokenizer={tmp_path / 'tok'}",
                                   f"--out={tmp_path / 'prompts.jsonl'}", "--limit=20"],
               monkeypatch)
    prompts = [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 20 and all(2 <= len(p["prompt_ids"]) <= 8 for p in prompts)

    # stand-in for the sampler: 4 completions per prompt, one duplicated to force a tie
    comps = [" wonderful superb", " awful boring", " the plot", " the plot"]
    with (tmp_path / "samples.jsonl").open("w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p["prompt"], "completions": comps}) + "\n")
    run_script("make_pairs.py", [f"--samples={tmp_path / 'samples.jsonl'}",
                                 f"--reward={tmp_path / 'rw'}",
                                 f"--out={tmp_path / 'pairs.parquet'}"], monkeypatch)
    rows = read_pairs(tmp_path / "pairs.parquet")
    assert len(rows) == 20 * 5  # 6 pairs minus the tie
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    assert rows[0]["chosen"] == " wonderful superb"

    pts = tmp_path / "points.jsonl"
    pts.write_text("".join(json.dumps({"method": "dpo", "setting": f"beta={b}", "step": 1,
                                       "kl": 1 / b, "mean_reward": float(np.log(1 / b))}) + "\n"
                           for b in (0.05, 0.1, 0.5)))
    run_script("plot_frontier.py", [str(pts), f"--out={tmp_path / 'fr'}"], monkeypatch)
    assert (tmp_path / "fr" / "frontier.png").stat().st_size > 0
    assert len((tmp_path / "fr" / "frontier.csv").read_text().splitlines()) == 4
