"""The ``sft`` block of ``config.task='sft'`` (``dpo_jax/sft.py``): its schema and its reader,
declared beside the task and called once by ``config.read_config``
(``dpo_jax.tasks.TASK_BLOCKS``), so the task reads ``rc.task_block``.
"""

from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The ``sft`` block (see :func:`add_sft_config`), declared once: these defaults are the
    block's in :func:`default_sft_config` (token-mean NLL on the chosen responses)."""

    objective: str = "nll"  # nll | unlikelihood
    target: str = "response"  # response (prompt tokens unscored) | text (all tokens scored)
    source: str = "preference"  # preference: (prompt, chosen) of config.data | tokens: jsonl
    train_path: str = ""  # tokens source: jsonl(.gz) of {"prompt": [..], "response": [..]}
    eval_path: str = ""  # tokens source: held-out file ('' = no eval data)
    unlikelihood_alpha: float = 1.0  # weight of the unlikelihood term on rejected tokens

    @classmethod
    def from_config(cls, block) -> "SFTConfig":
        """The frozen ``sft`` block. Raises ValueError naming the field for an objective,
        target or source the task does not have."""
        cfg = cls(**{f.name: block[f.name] for f in dataclasses.fields(cls)})
        if cfg.objective not in ("nll", "unlikelihood"):
            raise ValueError(f"sft.objective must be 'nll' or 'unlikelihood', got "
                             f"{cfg.objective!r}")
        if cfg.target not in ("response", "text"):
            raise ValueError(f"sft.target must be 'response' or 'text', got {cfg.target!r}")
        if cfg.source not in ("preference", "tokens"):
            raise ValueError(f"sft.source must be 'preference' or 'tokens', got {cfg.source!r}")
        return cfg


def default_sft_config() -> ml_collections.ConfigDict:
    """The ``sft`` block with its defaults (:class:`SFTConfig`'s)."""
    return ml_collections.ConfigDict(dataclasses.asdict(SFTConfig()))


def add_sft_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the ``sft`` block to a base config and select the SFT task (returns ``c``)."""
    c.task = "sft"
    c.sft = default_sft_config()
    return c


def read_sft(config: ml_collections.ConfigDict) -> SFTConfig:
    """The ``sft`` block of run config ``config`` (:meth:`SFTConfig.from_config`); a config
    without one takes :func:`default_sft_config`."""
    return SFTConfig.from_config(config.get("sft") or default_sft_config())
