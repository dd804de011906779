"""Write a trained policy back as a Hugging Face model directory.

    python -m dpo_jax.export --workdir=runs/hh --out=exported/hh [--step=N]

Reads the run's ``config.json`` (model shape, HF source, tokenizer) and its newest (or the
given) checkpoint, and writes ``config.json``, ``model.safetensors`` and, when the run used a
tokenizer, its files, so ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads it.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import app, flags

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax.models import Model, model_config_from
from dpo_jax.models.hf import save_hf

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to export from.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (HF format).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")


def export_run(workdir: str, out: str, step: int | None = None) -> str:
    """Export ``workdir``'s policy at ``step`` to ``out``; returns ``out``."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a dpo_jax run directory?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model = Model(model_config_from(config.model))
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu),
                        model.abstract_params())
    params = ckpt_lib.restore_params(workdir, like, step=step)
    tokenizer = None
    name = config.data.tokenizer or config.model.hf_path
    if name:
        from dpo_jax.data import load_tokenizer

        tokenizer = load_tokenizer(name)
    save_hf(out, model.cfg, params, tokenizer=tokenizer)
    return out


def main(argv):
    del argv
    print(export_run(_WORKDIR.value, _OUT.value, _STEP.value))


if __name__ == "__main__":
    app.run(main)
