"""Targeted mutation testing of the modules that decide numbers; run by hand, outside CI.

    python tests/mutation/run_mutations.py                  # HEAD's dpo_jax/ and tests/
    python tests/mutation/run_mutations.py --rev d77c00c    # another commit's code and tests
    python tests/mutation/run_mutations.py --worktree       # the working tree as it is now
    python tests/mutation/run_mutations.py --only step.,optim.   # mutants whose id starts so
    python tests/mutation/run_mutations.py --list           # print the mutants, run nothing

Each mutant replaces one exact snippet of one module (an operator, a sign, a slice bound, an
argument order, a dropped term) by a plausible bug. The tree under test (``dpo_jax/``,
``tests/``, ``configs/``) is copied into a temporary directory once; a mutant is written into
that copy only, the test files that concern its module run there (``pytest -x``, with a
timeout, ``PYTHONPATH`` pointing at the copy, no bytecode written so an edited module is
always re-read), and the file is restored. The repository is never modified.

A mutant is *killed* when its tests fail (or error, or time out) and *survives* when they
pass. A test file that does not exist in the tree (older commits) is left out; one that fails
without any mutant is reported and left out too. A mutant whose snippet is not in the tree
(the module changed) is reported as ``n/a``. Results: tests/README.md ("Mutation testing").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Test files per module group, fastest and most targeted first (pytest -x stops at the first
# failure, so a killed mutant usually costs seconds). test_train.py's end-to-end learning run
# and its resume test are left out for time.
TESTS = {
    "losses": ["tests/test_losses.py", "tests/test_step.py"],
    "logprobs": ["tests/test_logprobs.py", "tests/test_step.py"],
    "step": ["tests/test_step.py", "tests/test_optim.py", "tests/test_train.py"],
    "optim": ["tests/test_optim.py", "tests/test_step.py", "tests/test_train.py"],
    "tokenize": ["tests/test_data_tokenize.py", "tests/test_data_sources.py"],
    "batching": ["tests/test_data_batching.py", "tests/test_step.py"],
    "pipeline": ["tests/test_data_batching.py", "tests/test_step.py"],
    "loop": ["tests/test_resume.py", "tests/test_step.py"],
    "metrics": ["tests/test_metric_goldens.py", "tests/test_plackett_luce.py", "tests/test_kto.py"],
    "bounds": ["tests/test_layout_bounds.py", "tests/test_data_batching.py",
               "tests/test_prefix_sharing.py"],
    "lora": ["tests/test_lora_scale.py", "tests/test_lora.py"],
    "stops": ["tests/test_sampling_stops.py"],
    "prompts": ["tests/test_prompt_file.py", "tests/test_sampling_stops.py"],
    "batchsz": ["tests/test_batch_sizes.py"],
    "ktokl": ["tests/test_kto_data.py", "tests/test_layout_bounds.py"],
    "loraref": ["tests/test_lora_reference.py"],
    "overlap": ["tests/test_data_overlap.py"],
    "hfdir": ["tests/test_hf_dirs.py", "tests/test_hf_configs.py"],
    "precheck": ["tests/test_config.py", "tests/test_hf_dirs.py", "tests/test_batch_sizes.py"],
}
DESELECT = [
    "tests/test_train.py::test_offline_default_learns_the_synthetic_task",
    "tests/test_train.py::test_resume_after_interruption_equals_uninterrupted_run",
]

# The file(s) a group's mutants edit; of several, the first holding the snippet (code moves:
# the eval padding weight lives in pipeline.py at older commits, in stream.py later).
FILES = {
    "losses": ("dpo_jax/losses/core.py", "dpo_jax/losses/terms.py"),
    "logprobs": ("dpo_jax/logprobs.py",),
    "step": ("dpo_jax/step.py", "dpo_jax/batch_format.py", "dpo_jax/optim.py"),
    "optim": ("dpo_jax/optim.py",),
    "tokenize": ("dpo_jax/data/tokenize.py",),
    "batching": ("dpo_jax/data/batching.py",),
    "pipeline": ("dpo_jax/data/pipeline.py", "dpo_jax/data/stream.py"),
    "loop": ("dpo_jax/loop.py", "dpo_jax/checkpoint.py", "dpo_jax/workdir.py",
             "dpo_jax/metrics.py", "dpo_jax/eval_metrics.py"),
    "metrics": ("dpo_jax/losses/listwise.py", "dpo_jax/losses/kto.py", "dpo_jax/step.py",
                "dpo_jax/losses/core.py"),
    "bounds": ("dpo_jax/data/prefix.py", "dpo_jax/data/ranked.py", "dpo_jax/data/unpaired.py",
               "dpo_jax/data/pipeline.py", "dpo_jax/data/batching.py"),
    "lora": ("dpo_jax/lora.py",),
    "stops": ("dpo_jax/data/tokenize.py", "dpo_jax/data/prompts.py", "dpo_jax/sampling.py",
              "dpo_jax/eval_config.py", "dpo_jax/evaluation.py"),
    "prompts": ("dpo_jax/data/tokenize.py", "dpo_jax/data/prompts.py"),
    "batchsz": ("dpo_jax/batch_sizes.py", "dpo_jax/preference_data.py",
                "dpo_jax/data/pipeline.py", "dpo_jax/workdir.py"),
    "ktokl": ("dpo_jax/data/unpaired.py",),
    "loraref": ("dpo_jax/state.py", "dpo_jax/lora.py"),
    "overlap": ("dpo_jax/data/checks.py", "dpo_jax/data/pipeline.py", "dpo_jax/data/stream.py",
                "dpo_jax/data/loading.py"),
    "hfdir": ("dpo_jax/models/hf_fields.py", "dpo_jax/models/hf_dir.py", "dpo_jax/models/hf.py"),
    "precheck": ("dpo_jax/config.py", "dpo_jax/workdir.py"),
}


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str  # "<group>.<name>"; the group selects the file and the tests
    old: str | tuple[str, ...]  # must occur exactly once; a tuple: variants for older code,
    new: str | tuple[str, ...]  # the first variant found is applied
    what: str

    @property
    def group(self) -> str:
        return self.id.split(".")[0]

    def variants(self) -> list[tuple[str, str]]:
        if isinstance(self.old, str):
            return [(self.old, self.new)]
        return list(zip(self.old, self.new))

    def locate(self, root: str) -> tuple[str, str, str] | None:
        """(path, old, new) of the first file and variant where ``old`` occurs exactly once."""
        for rel in FILES[self.group]:
            path = os.path.join(root, rel)
            if not os.path.exists(path):
                continue
            text = open(path).read()
            for old, new in self.variants():
                if text.count(old) == 1:
                    return path, old, new
        return None


M = Mutant
MUTANTS = [
    # ------------------------------------------------------------------ dpo_jax/losses/core.py
    M("losses.mean_counts_padding",
      "return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1e-12)",
      "return jnp.sum(x * weights) / x.shape[0]", "weighted mean divides by all pairs"),
    M("losses.log_ratios_swapped", "return c.pi_w - c.ref_w, c.pi_l - c.ref_l",
      "return c.pi_l - c.ref_l, c.pi_w - c.ref_w", "chosen and rejected log-ratios swapped"),
    M("losses.rewards_without_beta", "return _sg(c.cfg.beta * c_w), _sg(c.cfg.beta * c_l)",
      "return _sg(c_w), _sg(c_l)", "DPO rewards without beta"),
    M("losses.cdpo_sign", "loss = (1.0 - eps) * loss - eps * jax.nn.log_sigmoid(-z)",
      "loss = (1.0 - eps) * loss + eps * jax.nn.log_sigmoid(-z)", "cDPO smoothing sign"),
    M("losses.logistic_argument", "loss = -jax.nn.log_sigmoid(z)\n",
      "loss = -jax.nn.log_sigmoid(-z)\n", "-log sigma(-z) for -log sigma(z)"),
    M("losses.sigmoid_h_sign",
      ("        h = _score_margin(c)\n        rw, rl = _dpo_rewards(c)",
       "        h = c_w - c_l\n        rw, rl = _dpo_rewards(c)"),
      ("        h = -_score_margin(c)\n        rw, rl = _dpo_rewards(c)",
       "        h = c_l - c_w\n        rw, rl = _dpo_rewards(c)"), "DPO h = c_l - c_w"),
    M("losses.sigmoid_without_beta",
      "_Part(_smoothed_logistic(beta * h, c.cfg.label_smoothing or 0.0), rw, rl, {})",
      "_Part(_smoothed_logistic(h, c.cfg.label_smoothing or 0.0), rw, rl, {})",
      "DPO formula without beta"),
    M("losses.hinge_margin", ("jax.nn.relu(1.0 - c.cfg.beta * _score_margin(c))",
                              "jax.nn.relu(1.0 - c.cfg.beta * (c_w - c_l))"),
      ("jax.nn.relu(-c.cfg.beta * _score_margin(c))", "jax.nn.relu(-c.cfg.beta * (c_w - c_l))"),
      "hinge without its margin"),
    M("losses.ipo_length", ("c_w / c.len_w, c_l / c.len_l, s_w / c.len_w, s_l / c.len_l",
                            "c_l = (c.pi_l - c.ref_l) / c.len_l"),
      ("c_w / c.len_w, c_l / c.len_l, s_w / c.len_w, s_l / c.len_w",
       "c_l = (c.pi_l - c.ref_l) / c.len_w"), "IPO rejected average over the chosen length"),
    M("losses.bco_delta_count", "jnp.maximum(2.0 * jnp.sum(w), 1e-12)",
      "jnp.maximum(jnp.sum(w), 1e-12)", "BCO delta divided by B, not 2B"),
    M("losses.bco_delta_padding", "jnp.sum(w * (rw + rl))", "jnp.sum(rw + rl)",
      "BCO delta sums padding pairs"),
    M("losses.aot_unsorted_reference",
      ("delta = p[order_p] - r[order_r]", "delta = x[order_x] - y[order_y]"),
      ("delta = p[order_p] - r[order_p]", "delta = x[order_x] - y[order_x]"),
      "AOT reference not sorted separately"),
    M("losses.padding_sorts_first", "jnp.lexsort((x, is_pad))", "jnp.lexsort((is_pad, x))",
      "AOT sort key order (padding mixed into ranks)"),
    M("losses.orpo_odds_sign", "(avg_w - avg_l) - (_log1mexp(avg_w) - _log1mexp(avg_l))",
      "(avg_w - avg_l) + (_log1mexp(avg_w) - _log1mexp(avg_l))", "ORPO log-odds sign"),
    M("losses.log1mexp_branch", "x > -0.6931471805599453", "x < -0.6931471805599453",
      "log1mexp branches swapped (same function, less accurate)"),
    M("losses.rdpo_length_sign", "(c.len_w - c.len_l)", "(c.len_l - c.len_w)",
      "R-DPO length penalty sign"),
    M("losses.length_not_clipped",
      "len_w=jnp.maximum(jnp.asarray(policy.chosen_lengths, f32), 1.0)",
      "len_w=jnp.asarray(policy.chosen_lengths, f32)", "zero lengths of padding not clipped"),
    M("losses.rewards_from_first", "reward_from = next((n for n in cfg.names if n != \"sft\"), "
      "cfg.names[0])", "reward_from = cfg.names[0]", "rewards from sft when listed first"),
    M("losses.extras_count_padding",
      "extras[key] = value if value.ndim == 0 else weighted_mean(_sg(value), ctx.weights)",
      "extras[key] = value if value.ndim == 0 else jnp.mean(_sg(value))",
      "extras averaged over padding pairs"),
    M("losses.combination_unweighted", "total = total + w * part.losses",
      "total = total + part.losses", "combined losses without their weights"),
    # ------------------------------------------------------------------ dpo_jax/logprobs.py
    M("logprobs.targets_not_shifted", "targets = input_ids_RL[:, 1:]",
      "targets = input_ids_RL[:, :-1]", "targets not shifted by one"),
    M("logprobs.mask_shift", "targets = input_ids_RL[:, 1:]\n    mask = loss_mask_RL[:, 1:]",
      "targets = input_ids_RL[:, 1:]\n    mask = loss_mask_RL[:, :-1]",
      "mask shifted the wrong way"),
    M("logprobs.bf16_running_sum",
      "running_sum = jnp.exp(logits - chunk_max[..., None]).sum(-1)",
      "running_sum = jnp.exp(logits - chunk_max[..., None]).astype(h_RCD.dtype).sum(-1)",
      "online logsumexp accumulated in the input dtype (bf16)"),
    M('logprobs.bf16_logits', 'logits = project(h_RCD, w_VD[start:end], None if b_V is None else b_V[start:end],\n                         softcap)',
      'logits = project(h_RCD, w_VD[start:end], None if b_V is None else b_V[start:end],\n                         softcap).astype(h_RCD.dtype)',
      'vocabulary-slice logits rounded to the input dtype'),
    M("logprobs.no_rescale", "running_sum = running_sum * jnp.exp(running_max - new_max) + ",
      "running_sum = running_sum + ", "online sum not rescaled to the new max"),
    M("logprobs.in_chunk_bound", "(targets_RC >= start) & (targets_RC < end)",
      "(targets_RC > start) & (targets_RC < end)", "first token of a vocabulary slice missed"),
    M("logprobs.max_with_gradient",
      "chunk_max = jax.lax.stop_gradient(logits.max(axis=-1))",
      "chunk_max = logits.max(axis=-1)", "running max carries a gradient"),
    M("logprobs.chunk_unpad", "reshape(rows, n * chunk)[:, :length]",
      "reshape(rows, n * chunk)[:, pad:pad + length]", "sequence-chunk padding cut from the front"),
    M("logprobs.compact_unscored_first", "jnp.argsort(mask_RL <= 0, axis=1, stable=True)",
      "jnp.argsort(mask_RL > 0, axis=1, stable=True)", "compaction keeps unscored positions"),
    M("logprobs.packed_slot_zero", "slot = jnp.where(mask > 0, index, num_seqs)",
      "slot = jnp.where(mask > 0, index, 0)", "unscored packed tokens summed into slot 0"),
    M("logprobs.bound_halved", "1 << (most - 1).bit_length()",
      "1 << (most - 1).bit_length() - 1", "max_scored bound below the most scored tokens"),
    # ------------------------------------------------------------------ dpo_jax/step.py
    M("step.pairs_swapped", "chosen, rejected = jnp.split(x_S, 2)",
      "rejected, chosen = jnp.split(x_S, 2)", "rows split into rejected, chosen"),
    M('step.reference_with_gradient', '        return jax.lax.stop_gradient(reference() if callable(reference) else reference)',
      '        return reference() if callable(reference) else reference',
      'reference log-probs without stop_gradient'),
    M("step.ties_are_wins", "jnp.sum(w * (out.chosen_rewards > out.rejected_rewards))",
      "jnp.sum(w * (out.chosen_rewards >= out.rejected_rewards))", "reward ties count as wins"),
    M("step.logps_chosen_from_rejected", "\"logps/chosen\": jnp.sum(w * policy.chosen_logps)",
      "\"logps/chosen\": jnp.sum(w * policy.rejected_logps)", "logps/chosen of the rejected"),
    M("step.loss_sum_unweighted", "\"loss\": jnp.sum(w * out.losses)",
      "\"loss\": jnp.sum(out.losses)", "padding pairs' losses summed"),
    M("step.eval_weight_counts_padding",
      ("sums[\"weight\"] = jnp.sum(batch[\"pair_weight\"])",
       "jnp.sum(weights.astype(jnp.float32)))"),
      ("sums[\"weight\"] = jnp.float32(batch[\"pair_weight\"].shape[0])",
       "jnp.float32(weights.shape[0]))"),
      "eval denominator counts padding pairs"),
    M('step.train_weight_counts_padding', 'totals=lambda batch: jnp.maximum(jnp.sum(batch["pair_weight"]), 1e-9),',
      'totals=lambda batch: jnp.float32(batch["pair_weight"].shape[0]),',
      'train denominator counts padding pairs'),
    M('step.accum_divided_twice', '        (grads, metrics), _ = jax.lax.scan(body, zeros, jnp.arange(grad_accum))\n',
      '        (grads, metrics), _ = jax.lax.scan(body, zeros, jnp.arange(grad_accum))\n        grads = jax.tree.map(lambda g: g / grad_accum, grads)\n',
      'accumulated gradients divided by n again'),
    M("step.micro_contiguous", "axis=len(lead) + 1, keepdims=False",
      "axis=len(lead), keepdims=False", "micro-batches contiguous instead of strided"),
    M('step.nonfinite_policy_dropped', 'grad_accum=cfg.grad_accum, split=fmt.split,\n                           on_nonfinite=on_nonfinite)',
      'grad_accum=cfg.grad_accum, split=fmt.split,\n                           on_nonfinite="error")',
      'on_nonfinite not passed to the update'),
    M('step.packed_num_seqs', 'return batch["seq_index"], self.num_slots(batch) * self.num_examples(batch)',
      'return batch["seq_index"], self.num_examples(batch)',
      'packed batches: B sequence slots'),
    M("step.forward_tiling_swapped",
      ("cfg.forward_logprobs if forward_only else cfg.logprobs",
       "cfg.no_grad_logprobs if forward_only else cfg.logprobs"),
      ("cfg.logprobs if forward_only else cfg.forward_logprobs",
       "cfg.logprobs if forward_only else cfg.no_grad_logprobs"),
      "forward-only and training head tilings swapped"),
    # ------------------------------------------------------------------ dpo_jax/optim.py
    M("optim.clip_after_optimizer", "parts.insert(0, optax.clip_by_global_norm(",
      "parts.append(optax.clip_by_global_norm(", "gradient clipping after the optimizer"),
    M("optim.clip_off", "if cfg.max_grad_norm > 0:", "if cfg.max_grad_norm < 0:",
      "gradient clipping never applied"),
    M("optim.warmup_from_zero", "(step + 1.0) / (warmup + 1.0)", "step / (warmup + 1.0)",
      "warmup starts at lr 0"),
    M("optim.grad_norm_after_clip", "metrics = {\"grad_norm\": grad_norm,",
      "metrics = {\"grad_norm\": optax.tree.norm(updates),", "grad_norm of the update"),
    M('optim.skip_keeps_new', 'keep(params, state.trainable), keep(opt_state, state.opt_state)',
      'keep(state.trainable, params), keep(opt_state, state.opt_state)',
      'skip inverted for params'),
    M('optim.skip_updates_moments', 'keep(params, state.trainable), keep(opt_state, state.opt_state)',
      'keep(params, state.trainable), opt_state',
      'skip still updates the optimizer state'),
    M("optim.finite_ignores_grads",
      ("finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)\n",
       "finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)\n"),
      ("finite = jnp.isfinite(loss)\n", "finite = jnp.isfinite(loss)\n"),
      "non-finite gradients (and updated parameters) not flagged"),
    M("optim.lr_of_next_step", "\"lr\": schedule(state.step)", "\"lr\": schedule(state.step + 1)",
      "lr reported for the next step"),
    M("optim.rmsprop_eps_in_sqrt", "eps_in_sqrt=False", "eps_in_sqrt=True",
      "RMSprop eps inside the sqrt (not PyTorch's)"),
    M("optim.adamw_decays_vectors", "x.ndim >= 2", "x.ndim >= 1",
      "AdamW weight decay on biases and norms"),
    # ------------------------------------------------------------------ dpo_jax/data/tokenize.py
    M("tokenize.no_bos", "        return [self.bos] + ids", "        return ids",
      "BOS never added"),
    M("tokenize.double_bos_kept", "while ids[1:2] == [self.bos]:",
      "while ids[2:3] == [self.bos]:", "a doubled BOS kept"),
    M("tokenize.truncation_side", "body = body[-n:] if c.truncation_mode == \"keep_end\" else "
      "body[:n]", "body = body[:n] if c.truncation_mode == \"keep_end\" else body[-n:]",
      "keep_end and keep_start swapped"),
    M("tokenize.response_cut_one_short", "n = c.max_length - len(prompt)\n",
      "n = c.max_length - len(prompt) - 1\n", "responses cut one token shorter than needed"),
    M("tokenize.bos_budget", "(prompt[1:], c.max_prompt_length - 1) if keep_bos",
      "(prompt[1:], c.max_prompt_length) if keep_bos", "kept BOS not counted in the budget"),
    M("tokenize.eos_not_appended", ("        return ids + [self.eos]\n",
                                     "return list(ids[:keep]) + [end]"),
      ("        return ids\n", "return list(ids[:keep])"), "no end token appended"),
    # ------------------------------------------------------------------ dpo_jax/data/batching.py
    M("batching.mask_scores_last_prompt_token", "mask[r, o + max(p_len, 1):o + n] = 1.0",
      "mask[r, o + max(p_len, 1) - 1:o + n] = 1.0", "last prompt token scored"),
    M("batching.mask_drops_eos", "mask[r, o + max(p_len, 1):o + n] = 1.0",
      "mask[r, o + max(p_len, 1):o + n - 1] = 1.0", "final (EOS) token not scored"),
    M("batching.positions_from_one", "pos[r, o:o + n] = np.arange(n)",
      "pos[r, o:o + n] = np.arange(1, n + 1)", "positions start at 1"),
    M("batching.first_segment_is_padding", "next_seg[r] = next_seg.get(r, 0) + 1",
      "next_seg[r] = next_seg.get(r, 0)", "first segment id 0 (= padding)"),
    M("batching.rejected_length_is_chosen",
      "lengths[:, 0] + lengths[:, 1], lengths[:, 0] + lengths[:, 2]",
      "lengths[:, 0] + lengths[:, 1], lengths[:, 0] + lengths[:, 1]",
      "rejected sequence lengths taken from chosen"),
    M("batching.no_max_bucket", "    out.add(round_up(int(a.max()), multiple))\n", "\n",
      "largest bucket not forced to cover the longest batch"),
    M("batching.pack_overlap", "        free[r] -= n\n", "        free[r] -= n - 1\n",
      "packed sequences overlap by one token"),
    M("batching.packed_slot_index", "sidx[r, o + max(p_len, 1):o + n] = s",
      "sidx[r, o + max(p_len, 1):o + n] = s % max(1, len(plan.row) // 2)",
      "packed rejected tokens credited to the chosen slot"),
    # ------------------------------------------------------------------ dpo_jax/data/pipeline.py
    M("pipeline.responses_swapped",
      ("resp = pair[\"chosen\"] if s < B else pair[\"rejected\"]",
       "resp = pair[\"chosen\"] if s < self.B else pair[\"rejected\"]"),
      ("resp = pair[\"rejected\"] if s < B else pair[\"chosen\"]",
       "resp = pair[\"rejected\"] if s < self.B else pair[\"chosen\"]"),
      "the batch puts rejected responses in the chosen rows"),
    M("pipeline.padding_weighted", "weight = (idx >= 0).astype(np.float32)",
      "weight = np.ones(idx.shape, np.float32)", "eval padding pairs weigh 1"),
    # ------------------------------------------ the loop's resume and eval (loop, checkpoint, ...)
    M("loop.log_cut_one_step_late", "writer.truncate_after(start)",
      "writer.truncate_after(start + 1)", "the resumed log keeps a record past the checkpoint"),
    M("loop.log_not_cut", "writer.truncate_after(start)", "pass",
      "the resumed log is not cut back to the checkpoint"),
    M("loop.host_state_not_restored", "obj.load_state_dict(json_states[name])",
      "obj.load_state_dict(json_states[name]) if name != 'data' else None",
      "the batch stream's position is not restored"),
    M("loop.log_window_not_restored", "obj.load_state_dict(json_states[name])",
      "obj.load_state_dict(json_states[name]) if name != 'loop' else None",
      "the log window (interval means, skipped count) is not restored"),
    M("loop.window_mean_off_by_one", "mean = {k: v / max(self.count, 1)",
      "mean = {k: v / max(self.count + 1, 1)", "interval means divide by one too many"),
    M("loop.eval_weight_off", ('weight = max(totals.pop("weight", 0.0), 1e-9)',
                               "num / max(den, MIN_DENOMINATOR)"),
      ('weight = max(totals.pop("weight", 0.0), 1e-9) + 1.0',
       "num / (max(den, MIN_DENOMINATOR) + 1.0)"), "eval means over a wrong count"),
    M("loop.nonfinite_ignored", 'bad = metrics.get("nonfinite", 0.0) > 0', "bad = False",
      "non-finite steps are neither stopped nor counted"),
    M("loop.flush_after_checkpoint",
      "if pending is not None:  # a checkpoint never runs ahead of the metrics log",
      "if False:", "a checkpoint is written before its step's metrics are logged"),
    M("loop.restore_oldest_first", "for step in reversed(steps):", "for step in steps:",
      "restore starts from the oldest checkpoint"),
    M("loop.changed_config_accepted", "if refused and has_state:", "if False:",
      "a resume with a changed config is accepted"),
    M("loop.tensorboard_not_rebuilt", "                self._add_scalars(r)\n",
      "                pass\n", "TensorBoard is emptied, not rebuilt, on resume"),
    # ------------------------------ logged metrics of every loss (issue 37 item 1; listwise, kto)
    M("metrics.ranked_tied_neighbours_ordered", "(rank_BK[:, 1:] > rank_BK[:, :-1])",
      "(rank_BK[:, 1:] >= rank_BK[:, :-1])", "ranked accuracy counts tied neighbours as ordered"),
    M("metrics.ranked_masked_neighbour", "valid_BK[:, :-1] & valid_BK[:, 1:] & (rank_BK",
      "valid_BK[:, :-1] & (rank_BK", "ranked accuracy compares a response with an empty slot"),
    M("metrics.ranked_accuracy_not_strict", "rewards_BK[:, :-1] > rewards_BK[:, 1:]",
      "rewards_BK[:, :-1] >= rewards_BK[:, 1:]", "ranked accuracy counts equal rewards"),
    M("metrics.ranked_last_slot",
      "return jnp.take_along_axis(x_BK, last_B[:, None], axis=-1)[:, 0]", "return x_BK[:, -1]",
      "rejected = the list's last slot, not its last real response"),
    M("metrics.ranked_last_real_off_by_one",
      "last_B = jnp.max(jnp.where(jnp.asarray(mask_BK) > 0, jnp.arange(K), 0), axis=-1)",
      "last_B = jnp.sum(jnp.asarray(mask_BK) > 0, axis=-1) % K",
      "last real slot = the count of real slots (one past it)"),
    M("metrics.ranked_logps_rejected_last_slot",
      "rejected_logps=last_real(logps_BK, mask_BK)", "rejected_logps=logps_BK[:, -1]",
      "logps/rejected of a list's last slot"),
    M("metrics.rank_mean_counts_padding", "wk = w_B * mask_BK[:, k]", "wk = mask_BK[:, k]",
      "rewards/rank_k averaged over padding prompts"),
    M("metrics.rank_mean_counts_empty_slots", "wk = w_B * mask_BK[:, k]", "wk = w_B",
      "rewards/rank_k averaged over empty slots"),
    M("metrics.kto_accuracy_against_zero", "c_B > z0, c_B < z0", "c_B > 0, c_B < 0",
      "KTO accuracy compared with 0 instead of z0"),
    M("metrics.kto_accuracy_tie_desirable", "c_B > z0, c_B < z0", "c_B >= z0, c_B < z0",
      "KTO accuracy: a desirable completion at z0 counts as right"),
    M("metrics.kto_accuracy_counts_padding",
      "\"rewards/accuracies\": _label_mean(_sg(right_B), w_B)",
      "\"rewards/accuracies\": jnp.mean(_sg(right_B))", "KTO accuracy over padding examples"),
    M("metrics.kto_rejected_over_all", "\"rewards/rejected\": _label_mean(r_B, wu)",
      "\"rewards/rejected\": _label_mean(r_B, w_B)", "KTO rewards/rejected over every label"),
    M("metrics.kto_logps_rejected_of_kl", "\"logps/rejected\": _label_mean(_sg(pi), wu)",
      "\"logps/rejected\": _label_mean(_sg(policy.rejected_logps), wu)",
      "KTO logps/rejected of the mismatched KL completions"),
    M("metrics.kto_count_counts_padding", "\"count/desirable\": _label_mean(good_B, w_B)",
      "\"count/desirable\": jnp.mean(good_B)", "count/desirable over padding examples"),
    M("metrics.kto_margins_sign", "extras[\"rewards/chosen\"] - extras[\"rewards/rejected\"]",
      "extras[\"rewards/rejected\"] - extras[\"rewards/chosen\"]", "KTO margin sign"),
    M("metrics.margins_unweighted",
      "\"rewards/margins\": jnp.sum(w * (out.chosen_rewards - out.rejected_rewards))",
      "\"rewards/margins\": jnp.sum(out.chosen_rewards - out.rejected_rewards)",
      "rewards/margins summed over padding pairs"),
    M("metrics.logps_rejected_of_chosen", "\"logps/rejected\": jnp.sum(w * policy.rejected_logps)",
      "\"logps/rejected\": jnp.sum(w * policy.chosen_logps)", "logps/rejected of the chosen"),
    M("metrics.scalar_extras_not_scaled",
      "sums[k] = jnp.sum(w * v) if jnp.ndim(v) else v * jnp.sum(w)",
      "sums[k] = jnp.sum(w * v) if jnp.ndim(v) else v",
      "scalar extras (kl, bco_delta, ...) divided by the total weight"),
    M("metrics.orpo_extras_swapped",
      "{\"nll_loss\": nll, \"log_odds_chosen\": log_odds, \"log_odds_ratio\": log_sig}",
      "{\"nll_loss\": nll, \"log_odds_chosen\": log_sig, \"log_odds_ratio\": log_odds}",
      "ORPO's two log-odds diagnostics swapped"),
    M("metrics.sigmoid_norm_rewards_summed",
      "_Part(losses, _sg(beta * c_w / c.len_w), _sg(beta * c_l / c.len_l), {})",
      "_Part(losses, _sg(beta * c_w), _sg(beta * c_l), {})",
      "sigmoid_norm rewards not length-normalised"),
    M("metrics.sft_rewards_with_beta",
      "_Part(nll, _sg(c.pi_w / c.len_w), _sg(c.pi_l / c.len_l), {\"nll_loss\": nll})",
      "_Part(nll, _sg(c.cfg.beta * c.pi_w / c.len_w), _sg(c.cfg.beta * c.pi_l / c.len_l), "
      "{\"nll_loss\": nll})", "sft rewards scaled by beta"),
    M("metrics.wpo_weight_counts_padding",
      "extras[\"wpo_weight\"] = weighted_mean(wpo, ctx.weights)",
      "extras[\"wpo_weight\"] = jnp.mean(wpo)", "wpo_weight averaged over padding pairs"),
    M("metrics.component_loss_counts_padding",
      "extras[f\"loss/{name}\"] = weighted_mean(_sg(part.losses), ctx.weights)",
      "extras[f\"loss/{name}\"] = jnp.mean(_sg(part.losses))",
      "loss/<name> averaged over padding pairs"),
    # ------------------------------------ length bounds of every layout (issue 37 item 2)
    M("bounds.prefix_unit_one_restated_token",
      "(prompt - has_prompt) + (responses + has_prompt[:, None]).sum(axis=1)",
      "(prompt - has_prompt) + responses.sum(axis=1) + has_prompt",
      "prefix-shared pair unit: one restated prompt token, not one per response"),
    M("bounds.prefix_unit_one_over", "return (prompt - has_prompt) + (responses",
      "return prompt + (responses", "prefix-shared pair unit one column too long"),
    M("bounds.slot_unit_shared_whole_prompt", "shared = self.lengths[idx, 0] - 1",
      "shared = self.lengths[idx, 0]", "prefix-shared list/unpaired unit: K - 1 columns short"),
    M("bounds.slot_unit_empty_slots", "np.where(seq_BK > 0, seq_BK - shared[:, None], 0)",
      "np.where(seq_BK >= 0, seq_BK - shared[:, None], 0)",
      "prefix-shared list unit: empty slots subtract the prompt"),
    M("bounds.ranked_slot_one_short", "np.where(lens[:, 1:] > 0, lens[:, :1] + lens[:, 1:], 0)",
      "np.where(lens[:, 1:] > 0, lens[:, :1] + lens[:, 1:] - 1, 0)",
      "ranked/unpaired sequence length one short"),
    M("bounds.unpaired_bound_one_short",  # variants: before / after issue 36's KL partners
      ("return int(min(lens[:, 0].max() + lens[:, 1].max(), self.cfg.max_length))",
       "return int(min(lens[:, 0].max() + longest, self.cfg.max_length))"),
      ("return int(min(lens[:, 0].max() + lens[:, 1].max(), self.cfg.max_length - 1))",
       "return int(min(lens[:, 0].max() + longest, self.cfg.max_length - 1))"),
      "unpaired bound one under max_length"),
    M("bounds.unpaired_bound_uncut",
      ("return int(min(lens[:, 0].max() + lens[:, 1].max(), self.cfg.max_length))",
       "return int(min(lens[:, 0].max() + longest, self.cfg.max_length))"),
      ("return int(lens[:, 0].max() + lens[:, 1].max())",
       "return int(lens[:, 0].max() + longest)"),
      "unpaired bound ignores the max_length cut (a bucket too long)"),
    M("bounds.unpaired_prefix_bound_short",
      ("lens[:, 0].max() + 1 + 2 * lens[:, 1].max()",
       "lens[:, 0].max() + 1 + lens[:, 1].max() + longest"),
      ("lens[:, 0].max() + 2 * lens[:, 1].max()", "lens[:, 0].max() + lens[:, 1].max() + longest"),
      "prefix-shared unpaired bound one short"),
    M("bounds.unpaired_kl_cut_one_over", "keep = max(int(self.cfg.max_length) - len(prompt), 1)",
      "keep = max(int(self.cfg.max_length) - len(prompt) + 1, 1)",
      "KL completion cut one token past max_length"),
    M("bounds.unpaired_kl_plan_one_over", "np.maximum(self.cfg.max_length, lens[:, 0] + 1)",
      "np.maximum(self.cfg.max_length + 1, lens[:, 0] + 1)",
      "KL sequence planned one token past max_length"),
    M("bounds.unpaired_bound_check_off_by_one",
      ("if bound > self.buckets[-1]:", "            if longest > buckets[-1]:"),
      ("if bound > self.buckets[-1] + 1:", "            if longest > buckets[-1] + 1:"),
      "auto buckets: a unit one over epoch 0's batches (unpaired pairings of a later epoch; "
      "since h-ktokl also a pair dropped from epoch 0) not added"),
    M("bounds.given_buckets_check_off_by_one", "elif longest > buckets[-1]:",
      "elif longest > buckets[-1] + 1:", "longest unit one over the given buckets not added"),
    M("bounds.pack_length_accepts_one_over", "if cfg.packing and self.pack_length < longest:",
      "if cfg.packing and self.pack_length < longest - 1:",
      "pack_length one under the longest unit accepted"),
    M("bounds.pack_length_refuses_exact", "if cfg.packing and self.pack_length < longest:",
      "if cfg.packing and self.pack_length <= longest:",
      "pack_length equal to the longest unit refused"),
    M("bounds.pick_bucket_strict", "        if b >= length:", "        if b > length:",
      "a unit exactly at a bucket goes to the next one"),
    # ------------------------------------------------- LoRA scaling (issue 37 item 3)
    M("lora.scale_alpha", "        return self.alpha / self.rank\n",
      "        return self.alpha\n", "LoRA scale alpha (rank ignored)"),
    M("lora.scale_rslora", "        return self.alpha / self.rank\n",
      "        return self.alpha / math.sqrt(self.rank)\n", "rank-stabilised scale alpha/sqrt(r)"),
    M("lora.scale_inverted", "        return self.alpha / self.rank\n",
      "        return self.rank / self.alpha\n", "LoRA scale rank / alpha"),
    M("lora.adapter_scale_dropped", "return (y_NO * jnp.asarray(self.scale, dt))",
      "return (y_NO)", "layer adapters unscaled"),
    M("lora.adapter_scale_alpha", "self.lora.scale, rate))", "self.lora.alpha, rate))",
      "layer adapters scaled by alpha"),
    M("lora.head_scale_dropped",
      "w = w + (self.lora.scale * (ab[\"a\"] @ ab[\"b\"])).T.astype(w.dtype)",
      "w = w + (ab[\"a\"] @ ab[\"b\"]).T.astype(w.dtype)", "LM head adapter unscaled"),
    M("lora.merge_scale_dropped", "d = scale * jnp.matmul(a_LIR, b_LRO)",
      "d = jnp.matmul(a_LIR, b_LRO)", "merge (export) without the scale"),
    # ------------------- issue 36's fixes and issue 28 items 1 / 7 (this round's new code)
    # stop ids: the data's end tokens, the sampler's stop test, stopped_B, completion_kl
    M("stops.turn_end_only", "return first + tuple(sorted(self.end_ids - set(first)))",
      "return first or tuple(sorted(self.end_ids))",
      "stop set: the turn end alone when there is one (EOS-ended text responses never stop)"),
    M("stops.eos_only", "return first + tuple(sorted(self.end_ids - set(first)))",
      "return (self.eos,)", "stop set: EOS only (the old single eos_id)"),
    M("stops.eos_first", "first = () if self.turn_end is None else (self.turn_end,)",
      "first = ()", "stop set order: EOS before the turn end (the judge appends stop_ids[0])"),
    M("stops.override_ignored", "    if ids:\n        return ids\n",
      "    if False:\n        return ids\n", "an explicit eval/online/ppo stop_ids ignored"),
    M("stops.synthetic_none", "        return data_cfg.spec.end_ids", "        return ()",
      "synthetic task: no stop token"),
    M("stops.eval_override_dropped",
      "stop_ids=stop_ids(read_run_data(config), block.get(\"stop_ids\", ())",
      "stop_ids=stop_ids(read_run_data(config), ()",
      "a block's stop_ids (eval, online, ppo) not read"),
    M("stops.all_not_any", "jnp.any(token_B[:, None] == stop_S[None, :], axis=1)",
      "jnp.all(token_B[:, None] == stop_S[None, :], axis=1)",
      "a row stops only at a token equal to every stop id"),
    M("stops.first_id_only", "jnp.any(token_B[:, None] == stop_S[None, :], axis=1)",
      "jnp.any(token_B[:, None] == stop_S[None, :1], axis=1)", "only the first stop id stops"),
    M("stops.stopped_from_length", "stopped_B=done_B)",
      "stopped_B=jnp.sum(live_BN, axis=1) < N)",
      "stopped_B from the length (a stop token as the last allowed token reads 'truncated')"),
    M("stops.kl_sign", "jnp.sum((samples.logps_BT - ref_logps_BT) * samples.completion_mask_BT",
      "jnp.sum((ref_logps_BT - samples.logps_BT) * samples.completion_mask_BT",
      "completion_kl of pi_ref against pi"),
    M("stops.kl_over_sequence",
      "jnp.sum((samples.logps_BT - ref_logps_BT) * samples.completion_mask_BT",
      "jnp.sum((samples.logps_BT - ref_logps_BT) * sequence_mask(samples, prompt_lengths_B)",
      "completion_kl summed over prompt + completion (the reference's prompt log-probs)"),
    M("stops.truncated_inverted", "\"samples/truncated\": float(1.0 - drawn[\"stopped\"].mean())",
      "\"samples/truncated\": float(drawn[\"stopped\"].mean())",
      "samples/truncated is the stopped fraction"),
    # the prompt path: prompt files get the training prompt's tokens; doubled assistant header
    M("prompts.no_bos", "            ids = self.finish_prompt(list(raw))\n",
      "            ids = list(raw)\n", "a sampled prompt without the BOS training prompts get"),
    M("prompts.whitespace_not_moved",
      "return [chat[i] if i in chat else list(self._text_prompt(p)[1])",
      "return [chat[i] if i in chat else self._ids([p])[0]",
      "a text prompt tokenised as given (trailing whitespace not moved)"),
    M("prompts.chat_without_generation_prompt",
      "chat = dict(zip(chat_at, self._ids([self._render(prompts[i], True) for i in chat_at])))",
      "chat = dict(zip(chat_at, self._ids([self._render(prompts[i], False) for i in chat_at])))",
      "message prompts rendered without the generation prompt"),
    M("prompts.cut_at_exact_length", "                if len(ids) > self.cfg.max_prompt_length:",
      "                if len(ids) >= self.cfg.max_prompt_length:",
      "a prompt exactly max_prompt_length long treated as too long"),
    M("prompts.prompt_ids_uncut", "out[i] = np.asarray(r[\"prompt_ids\"], np.int32)[-keep:]",
      "out[i] = np.asarray(r[\"prompt_ids\"], np.int32)", "prompt_ids rows not cut"),
    M("prompts.prompt_ids_keep_start", "out[i] = np.asarray(r[\"prompt_ids\"], np.int32)[-keep:]",
      "out[i] = np.asarray(r[\"prompt_ids\"], np.int32)[:keep]",
      "prompt_ids rows keep their start"),
    M("prompts.empty_prompt_kept", "        if out[i].size == 0:", "        if out[i].size < 0:",
      "an empty prompt row (no token) kept"),
    M("prompts.header_no_rstrip", "if ptext.rstrip().endswith(header):",
      "if ptext.endswith(header):", "doubled header: the prompt's trailing newline hides it"),
    M("prompts.header_no_lstrip", "if not header or not text.lstrip().startswith(header):",
      "if not header or not text.startswith(header):",
      "doubled header: a response starting with whitespace then the header passes"),
    M("prompts.header_list_first_response",
      "self.check_response_start(item.prompt, text, field=field,",
      "self.check_response_start(item.prompt, texts[0], field=field,",
      "doubled header: only an item's first response (a list's best, a pair's chosen) checked"),
    M("prompts.header_text_prompt_unchecked",
      "ptext = self._render(prompt, True) if isinstance(prompt, list) else prompt",
      "ptext = self._render(prompt, True) if isinstance(prompt, list) else \"\"",
      "doubled header: a pre-rendered text prompt never checked"),
    # batch sizes against the mesh; packed rows padded to the data-parallel size
    M("batchsz.processes_ignored",
      "return math.lcm(math.prod(sizes[a] for a in BATCH_AXES), int(process_count))",
      "return math.prod(sizes[a] for a in BATCH_AXES)", "data-parallel size ignores processes"),
    M("batchsz.all_axes",
      "return math.lcm(math.prod(sizes[a] for a in BATCH_AXES), int(process_count))",
      "return math.lcm(math.prod(sizes.values()), int(process_count))",
      "data-parallel size counts the model-parallel axes too"),
    M("batchsz.minus_one_all_devices", "dims[dims.index(-1)] = device_count // known",
      "dims[dims.index(-1)] = device_count", "a -1 mesh axis read as every device"),
    M("batchsz.precompute_ignored", "if int(t.get(\"eval_every\", 0) or 0) or precompute:",
      "if int(t.get(\"eval_every\", 0) or 0):",
      "eval_batch_size unchecked when only reference log-probs are precomputed"),
    M("batchsz.eval_size_unresolved",
      "sizes.append((\"train.eval_batch_size\", int(t.eval_batch_size or batch)))",
      "sizes.append((\"train.eval_batch_size\", int(t.eval_batch_size)))",
      "eval_batch_size=0 (= batch_size) not resolved"),
    M("batchsz.suggest_upper_only", "near = sorted({v for v in (low, low + multiple) if v > 0})",
      "near = sorted({v for v in (low + multiple,) if v > 0})",
      "the suggested values omit the multiple below"),
    M("batchsz.accum_suggestion_ignores_mesh", "use {_works(batch, math.lcm(accum, dp))}",
      "use {_works(batch, accum)}", "grad_accum suggestion not a multiple of the mesh"),
    M("batchsz.accum_packing_unchecked", "for field in (\"packing\", \"prefix_sharing\"):",
      "for field in (\"prefix_sharing\",):", "packing with grad_accum > 1 not refused"),
    M('batchsz.ppo_minibatches_unchecked', '        if batch % (mb * accum):',
      '        if False:',
      'ppo.minibatches not checked'),
    M("batchsz.rows_not_padded_to_mesh",
      "row_multiple=1 if mesh is None else shard_lib.num_batch_shards(mesh))",
      "row_multiple=1)", "packed rows not padded to the data-parallel size"),
    M("batchsz.pipeline_row_multiple_dropped",
      "math.lcm(int(cfg.row_multiple), int(row_multiple), process_count)",
      "math.lcm(int(cfg.row_multiple), process_count)",
      "the pipeline drops the mesh's row multiple"),
    M("batchsz.check_not_run",
      "    check_model_dirs(config)\n    read_config(config)\n    check_batch_sizes(config)\n",
      "    check_model_dirs(config)\n    read_config(config)\n",
      "batch sizes not checked before the workdir is written"),
    # KTO's KL completions: never the example's own
    M("ktokl.next_not_previous", "in_batch = (int(idx[(j - k) % B]) for k in range(1, B))",
      "in_batch = (int(idx[(j + k) % B]) for k in range(1, B))",
      "KL partner: the next example of the batch, not the previous (TRL's offset)"),
    M("ktokl.split_fallback_forward", "in_split = ((i - k) % N for k in range(1, N))",
      "in_split = ((i + k) % N for k in range(1, N))", "split fallback searches forward"),
    M("ktokl.no_split_fallback", "for c in itertools.chain(in_batch, in_split):",
      "for c in in_batch:", "no fallback to the split (a batch of repeats is refused)"),
    M("ktokl.cut_not_compared",
      "return not np.array_equal(self.pairs[c][\"completion\"][:keep], own)",
      "return True", "a completion equal to its own once cut is accepted"),
    M("ktokl.one_completion_accepted", "        if len(ids) < 2:", "        if len(ids) < 1:",
      "a split with one completion not refused at construction"),
    M("ktokl.padding_reads_last",
      "        idx = np.where(np.asarray(idx) >= 0, idx, 0)\n        key = idx.tobytes()",
      "        idx = np.asarray(idx)\n        key = idx.tobytes()",
      "eval padding (-1) reads the last item"),
    M("ktokl.slot_lengths_rolled",
      "kl = np.minimum(lens[:, 0] + self.lengths[self.kl_partners(idx), 1],",
      "kl = np.minimum(lens[:, 0] + np.roll(lens[:, 1], 1),",
      "KL slot lengths planned from the old roll, not the partner"),
    M("ktokl.bound_ignores_partner",
      "longest = max(lens[:, 1].max(), self.lengths[self.kl_partners(idx), 1].max())",
      "longest = lens[:, 1].max()", "bound ignores a partner from outside the batch"),
    M("ktokl.unit_old_roll", "other = self.pairs[int(self.kl_partners(idx)[j])][\"completion\"]",
      "other = self.pairs[int(idx[(j - 1) % len(idx)])][\"completion\"]",
      "unit takes the previous example's completion (may be its own)"),
    # LoRA: the reference is the starting policy
    M("loraref.always_base", "if reference and lora.reference == \"policy\":",
      "if False:", "a PEFT-adapter start's reference is the bare base (the reported bug)"),
    M("loraref.options_swapped", "if reference and lora.reference == \"policy\":",
      "if reference and lora.reference == \"base\":", "'policy' and 'base' swapped"),
    M('loraref.frozen_adapters_win', 'return {**base, "lora": params["lora"]}',
      'return {"lora": params["lora"], **base}',
      'join: the frozen initial adapters override the trained ones'),
    M("loraref.option_unchecked", "    if cfg.reference not in REFERENCES:\n",
      "    if False:\n", "model.lora.reference not validated"),
    M("loraref.default_base", "reference=str(block.get(\"reference\", \"policy\")))",
      "reference=str(block.get(\"reference\", \"base\")))",
      "a config without model.lora.reference (older config.json) gets 'base'"),
    # overlap as tokens; stats['split']
    M("overlap.prompt_only", "pairs = sum(item_token_key(it) in train_keys for it in eval_items)",
      "pairs = sum(_token_key(it[\"prompt\"]) in train_prompts for it in eval_items)",
      "shared pairs counted by prompt only"),
    M("overlap.prompts_not_distinct",
      "prompts = len({_token_key(it[\"prompt\"]) for it in eval_items} & train_prompts)",
      "prompts = sum(_token_key(it[\"prompt\"]) in train_prompts for it in eval_items)",
      "shared prompts counted with repeats"),
    M("overlap.label_ignored", "for k in sorted(item) if k != \"weight\")",
      "for k in sorted(item) if k not in (\"weight\", \"desirable\", \"ranks\"))",
      "an item's target (unpaired label, ranks) not part of its key"),
    M("overlap.weight_compared", "for k in sorted(item) if k != \"weight\")",
      "for k in sorted(item))", "an item's weight part of its key"),
    M("overlap.args_swapped",
      "        stats.update(overlap_stats(items, train_items))\n    return items, stats",
      "        stats.update(overlap_stats(train_items, items))\n    return items, stats",
      "text sources: train items counted in eval (arguments swapped)"),
    M("overlap.split_overwritten", "return {\"stream\": \"train\" if self.train else \"eval\",",
      "return {\"split\": \"train\" if self.train else \"eval\",",
      "stats['split'] overwritten by the stream's name"),
    # hf_fields / hf_dir: config.json fields by kind; bad model directories
    M("hfdir.only_at_any_value", "            if value not in ONLY_AT[key]:",
      "            if value is None:", "a changes-nothing-only-at field accepted at any value"),
    M("hfdir.duplicate_not_compared", "if read in c and c[read] != value:",
      "if read in c and c[key] != value:", "a legacy duplicate compared with itself"),
    M("hfdir.numeric_version_marker",
      "(key.endswith(\"_version\") and isinstance(value, str))", "key.endswith(\"_version\")",
      "a numeric '*_version' field (e.g. a RoPE variant) accepted as a marker"),
    M("hfdir.unknown_accepted",
      "        raise ValueError(\n            f\"{source}: field {key!r} = {value!r} is not "
      "implemented",
      "        continue\n        raise ValueError(\n            f\"{source}: field {key!r} = "
      "{value!r} is not implemented",
      "a field of no kind, not read by the mapping, accepted (the final refusal dropped)"),
    M("hfdir.architectures_ambiguous", "if len(found) == 1 and None not in found:",
      "if found and None not in found:", "several families in architectures: one picked"),
    M("hfdir.tokenizer_one_over", "    if n > cfg.vocab_size:", "    if n > cfg.vocab_size + 1:",
      "a tokenizer one id larger than the embedding accepted"),
    M("hfdir.tokenizer_equal_refused", "    if n > cfg.vocab_size:", "    if n >= cfg.vocab_size:",
      "a tokenizer exactly the embedding's size refused"),
    M("hfdir.tokenizer_count_not_max", "return (file, max(ids) + 1) if ids else None",
      "return (file, len(ids)) if ids else None",
      "tokenizer size as the count of entries, not the largest id + 1"),
    M("hfdir.added_tokens_ignored",
      "        ids += [t[\"id\"] for t in tok.get(\"added_tokens\") or []]\n",
      "", "tokenizer.json's added tokens not counted"),
    M("hfdir.unigram_off_by_one", "else [len(vocab) - 1]", "else [len(vocab)]",
      "a Unigram vocabulary's size one too large"),
    M("hfdir.data_tokenizer_ignored", "    tok = tokenizer or local\n", "    tok = local\n",
      "the model directory's tokenizer checked, not data.tokenizer"),
    M("hfdir.missing_shard_unchecked",
      "                if not os.path.exists(os.path.join(path, shard)):",
      "                if False:", "a shard the index names but the directory lacks"),
    M("hfdir.truncated_not_caught", "            except SafetensorError as e:",
      "            except KeyError as e:", "a truncated safetensors file's error not translated"),
    # pre-write checks: _check_tokenizer, workdir.check_run
    M("precheck.hf_path_not_a_tokenizer",
      "if text and not d.tokenizer and not config.model.hf_path:",
      "if text and not d.tokenizer:", "model.hf_path not accepted as the tokenizer's source"),
    M("precheck.mixture_sources_ignored",
      "for s in (d.get(\"sources\") or [])] or [d.source]", "for s in []] or [d.source]",
      "a mixture's text sources not seen"),
    M("precheck.check_after_open",
      "        check_run(config)\n        with open_run(config, workdir) as run:\n",
      "        with open_run(config, workdir) as run:\n            check_run(config)\n",
      "the checks run after open_run (the workdir is written first)"),
    M("precheck.model_dirs_not_checked", "    check_model_dirs(config)\n    read_config(config)\n",
      "    read_config(config)\n", "model directories not checked before the workdir"),
    M("precheck.ref_hf_path_unchecked", "for field in (\"hf_path\", \"ref_hf_path\"):",
      "for field in (\"hf_path\",):", "model.ref_hf_path's directory not checked"),
    M("precheck.read_config_not_run", "    check_model_dirs(config)\n    read_config(config)\n",
      "    check_model_dirs(config)\n", "the config not read whole before the workdir"),
]


def _copy_tree(dest: str, rev: str | None) -> None:
    """dpo_jax/, tests/ and configs/ of ``rev`` (git archive) or of the working tree."""
    parts = ["dpo_jax", "tests", "configs"]
    if rev is None:
        for p in parts:
            shutil.copytree(os.path.join(REPO, p), os.path.join(dest, p),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, *parts], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)


def _pytest(root: str, files: list[str], timeout: float, cache: str) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout', seconds, last output line) of pytest -x over ``files``.

    XLA programs go to a persistent compilation cache keyed by their HLO: a mutant recompiles
    only the programs it changes."""
    env = dict(os.environ, PYTHONPATH=root, PYTHONDONTWRITEBYTECODE="1", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    # --run-slow: a guarantee pinned only by a slow-marked test (kept out of the default suite
    # for time) still counts against its mutants
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "--run-slow", "-p", "no:cacheprovider",
           "-p", "no:randomly", *files, *[f"--deselect={d}" for d in DESELECT]]
    t0 = time.time()
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0, ""
    lines = [x for x in out.stdout.strip().splitlines() if x.strip()]
    return ("pass" if out.returncode == 0 else "fail"), time.time() - t0, (lines or [""])[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--rev", default="HEAD", help="git revision whose code and tests to use")
    src.add_argument("--worktree", action="store_true", help="copy the working tree instead")
    ap.add_argument("--only", default="", help="comma list of mutant id prefixes")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per pytest run")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(),
                                                    "dpo_jax_mutation_xla_cache"),
                    help="persistent XLA compilation cache shared by the runs")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args(argv)

    prefixes = [p for p in args.only.split(",") if p]
    mutants = [m for m in MUTANTS if not prefixes or m.id.startswith(tuple(prefixes))]
    if args.list:
        for m in mutants:
            print(f"{m.id:40s} {FILES[m.group][0]}: {m.what}")
        print(f"{len(mutants)} mutants")
        return 0

    rev = None if args.worktree else args.rev
    root = tempfile.mkdtemp(prefix="dpo_jax_mutants_")
    results = []
    try:
        _copy_tree(root, rev)
        print(f"tree: {'working tree' if rev is None else rev} copied to {root}", flush=True)
        # Baseline: each needed test file must pass unmutated; those that do not are left out.
        needed = sorted({f for m in mutants for f in TESTS[m.group]
                         if os.path.exists(os.path.join(root, f))})
        usable = set()
        for f in needed:
            status, secs, last = _pytest(root, [f], args.timeout * 2, args.cache)
            print(f"baseline {f}: {status} ({secs:.0f} s) {last}", flush=True)
            if status == "pass":
                usable.add(f)
        for m in mutants:
            where = m.locate(root)
            files = [f for f in TESTS[m.group] if f in usable]
            if where is None or not files:
                why = "snippet not found once" if where is None else "no usable tests"
                results.append(dict(id=m.id, status="n/a", why=why, what=m.what))
                print(f"{m.id:40s} n/a ({why})", flush=True)
                continue
            path, old, new = where
            original = open(path).read()
            try:
                with open(path, "w") as fh:
                    fh.write(original.replace(old, new))
                status, secs, last = _pytest(root, files, args.timeout, args.cache)
            finally:
                with open(path, "w") as fh:
                    fh.write(original)
            verdict = "survived" if status == "pass" else "killed"
            results.append(dict(id=m.id, status=verdict, how=status, seconds=round(secs, 1),
                                last=last, what=m.what, tests=files))
            print(f"{m.id:40s} {verdict:8s} ({status}, {secs:.0f} s) {last[:90]}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ran = [r for r in results if r["status"] != "n/a"]
    killed = [r for r in ran if r["status"] == "killed"]
    print(f"\nkilled {len(killed)} / {len(ran)} applicable mutants "
          f"({100.0 * len(killed) / max(len(ran), 1):.0f}%); "
          f"n/a {len(results) - len(ran)}; tree {rev or 'working tree'}")
    for r in ran:
        if r["status"] == "survived":
            print(f"  survived: {r['id']}: {r['what']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rev=rev or "worktree", results=results), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
