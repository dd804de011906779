"""The run config: its schema (``base_config``) and the one place it is read.

Experiment files in ``configs/`` start from ``base_config`` and change what they need; the
defaults are the offline default run (DPO on the synthetic preference task with a small
GPT-2-shaped model, 2 CPU cores, minutes). Tasks call :func:`read_config` once and pass the
frozen :class:`RunConfig` on; nothing below the tasks reads the ConfigDict. Each block is
declared and checked next to its user and read here: ``data`` by ``data.config.read_data``,
``loss`` by ``losses.loss_config_from``, ``eval`` by ``eval_config.read_eval``, ``model.lora``
by ``lora.read_lora``, and a task's own block (``sft``, ``online``, ``ppo``) by the reader that
``tasks.TASK_BLOCKS`` names (``rc.task_block``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from dpo_jax import losses as losses_lib
from dpo_jax import sharding
from dpo_jax.data.config import (SOURCE_SPECS, DataConfig, SourceSpec, default_data_config,
                                 read_run_data)
from dpo_jax.eval_config import EvalConfig, default_eval_config, read_eval
from dpo_jax.logprobs import LogprobConfig
from dpo_jax.lora import LoraConfig, read_lora
from dpo_jax.models import ModelConfig, model_config_from
from dpo_jax.optim import NONFINITE_POLICIES, OPTIM_DEFAULTS, OptimConfig
from dpo_jax.step_config import StepConfig
from dpo_jax.tasks import TASK_BLOCKS


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # what main runs: dpo | sft | reward | ppo | online_dpo (dpo_jax.tasks.TASKS), or
    # 'module:function'
    c.task = "dpo"
    c.seed = 0  # parameter init and data shuffling
    # fields a resumed run may change, comma separated (only those in
    # dpo_jax.workdir.SAFE_ON_RESUME, e.g. 'train.steps'); recorded in config_history.jsonl
    c.allow_resume_changes = ""

    c.model = ml_collections.ConfigDict()
    c.model.preset = "gpt2-synthetic"  # a name from dpo_jax.models.PRESETS (ignored with hf_path)
    # ModelConfig fields to change (None keeps the preset's / HF config's value); typed
    # placeholders so the command line can set them: --config.model.overrides.n_layer=4.
    c.model.overrides = ml_collections.ConfigDict(
        {k: ml_collections.config_dict.placeholder(int)
         for k in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "max_len", "vocab_size")})
    c.model.hf_path = ""  # HF model dir or hub name to import (config + safetensors)
    c.model.ref_hf_path = ""  # reference from another HF checkpoint ('' = same init as policy)
    c.model.dtype = "float32"  # compute dtype: float32 or bfloat16
    c.model.param_dtype = "float32"  # policy parameter (master weight) dtype
    c.model.ref_param_dtype = ""  # frozen reference storage dtype ('' = as the policy; bfloat16 halves it)
    # per-layer rematerialisation: none, full, dots_saveable, dots_no_batch
    c.model.remat = "none"
    c.model.scan_layers = True  # scan over stacked layers (compile time independent of depth)
    c.model.attention_impl = ""  # '' = XLA; 'cudnn' fused GPU kernel; 'chunked' query blocks
    c.model.attention_chunk = 512  # query rows per block with attention_impl='chunked'
    # mixture-of-experts models: 'sparse' (dropless grouped dispatch) or 'dense' (reference);
    # moe_kernel '' = by backend (tiled on CPU, ragged_dot on TPU / GPU; models/moe_dispatch.py)
    c.model.moe_impl = "sparse"
    c.model.moe_kernel = ""
    # expert parallelism: '' = off, or the mesh axis (data / fsdp / tensor) the experts are split
    # over, tokens exchanged by all_to_all (models/moe_parallel.py; pair it with the mesh rule
    # that puts `expert` on the same axis, by default fsdp)
    c.model.moe_expert_axis = ""
    # LoRA (dpo_jax/lora.py): train low-rank adapters over the frozen base (from init.policy,
    # hf_path or the seed, in param_dtype); the reference is the starting policy
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0  # adapter rank (0 = off: every parameter is trained)
    c.model.lora.alpha = 16.0  # the update is (alpha / rank) * dropout(x) @ A @ B
    c.model.lora.dropout = 0.0  # dropout on each adapter's input, training steps only
    # comma list of q, k, v, o, up, gate, down, lm_head; 'all' = every projection but lm_head
    c.model.lora.targets = "all"
    c.model.lora.init = "kaiming"  # A: kaiming (uniform, PEFT's default) or gaussian; B = 0
    c.model.lora.path = ""  # a PEFT LoRA directory as the initial adapters ('' = A random, B 0)
    # the reference under LoRA: 'policy' = the starting policy (the base with the initial
    # adapters of model.lora.path, held frozen beside it: step 1 at ln 2); 'base' = the base
    # with every adapter off (TRL's default for a PEFT model without ref_adapter_name)
    c.model.lora.reference = "policy"
    # the frozen base's attention / MLP projections: 'none' (param_dtype), 'int8' (per output
    # channel) or 'nf4' (QLoRA: 4-bit NormalFloat, blocks of 64, double-quantised constants);
    # dequantised inside each matmul, the reference is the quantised base (models/quant.py)
    c.model.lora.base_quant = "none"
    # with base_quant: an untied input embedding quantised too, row by row (QLoRA keeps it in
    # param_dtype; a tied one is the LM head, always kept)
    c.model.lora.quant_embedding = False

    c.init = ml_collections.ConfigDict()
    c.init.policy = ""  # another run's workdir to take policy params from (e.g. the SFT run)
    c.init.reference = ""  # a run's workdir for the reference ('' = the policy's initial params)

    c.loss = losses_lib.default_loss_config()

    c.data = default_data_config()

    c.logprobs = ml_collections.ConfigDict()
    c.logprobs.scored_only = True  # LM head only at response positions (same numbers, less work)
    c.logprobs.seq_chunk = 128  # positions per LM-head chunk (0 = all at once)
    c.logprobs.vocab_chunk = 0  # vocabulary slice for the online logsumexp (0 = whole vocabulary)
    # forward-only passes (reference, eval) may tile the head differently: no backward, so no
    # recompute cost (-1 = as above, 0 = whole; measurements: experiments/bench/README.md)
    c.logprobs.forward_seq_chunk = -1
    c.logprobs.forward_vocab_chunk = -1
    c.logprobs.precompute_reference = False  # reference log-probs computed once over the data

    c.optim = ml_collections.ConfigDict()
    # where the unset (None) fields below come from (dpo_jax.optim.OPTIM_DEFAULTS): 'auto' =
    # 'hf' (TRL's DPOConfig: adamw, lr 1e-6, linear decay, no warmup, clipping 1.0) when
    # model.hf_path is set, else 'offline' (adamw, lr 1e-3, constant, warmup 20, clipping 10)
    c.optim.defaults = "auto"
    ph = ml_collections.config_dict.placeholder
    c.optim.name = ph(str)  # rmsprop (the paper's recipe), adamw or sgd
    c.optim.lr = ph(float)  # peak learning rate (the paper: 1e-6 with RMSprop for billion-scale models)
    c.optim.schedule = ph(str)  # after warmup: constant (paper), linear or cosine decay to 0
    c.optim.warmup_steps = ph(int)  # linear warmup from 0 (paper: 150)
    c.optim.b1 = ph(float)  # AdamW first-moment decay
    c.optim.b2 = ph(float)  # AdamW second-moment decay
    c.optim.rms_decay = 0.99  # RMSprop alpha (PyTorch default, as the paper ran it)
    c.optim.eps = ph(float)  # optimizer epsilon
    c.optim.weight_decay = ph(float)  # AdamW decoupled weight decay (matrices only)
    c.optim.max_grad_norm = ph(float)  # global-norm clipping (0 = off; paper's code: 10)
    c.optim.grad_accum = 1  # micro-batches per update; the update equals the full batch's

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300  # optimizer updates
    c.train.batch_size = 32  # global batch in pairs (paper: 64)
    c.train.eval_every = 100  # held-out evaluation interval in steps (0 = never)
    c.train.eval_batch_size = 64  # pairs per eval batch
    c.train.log_every = 10  # progress line and metrics.jsonl interval
    c.train.checkpoint_every = 100  # checkpoint interval (and always at the end)
    c.train.keep_checkpoints = 2  # newest checkpoints kept
    c.train.async_checkpointing = True  # write checkpoints in the background
    # a step with a non-finite loss or gradient: 'error' stops the run (nothing past the last
    # checkpoint is saved), 'skip' drops that update and counts it (summary: skipped_updates)
    c.train.on_nonfinite = "error"
    # TR-DPO (Gorbatovski et al. 2024; TRL ref_model_sync_steps): every this many steps the
    # reference becomes ref_mixup_alpha * policy + (1 - ref_mixup_alpha) * reference (0 = frozen)
    c.train.ref_sync_every = 0
    c.train.ref_mixup_alpha = 0.6  # TR-DPO alpha in (0, 1]; 1 = hard copy (TRL's default 0.6)
    # per-pair diagnostics (pairs): log-prob changes from the reference, margin histogram,
    # CHES scores (dpo_jax/diagnostics.py) in the metrics; per-pair eval values in eval_pairs/
    c.train.diagnostics = False

    # samples during evaluation (dpo_jax/evaluation.py; the block: dpo_jax/eval_config.py)
    c.eval = default_eval_config()

    # Weights & Biases (optional extra: pip install -e ".[wandb]"), process 0 only: the run's
    # config and every metrics.jsonl record (dpo_jax.metrics.WandbSink)
    c.log = ml_collections.ConfigDict()
    c.log.wandb_project = ""  # '' = off
    c.log.wandb_entity = ""  # team or user ('' = wandb's default)
    c.log.wandb_name = ""  # run name ('' = the workdir's name)

    c.mesh = ml_collections.ConfigDict()
    # -1: the rest. context > 1 splits every sequence over that many devices (context
    # parallelism, models/context_parallel.py; docs/scale.md, Long context)
    c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "context": 1, "tensor": 1})
    # logical -> mesh axis, or a list of mesh axes splitting the dimension together
    c.mesh.rules = [[name, axis if isinstance(axis, str) or axis is None else list(axis)]
                    for name, axis in sharding.DEFAULT_RULES]
    return c


def data_block(config: ml_collections.ConfigDict) -> DataConfig:
    """The frozen ``data`` block, its tokenizer resolved: ``model.hf_path`` (the model's
    directory) when a text source names none (``data.config.read_run_data``)."""
    return read_run_data(config)


def apply_variants(config: ml_collections.ConfigDict, arg: str, variants: dict, source: str):
    """Apply ``--config=FILE:a,b`` variants in order; each maps a name to ``f(config)``.

    An unknown name is an error that lists the known ones, so a typo never runs the default.
    """
    for name in filter(None, (arg or "").split(",")):
        if name not in variants:
            raise ValueError(f"unknown variant {name!r} of {source} (known: {', '.join(variants)})")
        variants[name](config)
    return config


def short_run(steps: int):
    """A variant that shortens a run to ``steps``, evaluating and checkpointing at the end."""

    def apply(config: ml_collections.ConfigDict) -> None:
        config.train.steps = steps
        config.train.eval_every = steps
        config.train.checkpoint_every = steps

    return apply


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """The offline default as a config file: ``python -m dpo_jax.main`` loads this file when no
    ``--config`` is given, so ``--config.FIELD=...`` overrides work with or without it.
    Variants as ``configs/default.py`` (``quick``)."""
    return apply_variants(base_config(), arg, {"quick": short_run(60)}, "the offline default")


# ----------------------------------------------------------------------------- reading
def optim_defaults(config: ml_collections.ConfigDict) -> str:
    """The preset of ``dpo_jax.optim.OPTIM_DEFAULTS`` the unset ``optim`` fields take:
    ``optim.defaults``, where 'auto' is 'hf' for a run that imports a checkpoint
    (``model.hf_path``) and 'offline' otherwise."""
    name = str(config.optim.get("defaults", "auto") or "auto")
    if name == "auto":
        return "hf" if config.model.get("hf_path") else "offline"
    return name


def resolve_defaults(config: ml_collections.ConfigDict
                     ) -> tuple[ml_collections.ConfigDict, list[str]]:
    """``(config with every unset optim field filled in, notes)``: what the run will use,
    written to ``config.json``, and one line per default chosen on the user's behalf
    (logged as a warning and kept in ``summary.json`` as ``config_notes``). ``config`` itself
    is not changed."""
    preset = optim_defaults(config)
    if preset not in OPTIM_DEFAULTS:
        raise ValueError(f"optim.defaults={config.optim.defaults!r}: expected 'auto' or one of "
                         f"{sorted(OPTIM_DEFAULTS)}")
    unset = {k: v for k, v in OPTIM_DEFAULTS[preset].items() if config.optim.get(k) is None}
    if not unset:
        return config, []
    out = ml_collections.ConfigDict(config.to_dict())
    out.optim.update(unset)
    why = ("model.hf_path imports a pretrained checkpoint: TRL DPOConfig's optimizer"
           if preset == "hf" else f"optim.defaults preset {preset!r}")
    if preset == "offline" and not config.model.get("hf_path"):
        return out, []  # the offline default's own settings: nothing surprising
    return out, [f"optim: {why} defaults for the fields not set in the config: "
                 + ", ".join(f"{k}={v}" for k, v in unset.items())]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The ``train`` block: what the loop (``dpo_jax/loop.py``) and the batch sizes need."""

    steps: int
    batch_size: int
    eval_batch_size: int
    log_every: int
    eval_every: int  # 0 = never
    checkpoint_every: int  # 0 = only at the end
    keep_checkpoints: int
    async_checkpointing: bool
    on_nonfinite: str

    @property
    def splits(self) -> tuple[str, ...]:
        """The data splits a run reads: 'eval' only when it evaluates."""
        return ("train", "eval") if self.eval_every else ("train",)


