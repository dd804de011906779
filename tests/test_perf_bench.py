"""experiments/bench/bench_dpo.py: its numbers follow from its measurements, and its
configurations compute the same DPO step (they differ in cost only)."""

import math

import numpy as np
import pytest

from tests import helpers

pytestmark = pytest.mark.slow  # run with --run-slow

bench = helpers.load_module("experiments/bench/bench_dpo.py")

CEILINGS = {"float32": 1e11, "bfloat16": 2e11}


def test_cpu_bench_shape_and_flops_count():
    cfg = bench.model_config("gpt2-cpu-bench")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_ff, cfg.vocab_size) == (4, 256, 4, 1024, 50257)
    # qkv + out (4 d^2) and the MLP (2 d d_ff) per layer, plus the tied LM head V d.
    n = 4 * (4 * 256**2 + 2 * 256 * 1024) + 50257 * 256
    assert bench.matmul_param_count(cfg) == n == 16_011_520


def test_same_math_and_best_take_identical_steps_and_report_consistent_numbers():
    rows = {v: bench.bench_variant("tiny-gpt2", v, 2, 8, 8, steps=2, warmup=1, ceilings=CEILINGS)
            for v in ("same_math", "best")}
    for r in rows.values():
        assert r["first_loss"] == pytest.approx(math.log(2), abs=2e-3)  # policy == bf16 reference
        tokens = 2 * 2 * 16
        assert r["tokens_per_s"] == pytest.approx(tokens / r["step_s_median"], rel=1e-3, abs=0.5)
        flops = 8 * r["matmul_params"] + 16 * 2 * 32 * 16  # L=2, d=32, T=16 (tiny-gpt2)
        assert r["flops_per_token"] == flops
        assert r["mfu"] == pytest.approx(flops * tokens / r["step_s_median"] / 1e11, rel=1e-3, abs=1e-4)
        assert r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
    # Executed FLOPs: same_math runs the nominal work (head at all T positions, policy x6 and
    # reference x2).
    n, head, attn = rows["same_math"]["matmul_params"], 128 * 32, 4 * 2 * 32 * 16
    assert rows["same_math"]["executed_flops_per_token"] == 8 * n + 4 * attn
    # best: no reference forward; the head runs at max_scored = 15 of T = 16 positions (the
    # static width: at least 16, capped at the 15 predictable positions).
    assert rows["best"]["executed_flops_per_token"] == round(
        3 * (2 * (n - head) + 2 * head * 15 / 16 + attn))
    # The loss after the first updates moves away from ln 2 identically in both configurations
    # (bf16-stored reference in both; precomputed once vs recomputed each step).
    np.testing.assert_allclose(rows["best"]["losses"], rows["same_math"]["losses"], rtol=1e-5)
    assert rows["same_math"]["losses"][-1] != rows["same_math"]["losses"][0]
    assert rows["best"]["ref_precompute_s_per_batch"] > 0


def test_torch_rows_are_read_from_the_baseline_json(tmp_path):
    fake = tmp_path / "fake_torch.py"
    fake.write_text("import json, sys\nprint('noise')\n"
                    "print(json.dumps({'model': sys.argv[sys.argv.index('--models') + 1], "
                    "'seq': int(sys.argv[sys.argv.index('--seq') + 1]), 'tokens_per_s': 600}))\n")
    row = bench.run_torch(str(fake), "gpt2-cpu-bench", 8, 64, 64, 5, 2, "cpu")
    assert row["config"] == "pytorch" and row["tokens_per_s"] == 600
    assert row["model"] == "gpt2-cpu-bench" and row["seq"] == 128
    bad = bench.run_torch(str(tmp_path / "missing.py"), "gpt2-cpu-bench", 8, 64, 64, 5, 2, "cpu")
    assert "error" in bad


def test_abstract_compile_sizes_the_same_program_without_allocating():
    real = bench.bench_variant("tiny-gpt2", "best", 2, 8, 8, steps=1, warmup=0, ceilings=CEILINGS,
                               run_steps=False)
    shapes = bench.bench_variant("tiny-gpt2", "best", 2, 8, 8, steps=1, warmup=0,
                                 ceilings=CEILINGS, abstract=True)
    assert real["compiled_only"] and shapes["compiled_only"] and "step_s_median" not in shapes
    for k in ("compiled_temp_MiB", "compiled_args_MiB", "compiled_peak_est_GiB"):
        assert shapes[k] == real[k] and real[k] >= 0, k
    # a variant's optional fifth field is the forward-only tiling (the reference forward's);
    # that the numbers do not change with it: tests/test_train.py's sharded-mesh test
    tuned = bench.bench_variant("tiny-gpt2", "same_math_tuned_scan", 2, 8, 8, steps=1, warmup=0,
                                ceilings=CEILINGS, abstract=True)
    assert tuned["forward_logprobs"]["seq_chunk"] == 32 and tuned["remat"] == "dots_saveable"
    assert tuned["logprobs"]["seq_chunk"] is None  # the policy's head stays dense
    assert bench.VARIANTS["best_chunked_attn"][0] == dict(attention_impl="chunked",
                                                          attention_chunk=512)


def test_isolated_configuration_runs_in_its_own_process(tmp_path):
    import argparse
    import jax

    a = argparse.Namespace(preset="tiny-gpt2", pairs=2, prompt=8, response=8, steps=1, warmup=0,
                           abstract=False, isolate_timeout=300, scored_steps_per_octave=1)
    row = bench.run_isolated(a, "same_math", CEILINGS)
    assert row["config"] == "same_math" and "error" not in row, row
    assert row["backend"] == jax.default_backend() and row["first_loss"] > 0
    # the parent's ceilings are used for MFU
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * 64 / row["step_s_median"] / 1e11,
                                       rel=1e-3, abs=1e-4)
    bad = bench.run_isolated(a, "no_such_config", CEILINGS)
    assert "error" in bad and "no_such_config" in bad["error"]
