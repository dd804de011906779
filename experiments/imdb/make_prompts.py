"""Write IMDb review prefixes (2-8 tokens) as prompts: one jsonl row {prompt, prompt_ids, source}.

    python experiments/imdb/make_prompts.py --data=../shared/data/imdb --split=train \
        --tokenizer=runs/imdb/tokenizer --out=runs/imdb/prompts_train.jsonl [--limit=N]

The generation step (SFT sampler, not in this package) reads these, samples 4 completions per
prompt and writes {prompt, completions: [...]}, which make_pairs.py turns into labelled pairs.
"""

from __future__ import annotations

import argparse

from dpo_jax.data.io import write_jsonl
from dpo_jax.data.tokenize import load_tokenizer
from dpo_jax.proj.imdb.pairs import make_prefixes
from dpo_jax.proj.imdb.text import load_imdb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--tokenizer", required=True, help="tokenizer dir (IMDb BPE or GPT-2)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--min_tokens", type=int, default=2)
    ap.add_argument("--max_tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    texts, _ = load_imdb(args.data, args.split, limit=args.limit)
    prefixes = make_prefixes(texts, load_tokenizer(args.tokenizer), args.min_tokens,
                             args.max_tokens, args.seed)
    write_jsonl([{"prompt": p.text, "prompt_ids": list(p.token_ids),
                  "source": f"{args.split}:{p.source_index}"} for p in prefixes], args.out)
    print(f"wrote {len(prefixes)} prompts to {args.out}")


if __name__ == "__main__":
    main()
