"""Quantisation error of a real model's log-probs (QLoRA's base, dpo_jax/models/quant.py):
SmolLM2-135M-Instruct on held-out Anthropic HH pairs, the base stored in float32, bfloat16,
int8 and NF4 (``model.lora.base_quant``; adapters off: the reference of a QLoRA run).

    python experiments/qlora/logprob_error.py [--pairs=32] [--batch=8]

Data as ``configs/hh.py`` (the chat-rendered held-out split, prompt + response <= 256 tokens;
the first ``--pairs`` pairs); compute in float32 for every variant, so the differences are those
of the stored weights. Prints one JSON line: per variant against the bfloat16 base, the summed
response log-prob's mean absolute difference (nats per sequence and per response token), the
reference margin ``log p(chosen) - log p(rejected)``'s mean absolute difference and the share
of pairs whose margin changes sign; and per projection the relative Frobenius error of the
weights against bfloat16. Numbers: experiments/qlora/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import hh  # noqa: E402
from dpo_jax import lora as lora_lib  # noqa: E402
from dpo_jax.config import read_config  # noqa: E402
from dpo_jax.data.loading import load_tokenised_pairs  # noqa: E402
from dpo_jax.models import load_hf_params, quant  # noqa: E402
from dpo_jax.models.local import SMOLLM2, find_local_model  # noqa: E402
from dpo_jax.sharding import make_mesh  # noqa: E402
from dpo_jax.step import StepConfig, sequence_stats  # noqa: E402
from tests import helpers as h  # noqa: E402

VARIANTS = ("float32", "bfloat16", "int8", "nf4")


def measure(pairs: int, batch: int) -> tuple[dict, dict, list, object]:
    """(the JSON summary, {variant: summed response log-probs [pairs, 2] (chosen, rejected)},
    the pairs, the float32 parameters)."""
    path = find_local_model(SMOLLM2)
    if path is None:
        raise FileNotFoundError(f"{SMOLLM2} not found under $DPO_JAX_MODELS "
                                "(bash ../shared/models/smollm2.sh)")
    rc = read_config(hh.get_config("smollm2"))
    items, _ = load_tokenised_pairs(rc.data, "eval")
    items = items[:pairs]
    cfg = dataclasses.replace(rc.model, dtype="float32", param_dtype="float32", remat="none")
    f32 = load_hf_params(path, cfg)
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    sc = StepConfig()
    out = {"pairs": len(items), "model": SMOLLM2, "variants": {}, "weight_rel_error": {}}
    logps = {}
    for name in VARIANTS:
        quant_kind = name if name in ("int8", "nf4") else "none"
        model = lora_lib.LoraModel(
            dataclasses.replace(cfg, param_dtype="float32" if name == "float32" else "bfloat16"),
            lora_lib.LoraConfig(rank=1, base_quant=quant_kind))
        base = jax.jit(lambda p: model.quantize_base(jax.tree.map(
            lambda x: x.astype(model.cfg.param_dtype), p)))(f32)
        fwd = jax.jit(lambda p, b, m: sequence_stats(model, p, b, sc, m, forward_only=True),
                      static_argnums=2)
        sums, lengths = [], []
        for i in range(0, len(items), batch):
            b, ms = h.device_batch(h.pair_batch(items[i:i + batch], buckets="auto"), mesh)
            st = fwd(base, b, ms)
            n = len(items[i:i + batch])
            lp, ln = np.asarray(st.logps), np.asarray(st.lengths)
            sums.append(np.stack([lp[:n], lp[n:2 * n]], 1))
            lengths.append(np.stack([ln[:n], ln[n:2 * n]], 1))
        logps[name] = np.concatenate(sums)  # [pairs, 2]: chosen, rejected
        lens = np.concatenate(lengths)
        if quant_kind != "none":
            back = model.dequantize_base(base)
            for proj, (p, _) in quant.projections(cfg, f32).items():
                w16 = f32
                w = back
                for k in p:
                    w16, w = w16[k], w[k]
                w16 = w16.astype(jnp.bfloat16).astype(jnp.float32)
                out["weight_rel_error"].setdefault(proj, {})[name] = round(float(
                    jnp.linalg.norm(w.astype(jnp.float32) - w16) / jnp.linalg.norm(w16)), 5)
    ref = logps["bfloat16"]
    for name in VARIANTS:
        d = logps[name] - ref
        margin = logps[name][:, 0] - logps[name][:, 1]
        ref_margin = ref[:, 0] - ref[:, 1]
        out["variants"][name] = {
            "mean_abs_dlogp_per_seq": round(float(np.abs(d).mean()), 4),
            "mean_abs_dlogp_per_token": round(float((np.abs(d) / lens).mean()), 5),
            "mean_abs_logp_per_token": round(float((np.abs(logps[name]) / lens).mean()), 4),
            "mean_abs_dmargin": round(float(np.abs(margin - ref_margin).mean()), 4),
            "mean_abs_margin_bf16": round(float(np.abs(ref_margin).mean()), 4),
            "margin_sign_flips": int(np.sum(np.sign(margin) != np.sign(ref_margin)))}
    return out, logps, items, f32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    print(json.dumps(measure(args.pairs, args.batch)[0]), flush=True)


if __name__ == "__main__":
    main()
