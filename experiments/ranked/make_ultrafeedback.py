"""A small local file in UltraFeedback's rated-completions format (``openbmb/UltraFeedback``:
``instruction``, ``completions`` with ``response``, ``overall_score`` and per-aspect
``annotations``), built from the synthetic task's ranked lists, with a tokenizer that can
render its chat prompts. Nothing is downloaded; the real dataset loads through the same code
(``data.source='ultrafeedback'``, ``data.format='ranked'``, ``data.path=''`` = the hub).

Tokens become words (``w37``), an instruction is the prompt's words, a completion the
response's words; ``overall_score = 1 + 9 * true reward`` (UltraFeedback's 1-10 scale), and
the helpfulness / honesty ratings (1-5) round the same reward.

    python experiments/ranked/make_ultrafeedback.py --out=runs/uf_local \
        --tokenizer=../shared/data/gpt2_tokenizer

writes ``OUT/ultrafeedback.jsonl`` and ``OUT/tokenizer/`` (the given tokenizer with a minimal
chat template added: ``user: ...\\nassistant:``).
"""

from __future__ import annotations

import argparse
import os

from dpo_jax.data import synthetic, write_jsonl

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def words(tokens) -> str:
    return " ".join(f"w{int(t)}" for t in tokens if int(t) != synthetic.EOS_ID)


def rows(num_prompts: int, seed: int) -> list[dict]:
    lists = synthetic.make_ranked(synthetic.SyntheticTask(), num_prompts, seed, 4)
    out = []
    for it in lists:
        completions = []
        for r, s in zip(it["responses"], it["scores"]):
            rating = str(round(1 + 4 * float(s)))
            completions.append({
                "model": "synthetic", "response": words(r),
                "overall_score": round(1.0 + 9.0 * float(s), 2),
                "annotations": {"helpfulness": {"Rating": rating},
                                "honesty": {"Rating": rating}}})
        out.append({"source": "synthetic", "instruction": words(it["prompt"]),
                    "completions": completions})
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", required=True, help="a local tokenizer directory")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(rows(args.prompts, args.seed), os.path.join(args.out, "ultrafeedback.jsonl"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(os.path.join(args.out, "tokenizer"))
    print(f"wrote {args.prompts} rows to {args.out}/ultrafeedback.jsonl and {args.out}/tokenizer")


if __name__ == "__main__":
    main()
