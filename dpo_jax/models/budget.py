"""Memory and FLOP budgets computed from configs (used to write docs/models.md).

Why here: sizes should be derived from the same `param_count` / `flops_per_token` the trainer
uses for MFU, not copied from model cards. `python -m dpo_jax.models.budget` prints the tables.
"""

from __future__ import annotations

from dpo_jax.models.config import PRESETS, flops_per_token, param_count, preset

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, None: 0}

# (label, policy param dtype, reference dtype or None). Gradients are held in the policy's
# param dtype; AdamW keeps two float32 moments (mu, nu) per policy parameter.
DTYPE_CHOICES = [
    ("f32 policy + f32 ref", "float32", "float32"),
    ("f32 policy + bf16 ref", "float32", "bfloat16"),
    ("bf16 policy + bf16 ref", "bfloat16", "bfloat16"),
    ("f32 policy, no ref", "float32", None),
    ("bf16 policy, no ref", "bfloat16", None),
]


def bytes_per_param(policy_dtype: str, ref_dtype: str | None, adam_moment_bytes: int = 8) -> int:
    """policy weights + gradients (policy dtype) + AdamW moments (2 x f32) + reference weights.

    Activations are excluded (they depend on batch, length and remat policy)."""
    p = _BYTES[policy_dtype]
    return p + p + adam_moment_bytes + _BYTES[ref_dtype]


def markdown_tables(seq_len: int = 2048) -> str:
    lines = ["| preset | family | params | matmul FLOPs/token (fwd+bwd) at "
             f"T={seq_len} | " + " | ".join(f"GB: {c[0]}" for c in DTYPE_CHOICES) + " |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in DTYPE_CHOICES) + " |"]
    for name in PRESETS:
        if name.startswith("tiny-"):
            continue
        cfg = preset(name)
        n = param_count(cfg)
        gb = [n * bytes_per_param(p, r) / 1e9 for _, p, r in DTYPE_CHOICES]
        lines.append(f"| {name} | {cfg.family} | {n:,} | {flops_per_token(cfg, seq_len):.3e} | "
                     + " | ".join(f"{g:,.2f}" for g in gb) + " |")
    lines += ["", "| dtype choice | bytes / parameter |", "| --- | ---: |"]
    lines += [f"| {label} | {bytes_per_param(p, r)} |" for label, p, r in DTYPE_CHOICES]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_tables())
