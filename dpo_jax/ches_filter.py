"""The CHES data filter (``data.ches_filter``): drop or down-weight the train pairs whose chosen
and rejected responses the starting model sees as most alike.

Razin et al. 2024 (arXiv 2410.08847, Section 6) score every training pair by its CHES score
(Definition 2) or its length-normalised form under the model before training, and train on the
pairs of lowest score: high-CHES pairs drive likelihood displacement (the chosen response's
log-probability falling). Here:

1. :func:`ches_scores_of` scores every train pair in one forward-only pass of the starting
   policy (``reference.pair_pass``; the hidden-state sums of ``logprobs.sequence_logps``,
   ``diagnostics.ches_scores``), stored under ``cache_dir`` by the fingerprint of everything
   the scores depend on (``reference.fingerprint``: pairs, tokenizer, parameters' checksum,
   model and log-prob settings), so a rerun or resume loads them;
2. :func:`flagged` marks the pairs scoring above the ``quantile`` of the scores (numpy's linear
   quantile; ties at the threshold are kept);
   With ``score='random'`` (the control experiment) the pairs are flagged by uniform random
   scores drawn with ``seed`` instead: the same fraction goes, chosen without regard to CHES;
3. :func:`apply` drops them (``mode='drop'``) or multiplies their pair weight by ``weight``
   (``mode='downweight'``: the loss and metrics weigh them less, ``pair_weight``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from dpo_jax import reference as ref_lib
from dpo_jax.data.config import ChesFilterConfig
from dpo_jax.diagnostics import ches_scores
from dpo_jax.step import StepConfig, sequence_stats
from dpo_jax.train_state import param_checksum

SUBDIR = "ches_scores"  # the cache directory's conventional name inside a run's workdir


def compute_ches(model, params, pairs: Sequence[Mapping[str, np.ndarray]], data_cfg,
                 step_cfg: StepConfig, mesh, batch_size: int, pad_id: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(ches_N, ln_ches_N)`` float32 of each pair under ``params`` (``diagnostics.ches_scores``
    of the hidden-state sums of the forward-only log-prob pass), one ``reference.pair_pass``."""

    def forward(p, batch, max_scored):
        s = sequence_stats(model, p, batch, step_cfg, max_scored, forward_only=True,
                           with_hidden=True)
        B = s.lengths.shape[0] // 2
        return ches_scores(s.hidden_sums[:B], s.hidden_sums[B:], s.lengths[:B], s.lengths[B:])

    ches, ln_ches = ref_lib.pair_pass(forward, params, pairs, data_cfg, step_cfg, mesh,
                                      batch_size, pad_id)
    return ches.astype(np.float32), ln_ches.astype(np.float32)


def ches_scores_of(model, params, pairs: Sequence[Mapping[str, np.ndarray]], *, data_cfg,
                   step_cfg: StepConfig, mesh, batch_size: int, cache_dir: str,
                   tokenizer_name: str = "", pad_id: int = 0,
                   source: Mapping[str, Any] | None = None
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``({'ches': [N], 'ln_ches': [N]}, {'path', 'fingerprint', 'reused'})``: the scores of
    ``pairs`` under the model ``params`` (its starting policy), loaded from ``cache_dir`` or
    computed (:func:`compute_ches`) and stored there as ``<fingerprint[:32]>.npz``.
    ``source``: where the parameters came from (JSON-able), fingerprinted with them."""
    fp = ref_lib.fingerprint({"train": pairs}, tokenizer_name=tokenizer_name, pad_id=pad_id,
                             ref_source={"scores": "ches", **dict(source or {})},
                             ref_checksum=param_checksum(params), model_config=model.cfg,
                             logprob_config=step_cfg.forward_logprobs)
    path = os.path.join(cache_dir, f"{fp[:32]}.npz")

    def compute() -> dict[str, np.ndarray]:
        ches, ln_ches = compute_ches(model, params, pairs, data_cfg, step_cfg, mesh,
                                     batch_size, pad_id)
        return {"ches": ches, "ln_ches": ln_ches}

    arrays, reused = ref_lib.load_or_compute(path, compute)
    return arrays, {"path": path, "fingerprint": fp, "reused": reused}


def flagged(scores_N: np.ndarray, quantile: float) -> tuple[np.ndarray, float]:
    """``(bool [N], threshold)``: the pairs whose score is above ``np.quantile(scores_N,
    quantile)`` (linear interpolation; a score equal to it is kept)."""
    scores_N = np.asarray(scores_N, np.float64)
    threshold = float(np.quantile(scores_N, quantile))
    return scores_N > threshold, threshold


def apply(pairs: list[dict], scores: Mapping[str, np.ndarray], cfg: ChesFilterConfig
          ) -> tuple[list[dict], np.ndarray, dict[str, Any]]:
    """``(pairs after the filter, kept [N] bool, stats)`` for ``cfg.mode`` 'drop' (the flagged
    pairs removed, the others in order) or 'downweight' (every pair kept, the flagged ones'
    ``weight`` multiplied by ``cfg.weight``). ``scores``: :func:`ches_scores_of`'s arrays; the
    filter reads ``scores[cfg.score]``, or for ``cfg.score='random'`` :func:`random_scores`
    (the stats then also give the kept pairs' mean ln-CHES, to compare with the CHES filter).
    Raises ValueError for another mode or a score array of another length."""
    for name, array in scores.items():
        if np.shape(array) != (len(pairs),):
            raise ValueError(f"data.ches_filter: {np.shape(array)[0]} {name} scores for "
                             f"{len(pairs)} pairs")
    score = (random_scores(len(pairs), cfg.seed) if cfg.score == "random"
             else np.asarray(scores[cfg.score]))
    out, threshold = flagged(score, cfg.quantile)
    if cfg.mode == "drop":
        kept = ~out
        new = [p for p, k in zip(pairs, kept) if k]
    elif cfg.mode == "downweight":
        kept = np.ones(len(pairs), bool)
        new = [{**p, "weight": float(p.get("weight", 1.0)) * cfg.weight} if o else p
               for p, o in zip(pairs, out)]
    else:
        raise ValueError(f"data.ches_filter.mode={cfg.mode!r}: expected 'drop' or 'downweight'")
    stats = {"mode": cfg.mode, "score": cfg.score, "quantile": cfg.quantile,
             "threshold": threshold, "flagged": int(out.sum()), "pairs_before": len(pairs),
             "pairs_after": len(new), "score_mean": float(score.mean()),
             "score_mean_after": float(score[kept].mean()) if kept.any() else None}
    if cfg.mode == "downweight":
        stats["weight"] = cfg.weight
    if cfg.score == "random":
        ln = np.asarray(scores["ln_ches"], np.float64)
        stats.update(seed=cfg.seed, ln_ches_mean=float(ln.mean()),
                     ln_ches_mean_after=float(ln[kept].mean()) if kept.any() else None)
    return new, kept, stats


def random_scores(n: int, seed: int) -> np.ndarray:
    """[n] float64 uniform on [0, 1) from ``numpy.random.default_rng(seed)``: the scores of the
    ``score='random'`` control, so :func:`flagged` picks a seeded random ``1 - quantile`` of
    the pairs (the same count as a CHES filter at that quantile, up to ties)."""
    return np.random.default_rng(seed).random(n)
