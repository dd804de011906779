"""Long-context DPO: each sequence split over the mesh axis ``context`` (context parallelism,
``dpo_jax/models/context_parallel.py``; docs/scale.md, "Long context").

    # TPU v5p-64 (32 chips = 8 hosts x 4 chips): Llama-3.1-8B, pairs of up to 128k tokens
    ./launch.sh tpu my-v5p-64 us-east5-a --project my-proj -- \\
        --config=configs/long_context.py:tpu_v5p_64 --workdir=/mnt/shared/runs/lc \\
        --config.model.hf_path=/mnt/shared/models/Llama-3.1-8B-Instruct \\
        --config.data.path=/mnt/shared/data/long_pairs.jsonl
    # 8 nodes x 8 GPUs (SLURM): the same run, context within a node, fsdp across nodes
    ./launch.sh slurm 8 8 --time 24:00:00 --partition gpu -- \\
        --config=configs/long_context.py:gpu_8x8 --workdir=/shared/runs/lc \\
        --config.model.hf_path=/shared/models/Llama-3.1-8B-Instruct \\
        --config.data.path=/shared/data/long_pairs.jsonl
    # this machine: a tiny model on synthetic pairs, context 4 x data 2 over 8 CPU devices
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m dpo_jax.main --config=configs/long_context.py:smoke --workdir=/tmp/runs/lc

The base: a ``generic`` JSONL of ``{prompt, chosen, rejected}`` text (``data.path``, the
tokenizer from ``model.hf_path``), rows up to ``MAX_LENGTH`` tokens in buckets of 32k / 64k /
128k, prefix sharing (the long prompt stored and run once per pair: one row [prompt, chosen,
rejected] instead of two rows), bfloat16 compute over float32 master weights, a bfloat16
reference, full per-layer remat, query-blocked attention (``attention_chunk`` rows at a time)
and a scored-only chunked LM head. Rows per device shrink to fractions of one: a row is split
over the ``context`` devices, so ``train.batch_size`` (pairs = prefix-shared rows) only needs
to be a multiple of data x fsdp.

Variants (comma-separated, in order):
  * ``tpu_v5p_64``: mesh fsdp 8 x context 4 (32 chips; 128k tokens = 32k per chip; the
    context axis stays inside a host of 4 chips, as a run requires: each process loads whole
    rows, ``workdir.check_context_axis``);
  * ``gpu_8x8``: mesh fsdp 8 x context 8 (64 GPUs; ``jax.make_mesh`` keeps the context axis
    inside a node, where the per-layer K/V all-gather runs over NVLink, and fsdp across nodes);
  * ``smoke``: the tiny ``tiny-llama`` preset (GQA, rotary) on the synthetic task, rows padded
    to 96 tokens split 4 ways, 2 steps (tests/test_context_parallel.py runs it).
"""

from dpo_jax.config import apply_variants, base_config

MAX_LENGTH = 131072


def _tpu_v5p_64(c) -> None:
    c.mesh.shape.update({"data": 1, "fsdp": 8, "context": 4, "tensor": 1})
    c.train.batch_size = 8


def _gpu_8x8(c) -> None:
    c.mesh.shape.update({"data": 1, "fsdp": 8, "context": 8, "tensor": 1})
    c.train.batch_size = 16


def _smoke(c) -> None:
    c.model.hf_path = ""
    c.model.preset = "tiny-llama"
    c.model.update(dtype="float32", param_dtype="float32", ref_param_dtype="",
                   attention_chunk=16)
    c.data.update(source="synthetic", path="", max_length=96, max_prompt_length=48,
                  buckets="96")
    c.data.synthetic.update(num_train=64, num_eval=16)
    c.mesh.shape.update({"data": 2, "fsdp": 1, "context": 4, "tensor": 1})
    c.train.update(steps=2, batch_size=8, eval_batch_size=8, eval_every=2, log_every=1,
                   checkpoint_every=2, async_checkpointing=False)
    c.eval.sample_every = 0


VARIANTS = {"tpu_v5p_64": _tpu_v5p_64, "gpu_8x8": _gpu_8x8, "smoke": _smoke}


def get_config(arg: str = ""):
    c = base_config()
    c.model.preset = "llama-3.1-8b"
    c.model.update(dtype="bfloat16", param_dtype="float32", ref_param_dtype="bfloat16",
                   remat="full", attention_impl="chunked", attention_chunk=2048)
    c.data.update(source="generic", max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH - 4096,
                  buckets="32768,65536,131072", prefix_sharing=True)
    c.logprobs.update(scored_only=True, seq_chunk=512)
    c.train.update(steps=1000, batch_size=8, eval_every=100, checkpoint_every=100)
    c.eval.sample_every = 0  # sampling 128k-token prompts is another job
    apply_variants(c, arg, VARIANTS, "configs/long_context.py")
    return c