@dataclasses.dataclass(frozen=True)
class ParamSources:
    """Where the policy and the reference come from (``init`` and ``model`` blocks): another
    run's workdir, else an HF directory, else the seeded init; the reference defaults to a copy
    of the initial policy, stored in ``reference_dtype`` ('' = as the policy)."""

    policy: str = ""
    policy_hf: str = ""
    reference: str = ""
    reference_hf: str = ""
    reference_dtype: str = ""
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every block a task needs, read once (see :func:`read_config`)."""

    task: str
    seed: int
    model: ModelConfig
    param_sources: ParamSources  # where the policy and reference parameters come from
    step: StepConfig
    optim: OptimConfig
    train: TrainConfig
    data: DataConfig  # the ``data`` block (tokenizer resolved: data_block)
    mesh_shape: dict
    mesh_rules: tuple
    precompute_reference: bool
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)  # model.lora (0 = off)
    loss: losses_lib.LossConfig | None = None  # the ``loss`` block (losses.loss_config_from)
    eval: EvalConfig | None = None  # the ``eval`` block (eval_config.read_eval)
    # the task's own block (tasks.TASK_BLOCKS: SFTConfig, OnlineConfig, PPOSettings), or None
    task_block: Any = None


def _logprob_configs(lp) -> tuple[LogprobConfig, LogprobConfig]:
    train = LogprobConfig(scored_only=bool(lp.scored_only), seq_chunk=lp.seq_chunk or None,
                          vocab_chunk=lp.vocab_chunk or None)
    seq, vocab = lp.forward_seq_chunk, lp.forward_vocab_chunk
    forward = dataclasses.replace(
        train, seq_chunk=train.seq_chunk if seq == -1 else (seq or None),
        vocab_chunk=train.vocab_chunk if vocab == -1 else (vocab or None))
    return train, forward


def _ref_sync(config: ml_collections.ConfigDict, loss_cfg) -> tuple[int, float]:
    """``(train.ref_sync_every, train.ref_mixup_alpha)`` checked: TR-DPO needs a reference
    forward to update, so a precomputed reference or a reference-free loss refuses it."""
    t = config.train
    every, alpha = int(t.get("ref_sync_every", 0) or 0), float(t.get("ref_mixup_alpha", 0.6))
    if every < 0:
        raise ValueError(f"train.ref_sync_every={every}: must be >= 0 (0 = frozen reference)")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"train.ref_mixup_alpha={alpha}: must be in (0, 1] (1 = hard copy)")
    if every:
        if config.logprobs.precompute_reference:
            raise ValueError(
                "train.ref_sync_every > 0 (TR-DPO) updates the reference during training, but "
                "logprobs.precompute_reference=True stores its log-probs once; set one of them "
                "off")
        if not losses_lib.needs_reference(loss_cfg):
            raise ValueError(
                f"train.ref_sync_every > 0 (TR-DPO) updates the reference, but loss "
                f"{list(loss_cfg.names)} is reference-free; set train.ref_sync_every=0")
    return every, alpha


def _check_data_format(config, data: DataConfig) -> None:
    """Ranked lists train the DPO task with ``plackett_luce``, unpaired completions with
    ``kto`` (``data/ranked.py``, ``data/unpaired.py``), neither from stored reference log-probs;
    ``kto`` reads unpaired completions only. ValueError naming the fields otherwise."""
    fmt = data.format
    loss = str(config.loss.name).replace(" ", "")
    want = {"ranked": "plackett_luce", "unpaired": "kto"}.get(fmt)
    if want and (config.task != "dpo" or loss != want or config.logprobs.precompute_reference):
        raise ValueError(f"data.format={fmt!r} trains task 'dpo' with loss.name={want!r} and "
                         f"logprobs.precompute_reference=False; got task {config.task!r}, "
                         f"loss.name={loss!r}, precompute_reference="
                         f"{config.logprobs.precompute_reference}")
    if fmt == "trees":
        listwise = int(data.tree_responses) > 2
        if (config.task != "dpo" or "kto" in loss.split(",")
                or (loss == "plackett_luce") != listwise
                or (listwise and config.logprobs.precompute_reference)
                or int(config.optim.grad_accum) != 1):
            raise ValueError(
                "data.format='trees' trains task 'dpo' with a pairwise loss at binary branch "
                "points (data.tree_responses=2; stored reference log-probs allowed) or "
                "loss.name='plackett_luce' at K-way ones (tree_responses > 2, "
                "logprobs.precompute_reference=False), and optim.grad_accum"
                f"=1; got task {config.task!r}, loss.name={loss!r}, tree_responses="
                f"{data.tree_responses}, precompute_reference="
                f"{config.logprobs.precompute_reference}, grad_accum={config.optim.grad_accum}")
    if fmt == "pairs" and "kto" in loss.split(","):
        raise ValueError("loss.name='kto' trains on unpaired completions: set "
                         "data.format='unpaired' (a pair source is split into unpaired rows)")


def _check_tokenizer(config) -> None:
    """Text sources need a tokenizer: ``data.tokenizer``, else the model directory
    ``model.hf_path``. Only a tokenised source (``data.config.SOURCE_SPECS``: the synthetic
    task; single source or every mixture source) needs none. ValueError naming both fields
    otherwise."""
    d = config.data
    sources = [s.get("source", d.source) if hasattr(s, "get") else d.source
               for s in (d.get("sources") or [])] or [d.source]
    text = sorted({str(s) for s in sources
                   if not SOURCE_SPECS.get(str(s), SourceSpec(str(s))).tokenised})
    tokenised = [n for n, spec in SOURCE_SPECS.items() if spec.tokenised]
    if text and not d.tokenizer and not config.model.hf_path:
        raise ValueError(
            f"data.source {', '.join(map(repr, text))} is text and needs a tokenizer, but "
            f"data.tokenizer and model.hf_path are both empty: set data.tokenizer=DIR_OR_HUB_NAME "
            f"(its vocabulary must fit the model's) or model.hf_path=HF_MODEL_DIR (the tokenizer "
            f"then comes from that directory), or use a tokenised source: data.source in "
            f"{tokenised}")


def read_config(config: ml_collections.ConfigDict) -> RunConfig:
    """The frozen view of ``config`` that tasks consume. Raises ValueError for bad values."""
    t = config.train
    if t.on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"train.on_nonfinite={t.on_nonfinite!r}: expected one of "
                         f"{NONFINITE_POLICIES}")
    train = TrainConfig(
        steps=int(t.steps), batch_size=int(t.batch_size),
        eval_batch_size=int(t.eval_batch_size or t.batch_size), log_every=int(t.log_every),
        eval_every=int(t.eval_every or 0), checkpoint_every=int(t.checkpoint_every or 0),
        keep_checkpoints=int(t.keep_checkpoints), async_checkpointing=bool(t.async_checkpointing),
        on_nonfinite=str(t.on_nonfinite))
    logprobs, forward = _logprob_configs(config.logprobs)
    optim = OptimConfig.from_config(config.optim, optim_defaults(config))
    loss = losses_lib.loss_config_from(config.loss)
    ref_sync_every, ref_mixup_alpha = _ref_sync(config, loss)
    if config.logprobs.precompute_reference and config.loss.get("ld_alpha") is not None:
        raise ValueError("loss.ld_alpha (LD-DPO) weights the reference's tokens too, but "
                         "logprobs.precompute_reference=True stores plain sums; set one of them "
                         "off")
    _check_tokenizer(config)
    data = data_block(config)
    if data.prefix_sharing and (
            config.task in ("sft", "reward", "ppo", "online_dpo") or optim.grad_accum > 1):
        raise ValueError(f"data.prefix_sharing=True (one row unit [prompt, response_1 .. "
                         f"response_K] per example) is read by the DPO step (pairs, ranked lists "
                         f"or unpaired examples) without gradient accumulation; task "
                         f"{config.task!r}, optim.grad_accum={optim.grad_accum}: set "
                         f"data.prefix_sharing=False")
    _check_data_format(config, data)
    if data.ches_filter.mode and (config.task != "dpo" or data.format != "pairs"):
        raise ValueError(f"data.ches_filter.mode={data.ches_filter.mode!r} filters preference "
                         f"pairs for task 'dpo'; task {config.task!r}, data.format="
                         f"{data.format!r}: set data.ches_filter.mode=''")
    diagnostics = bool(t.get("diagnostics", False))
    if diagnostics and (data.format != "pairs" or config.task not in ("dpo", "online_dpo")):
        raise ValueError(f"train.diagnostics=True reads the DPO step's preference pairs; task "
                         f"{config.task!r}, data.format={data.format!r}: set "
                         f"train.diagnostics=False")
    m = config.model
    lora = read_lora(m.get("lora"), int(config.seed))
    ref_dtype = m.get("ref_param_dtype") or ""
    reference_is_initial_policy = (not config.init.reference and not m.ref_hf_path
                                   and ref_dtype in ("", m.param_dtype) and not lora.rank)
    return RunConfig(
        task=config.task, seed=int(config.seed), model=model_config_from(m),
        param_sources=ParamSources(policy=config.init.policy, policy_hf=m.hf_path,
                             reference=config.init.reference, reference_hf=m.ref_hf_path,
                             reference_dtype=m.ref_param_dtype, seed=int(config.seed)),
        step=StepConfig(grad_accum=optim.grad_accum, logprobs=logprobs, forward_logprobs=forward,
                        ref_sync_every=ref_sync_every, ref_mixup_alpha=ref_mixup_alpha,
                        reference_is_initial_policy=reference_is_initial_policy,
                        diagnostics=diagnostics),
        optim=optim, train=train, data=data, mesh_shape=sharding.read_mesh_shape(
            config.mesh.shape, config.model.attention_impl),
        mesh_rules=sharding.read_mesh_rules(config.mesh.rules),
        precompute_reference=bool(config.logprobs.precompute_reference),
        lora=lora, loss=loss, eval=read_eval(config),
        task_block=TASK_BLOCKS[config.task](config) if config.task in TASK_BLOCKS else None)
