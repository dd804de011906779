"""DPO on real Anthropic HH dialogues (the paper's HH experiment at 135M scale, on a CPU).

    bash ../shared/models/smollm2.sh        # once: SmolLM2-135M-Instruct, no model hub
    python -m dpo_jax.main --config=configs/hh.py:smollm2,reward --workdir=runs/hh_reward
    python -m dpo_jax.main --config=configs/hh.py:smollm2 --workdir=runs/hh_dpo \\
        --config.eval.judge=runs/hh_reward

``experiments/hh/run.py`` runs both and writes the measurements (experiments/hh/README.md).

Data: the 2,312 harmless-base test pairs in ``$DPO_JAX_DATA/hh_rlhf`` (default
``../shared/data/hh_rlhf``; the other HH splits are not available offline), the dialogue turns
rendered by the model's chat template (``data.hh_chat``), prompt + response <= 256 tokens,
eval = ``data.eval_size`` pairs held out BY PROMPT (``data.eval_split=''``), 8 pairs per step.
The model directory is found when the config is read: ``$DPO_JAX_MODELS/<name>``, default
``~/.cache/dpo_jax/<name>`` (``dpo_jax/models/local.py``). The optimizer starts from TRL's
DPOConfig (``optim.defaults`` 'auto' with ``model.hf_path``: AdamW, lr 1e-6, linear decay, no
warmup, clipping 1.0).

Variants (comma-separated, in order):
  * ``smollm2``: SmolLM2-135M-Instruct (the default model; named for clarity);
  * ``reward``: the Bradley-Terry reward model (``task='reward'``) from the same checkpoint on
    the same training split: the judge of the DPO policy's samples (``eval.judge``);
  * ``smoke``: 3 steps, eval on 16 pairs, 4 sampled prompts of 16 tokens (tests, timing);
  * ``displacement``: issue 34's likelihood-displacement run (``experiments/hh/README.md``,
    "Likelihood displacement"): ``train.diagnostics`` on, ``LD_STEPS`` steps at the paper's
    Section 6 learning rate, an evaluation every ``LD_EVAL_EVERY`` steps, no samples;
  * ``ches_filter``: with ``displacement``, the same run on the train pairs the CHES filter
    keeps (``data.ches_filter``: the half of lowest ln-CHES under the starting model);
  * ``ches_random``: with ``displacement``, the filter's control: the same half of the train
    pairs dropped at random (``data.ches_filter.score='random'``), to tell the CHES choice
    apart from training on fewer pairs for more epochs.
"""

from dpo_jax.config import apply_variants, base_config
from dpo_jax.data.testing import data_root
from dpo_jax.models.local import SMOLLM2, local_model

# What fit the 2-core CPU in one session beside other work (experiments/hh/README.md): 50
# steps of 8 pairs (the first 400 of the 800 training pairs kept by ``data.max_pairs``, whose
# reference log-probs are stored), a judge of 50 steps on the same pairs
STEPS = 50
TRAIN_PAIRS = 800
REWARD_STEPS = 50
# The displacement comparison (issue 34): 200 steps of 8 pairs = 2 epochs of the 800 kept
# pairs without the filter, 4 epochs of the 400 the filter keeps (equal steps, as asked)
LD_STEPS = 200
LD_EVAL_EVERY = 25
LD_LR = 5e-6  # Razin et al.'s SORRY-Bench DPO runs (their README); TRL's 1e-6 moved the
# held-out log-probs by +0.1 nats in 50 steps (experiments/hh/README.md): nothing to displace


def _smollm2(c) -> None:
    c.model.hf_path = local_model(SMOLLM2)
    c.eval.pad_id = 2  # its pad token (= EOS)


def _reward(c) -> None:
    c.task = "reward"
    c.optim.lr = 1e-5  # the head starts at zero: a larger step than DPO's 1e-6 (TRL's
    # RewardConfig default is 5e-5 for its full fine-tuning)
    c.eval.sample_every = 0  # no judge of its own
    c.logprobs.precompute_reference = False  # no reference model
    c.data.prefix_sharing = False  # the reward task reads plain pair rows
    c.data.buckets = "128,192,256"  # one sequence (prompt + response <= 256) a row
    # 400 of the same 800 pairs: a judge, not the experiment
    c.train.update(steps=REWARD_STEPS, eval_every=REWARD_STEPS, checkpoint_every=REWARD_STEPS)


def _smoke(c) -> None:
    c.train.update(steps=3, eval_every=3, checkpoint_every=3, log_every=1)
    c.data.eval_size = 16
    c.data.max_pairs = 32  # per split: the stored reference covers 32 training pairs, not all
    c.eval.update(sample_every=3 if c.eval.sample_every else 0, sample_prompts=4,
                  max_new_tokens=16)


def _displacement(c) -> None:
    c.train.diagnostics = True
    c.optim.lr = LD_LR
    c.train.update(steps=LD_STEPS, eval_every=LD_EVAL_EVERY, checkpoint_every=LD_EVAL_EVERY)
    c.eval.sample_every = 0  # the log-probs are the measurement


def _ches_filter(c) -> None:
    c.data.ches_filter.update(mode="drop", score="ln_ches", quantile=0.5)


def _ches_random(c) -> None:
    _ches_filter(c)
    c.data.ches_filter.update(score="random", seed=0)


def get_config(arg: str = ""):
    c = base_config()
    c.task = "dpo"
    c.data.source = "hh"
    c.data.path = str(data_root() / "hh_rlhf" / "harmless-base-test.jsonl.gz")
    c.data.hh_chat = True  # user / assistant messages through the tokenizer's chat template
    c.data.train_split = "test"  # the file's split name (harmless-base-test)
    c.data.eval_split = ""  # eval carved out of it by prompt (asked for, so no warning)
    c.data.eval_size = 128  # held-out pairs (whole prompts): 16 eval batches of 8
    c.data.max_length = 256  # prompt + response tokens
    c.data.max_prompt_length = 192  # the dialogue's end is kept (truncation_mode keep_end)
    c.data.on_bad_row = "skip"  # 4 rows whose rejected text does not share the prompt
    c.data.max_pairs = TRAIN_PAIRS  # the first 800 training pairs (after the eval carve)
    # one row unit [prompt, chosen, rejected] per pair (the prompt once: the same numbers,
    # fewer FLOPs): rows up to ~450 tokens, so the buckets come from the length histogram
    c.data.prefix_sharing = True
    c.data.buckets = "auto"
    c.logprobs.precompute_reference = True  # reference log-probs stored once
    # Per-layer remat keeping the projections' outputs: XLA's temp memory of this step (stored
    # reference, prefix-shared rows of 8 x 320 columns) falls from 7.7 GB with remat 'none' (the
    # layer scan stores every intermediate, attention probabilities included) to 2.4 GB. Same
    # numbers (experiments/bench/README.md, "TRL's DPOTrainer on SmolLM2-135M").
    c.model.remat = "dots_no_batch"
    c.loss.name = "sigmoid"
    c.loss.beta = 0.1
    c.train.update(steps=STEPS, batch_size=8, eval_batch_size=8, eval_every=50, log_every=5,
                   checkpoint_every=50)
    # samples of held-out prompts at every eval (step 0: the starting model, the reference)
    c.eval.update(sample_every=50, sample_prompts=32, max_new_tokens=64, temperature=0.7,
                  top_p=0.95, seed=0)
    _smollm2(c)
    return apply_variants(c, arg, {"smollm2": _smollm2, "reward": _reward, "smoke": _smoke,
                                   "displacement": _displacement,
                                   "ches_filter": _ches_filter, "ches_random": _ches_random},
                         "configs/hh.py")
