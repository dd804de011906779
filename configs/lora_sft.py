"""Stage 1 of the paper's recipe with LoRA: supervised fine-tuning of low-rank adapters on the
chosen responses of the synthetic preference task (dpo_jax/lora.py, dpo_jax/sft.py).

    python -m dpo_jax.main --config=configs/lora_sft.py --workdir=runs/lora_sft

Then ``configs/lora_dpo.py:from_sft`` (new adapters on the merged SFT model) or
``configs/lora_dpo.py:from_sft,full`` (every parameter of the merged SFT model) runs DPO with
the SFT model, its adapters merged into its base, as the reference.
Variants: ``quick`` (a short run for smoke tests).
"""

from dpo_jax.config import apply_variants, base_config, short_run
from dpo_jax.sft import add_sft_config


def get_config(arg: str = ""):
    config = add_sft_config(base_config())
    config.model.lora.update(rank=16, alpha=16.0, targets="all")
    config.optim.lr = 3e-3  # adapters start at zero update: a larger step than full fine-tuning
    config.train.update(steps=100, eval_every=50, checkpoint_every=50)
    return apply_variants(config, arg, {"quick": short_run(20)}, "configs/lora_sft.py")
