"""DPO with LoRA adapters (dpo_jax/lora.py): the policy is a frozen base plus rank-16 adapters
on every projection and the LM head, the reference is the base with the adapters off (one copy
of the base).

    python -m dpo_jax.main --config=configs/lora_dpo.py --workdir=runs/lora_dpo

The base is ``init.policy`` (another run's workdir), ``model.hf_path`` or, by default, the
seeded random model. Variants:
  * ``from_sft``: the base is the LoRA SFT run of ``configs/lora_sft.py`` in ``runs/lora_sft``
    (``--config.init.policy=DIR`` for another), its adapters merged in: new DPO adapters stacked
    on the merged SFT model, which is the reference (the paper's two-stage recipe);
  * ``full``: rank 0, every parameter trained (with ``from_sft``: DPO on the merged SFT model,
    the SFT model as reference);
  * ``quick``: a short run for smoke tests.
"""

from dpo_jax.config import apply_variants, base_config, short_run


def _from_sft(config) -> None:
    config.init.policy = "runs/lora_sft"


def _full(config) -> None:
    config.model.lora.rank = 0
    config.optim.lr = 1e-3


def get_config(arg: str = ""):
    config = base_config()
    # every projection and the LM head's output side: this small model's embedding (tied to
    # its head) stays frozen otherwise, which bounds how far any token's log-prob can move
    config.model.lora.update(rank=16, alpha=16.0, targets="all,lm_head")
    config.optim.lr = 3e-3  # adapters start at zero update: a larger step than full fine-tuning
    return apply_variants(config, arg, {"from_sft": _from_sft, "full": _full,
                                        "quick": short_run(60)}, "configs/lora_dpo.py")
