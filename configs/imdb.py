"""The paper's IMDb experiment (Section 6.1, Figure 2 left) as one resumable pipeline.

    python -m dpo_jax.main --config=configs/imdb.py:cpu --workdir=runs/imdb_cpu

Variants (``:name``):
  * ``tiny``  -- tests only: a few dozen reviews written by the test (``imdb.data_dir``), a
    one-layer model, every stage in seconds.
  * ``cpu``   -- offline, 2 CPU cores: the IMDb BPE (8192), a 4-layer d=256 GPT-2-shaped model
    pretrained on IMDb reviews cut to 64 tokens, 1000 train prefixes x 4 samples, 4 betas +
    Preferred-FT + Unlikelihood, a reward model + PPO at target KL 3/6/9/12 + PPO-GT,
    online and iterative DPO (beta 0.1, pairs judged by the ground-truth reward), frontier on
    256 test prefixes.
  * ``gpu``   -- the same recipe at GPT-2-small shape on all reviews (one accelerator).
  * ``smollm2`` -- a real pretrained LM offline: SmolLM2-135M-Instruct (``$DPO_JAX_MODELS``,
    ``bash ../shared/models/smollm2.sh``) with its own tokenizer, SFT on IMDb first, 24-token
    continuations, DPO at 2 betas + Preferred-FT, PPO-GT, Best-of-N (what ran in about an hour
    of the 2-core CPU: experiments/imdb/README.md section 7); the samples' fluency as their
    perplexity under SFT beside the real reviews'.
  * ``paper`` -- gpt2-large from ``model.hf_path`` (hub or a local directory) with its own
    tokenizer, reward ``siebert/sentiment-roberta-large-english`` through
    ``HubSentimentReward`` (needs network/hub cache; never run here).
Stage outputs live in the workdir (see dpo_jax/proj/imdb/pipeline.py); rerunning skips finished
stages, and an interrupted training stage resumes from its checkpoint.

The reviews: ``imdb.data_dir`` empty (the default) reads the hub dataset ``stanfordnlp/imdb``
through ``datasets`` (network, or its cache); offline, point it at a directory of
``{train,test,unsup}-*.parquet`` shards or a ``datasets.save_to_disk`` directory, e.g.
``--config.imdb.data_dir=$DPO_JAX_DATA/imdb`` (``dpo_jax/proj/imdb/text.py``).

The experiment's code is the project ``dpo_jax/proj/imdb``, which only this config names (as
``config.task``); the library never imports it.
"""

import ml_collections

from dpo_jax.config import base_config
from dpo_jax.models.local import SMOLLM2, local_model
from dpo_jax.sft import add_sft_config


def _imdb_block() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data_dir = ""  # '' = hub stanfordnlp/imdb; or {train,test,unsup}-*.parquet / save_to_disk dir
    c.use_unsup = True  # SFT and tokenizer also on the 50k unlabelled reviews
    c.max_reviews = 0  # reviews read per split (0 = all)
    c.max_test_reviews = 0  # test reviews read (0 = all): test prefixes, reward accuracy
    c.tokenizer = ""  # '' = build the IMDb BPE in the workdir; else a tokenizer directory
    c.vocab_size = 8192  # IMDb BPE size
    c.reward_dir = ""  # a saved SentimentReward ('' = fit one on IMDb train in the workdir)
    c.hub_reward = ""  # hub classifier name (HubSentimentReward) instead of the offline one
    c.reward_features = 2**20  # hashed n-gram buckets of the offline reward
    c.reward_steps = 300  # full-batch Adam steps of the offline reward
    c.sft_max_length = 64  # tokens per SFT review (cut, then EOS)
    c.sft_eval_size = 512  # held-out test reviews for SFT eval NLL
    # 800 x 32 x 64 tokens: a third of an epoch of train+unsup, what fits the 2-core budget
    c.sft = ml_collections.ConfigDict(dict(steps=800, batch_size=32, lr=1e-3, warmup_steps=100,
                                           eval_every=400, checkpoint_every=400))
    c.num_train_prefixes = 1000  # prompts whose samples become preference pairs
    c.num_test_prefixes = 256  # held-out TEST prompts of the frontier evaluation
    c.min_prefix_tokens = 2  # paper: prefixes of 2-8 tokens
    c.max_prefix_tokens = 8
    c.samples_per_prefix = 4  # paper: 4 samples -> 6 pairs (ties dropped)
    c.max_new_tokens = 48  # completion length bound
    c.temperature = 1.0  # sampling temperature (1.0: samples from pi, as the KL estimate needs)
    c.sample_batch = 128  # prompts per generate call (fixed shape: one compile)
    c.betas = (0.05, 0.1, 1.0, 5.0)  # DPO beta sweep (the paper's)
    c.baselines = ("preferred_ft", "unlikelihood")
    c.unlikelihood_alpha = 1.0
    c.runs = ml_collections.ConfigDict(dict(steps=200, batch_size=32, lr=1e-4, sft_lr=1e-4,
                                            optim="adamw", warmup_steps=20, eval_every=0,
                                            eval_pairs=64))
    # Online DPO (task 'online_dpo'): per step, `online.samples_per_prompt` completions of each
    # of runs.batch_size train prefixes from the current policy, judged by the ground-truth
    # reward (as the offline pairs were labelled), best vs worst -> one pair per prefix; the
    # runs.* optimizer, steps and batch size, so an online run trains on as many pairs as an
    # offline one. One run per entry of `online_iterations`: 0 = online (sample every step),
    # n >= 1 = iterative DPO (n rounds, each sampling from the policy as the round began).
    c.online_iterations = (0, 4)
    c.online = ml_collections.ConfigDict(dict(beta=0.1, samples_per_prompt=2))
    c.eval_every = 50  # frontier point every K steps of every run (checkpoints kept)
    c.eval_samples_per_prefix = 1  # policy samples per test prefix at each frontier point
    c.best_of_n = (2, 4, 16)  # Best-of-N of SFT samples (reward of the best of n)
    c.plot_kl_max = 40.0  # frontier.png x-axis end (0 = all); farther points sit on the edge
    # RLHF baseline: a Bradley-Terry reward model on the same pairs, then PPO against it.
    c.reward_model = ml_collections.ConfigDict(dict(
        steps=200, batch_size=32, lr=1e-4, warmup_steps=20,  # ~1.2 epochs of its 5.4k pairs
        eval_fraction=0.1))  # prompts held out for its accuracy
    c.ppo_target_kls = (3.0, 6.0, 9.0, 12.0)  # PPO (learned reward), paper's sweep
    c.ppo_gt_target_kls = (3.0, 6.0, 12.0)  # PPO-GT (the ground-truth reward)
    c.ppo = ml_collections.ConfigDict(dict(
        steps=100,  # PPO iterations (rollout batch + epochs x minibatches updates each)
        batch_size=64,  # rollouts per iteration (100 x 64 = 6400 episodes ~ DPO's 200 x 32 pairs)
        # 5e-5: clip fraction 6-8% and reward -0.24 -> 0.8 in 12 PPO-GT iterations of the cpu
        # model; 1e-5 left clipfrac ~0 and the reward flat (experiments/imdb/README.md).
        lr=5e-5, warmup_steps=0, max_grad_norm=1.0,
        epochs=4, minibatches=4,  # trl's recipe
        detach_value_head=False,  # trl's shared trunk (see dpo_jax/ppo/config.py)
        init_kl_coef=0.1,
        # Ziegler et al.'s controller moves beta by at most 20% x episodes/horizon per iteration;
        # trl's 10000 would leave beta fixed over 6400 episodes, so the target could not act.
        kl_horizon=1000,
        eval_every=25))  # a frontier point every K iterations
    # PPO-GT's overrides of that block. Its reward (the classifier's logit, which PPO can push
    # to ~10 by stacking positive n-grams) raises KL far faster than the learned reward model's
    # (~1.8 at most here): with horizon 1000 a target of 6 ended at KL 33, so the controller
    # reacts 5x faster and points are taken every 10 iterations to trace the low-KL part.
    c.ppo_gt = ml_collections.ConfigDict(dict(kl_horizon=200, eval_every=10))
    return c


def _smollm2(c) -> None:
    """The paper's recipe on a real pretrained LM on 2 CPU cores: SmolLM2-135M-Instruct (from
    ``$DPO_JAX_MODELS``, ``bash ../shared/models/smollm2.sh``) with its own tokenizer, SFT on
    IMDb reviews first (as the paper does with GPT-2-large), short prefixes and continuations,
    the offline n-gram sentiment classifier as the ground truth. Everything is the paper's
    pipeline at a smaller count: 24-token continuations (paper: up to 128 with GPT-2-large),
    256 train prefixes x 4 samples, DPO at beta 0.1 and 2 and Preferred-FT (50 steps of 16
    pairs), PPO-GT at target KL 6 (20 iterations of 32 rollouts, 2 epochs x 2 minibatches),
    no PPO against a learned reward model (set ``imdb.ppo_target_kls`` to add it: a reward
    model stage and one run per target). This is what ran in the 2026-12-06 session, about
    an hour of stage time (experiments/imdb/README.md section 7)."""
    c.model.overrides = ml_collections.ConfigDict()  # the checkpoint's own shape
    c.model.hf_path = local_model(SMOLLM2)
    c.imdb.tokenizer = c.model.hf_path  # its own tokenizer (EOS <|im_end|> ends a review)
    c.imdb.update(sft_max_length=48, sft_eval_size=256, num_train_prefixes=256,
                  num_test_prefixes=128, max_new_tokens=24, sample_batch=128,
                  betas=(0.1, 2.0), baselines=("preferred_ft",), online_iterations=(),
                  eval_every=10, best_of_n=(2, 4, 16))
    # a pretrained model: small steps (the paper's 1e-6 for GPT-2-large over 5,000 steps of 64
    # would barely move in 100 steps of 16), AdamW, no clipping change from the paper's code
    c.imdb.sft.update(steps=150, batch_size=16, lr=2e-5, warmup_steps=10, eval_every=75,
                      checkpoint_every=75)
    c.imdb.runs.update(steps=50, batch_size=16, lr=1e-5, sft_lr=1e-5, optim="adamw",
                       warmup_steps=10, eval_every=0, eval_pairs=64)
    c.imdb.reward_model.update(steps=100, batch_size=16, lr=1e-5, warmup_steps=10,
                               eval_fraction=0.1)
    c.imdb.ppo_target_kls = ()
    c.imdb.ppo_gt_target_kls = (6.0,)
    c.imdb.ppo.update(steps=20, batch_size=32, lr=5e-6, warmup_steps=0, max_grad_norm=1.0,
                      epochs=2, minibatches=2, init_kl_coef=0.1, kl_horizon=1000, eval_every=10)
    c.imdb.ppo_gt.update(kl_horizon=200, eval_every=10)


def get_config(arg: str = "cpu"):
    c = add_sft_config(base_config())
    c.task = "dpo_jax.proj.imdb.pipeline:run_pipeline"
    c.imdb = _imdb_block()
    c.train.async_checkpointing = False
    c.train.log_every = 20
    # Every stage names the optimizer fields its recipe changes; the rest stay the paper's code's
    # (constant schedule after warmup, clipping 10), also for the 'paper' variant that imports
    # gpt2-large through model.hf_path (where 'auto' would pick TRL's DPOConfig defaults).
    c.optim.defaults = "offline"
    c.model.overrides = ml_collections.ConfigDict(
        {"n_layer": 4, "d_model": 256, "n_head": 4, "d_ff": 1024, "max_len": 128})
    variant = arg or "cpu"
    if variant == "tiny":
        i = c.imdb
        i.data_dir = ""  # the test writes reviews and sets this
        i.vocab_size = 300
        i.reward_features = 2**12
        i.reward_steps = 30
        i.sft_max_length = 24
        i.sft_eval_size = 8
        i.sft.update(steps=6, batch_size=8, lr=3e-3, warmup_steps=0, eval_every=6,
                     checkpoint_every=0)
        i.num_train_prefixes = 8
        i.num_test_prefixes = 8
        i.max_new_tokens = 6
        i.sample_batch = 32
        i.betas = (0.1,)
        i.runs.update(steps=2, batch_size=8, lr=1e-3, sft_lr=1e-3, optim="adamw",
                      warmup_steps=0, eval_every=0, eval_pairs=8)
        i.eval_every = 2
        i.online_iterations = (0, 2)
        i.best_of_n = (2, 4)
        i.reward_model.update(steps=2, batch_size=8, lr=1e-3, warmup_steps=0,
                              eval_fraction=0.25)
        i.ppo_target_kls = (6.0,)
        i.ppo_gt_target_kls = (6.0,)
        i.ppo.update(steps=2, batch_size=8, lr=1e-3, warmup_steps=0, max_grad_norm=1.0,
                     epochs=2, minibatches=2, init_kl_coef=0.1, kl_horizon=100, eval_every=2)
        i.ppo_gt.update(kl_horizon=50, eval_every=1)
        c.model.overrides = ml_collections.ConfigDict(
            {"n_layer": 1, "d_model": 32, "n_head": 2, "d_ff": 64, "max_len": 32})
        c.data.buckets = "32"  # one shape for SFT and pairs: one compile per step function
        c.train.log_every = 1
    elif variant == "cpu":
        pass
    elif variant == "gpu":
        c.model.preset = "gpt2"
        c.model.overrides = ml_collections.ConfigDict({"max_len": 256})
        c.model.dtype = "bfloat16"
        c.imdb.update(sft_max_length=256, num_train_prefixes=10000, num_test_prefixes=1000,
                      max_new_tokens=64, sample_batch=512, betas=(0.05, 0.1, 0.2, 0.5, 1.0, 5.0))
        c.imdb.sft.update(steps=6000, batch_size=64, lr=3e-4, warmup_steps=500,
                          eval_every=1000, checkpoint_every=1000)
        c.imdb.runs.update(steps=2000, batch_size=64, lr=1e-6, sft_lr=1e-6, optim="rmsprop",
                           warmup_steps=150, eval_every=0, eval_pairs=256)
        c.imdb.eval_every = 250
        c.imdb.reward_model.update(steps=1000, batch_size=64, lr=1e-5, warmup_steps=150,
                                   eval_fraction=0.05)
        c.imdb.ppo_gt_target_kls = (3.0, 6.0, 9.0, 12.0)
        c.imdb.ppo.update(
            steps=400, batch_size=256, lr=1.41e-5,  # trl's GPT-2 sentiment example
            warmup_steps=0, max_grad_norm=1.0, epochs=4, minibatches=4, init_kl_coef=0.2,
            kl_horizon=10000, eval_every=50)
        c.imdb.ppo_gt.update(kl_horizon=10000, eval_every=50)
    elif variant == "smollm2":
        _smollm2(c)
    elif variant == "paper":
        # the checkpoint's own shape: the cpu shape's overrides would replace its layers
        c.model.overrides = ml_collections.ConfigDict()
        c.model.hf_path = "gpt2-large"
        c.model.dtype = "bfloat16"
        c.imdb.tokenizer = "gpt2-large"  # its own tokenizer (hub or cache; or a local directory)
        c.imdb.hub_reward = "siebert/sentiment-roberta-large-english"
        c.imdb.update(sft_max_length=512, num_train_prefixes=25000, num_test_prefixes=1000,
                      max_new_tokens=128, sample_batch=256, betas=(0.05, 0.1, 0.5, 1.0, 5.0))
        c.imdb.sft.update(steps=5000, batch_size=64, lr=1e-5, warmup_steps=150,
                          eval_every=1000, checkpoint_every=1000)
        c.imdb.runs.update(steps=5000, batch_size=64, lr=1e-6, sft_lr=1e-6, optim="rmsprop",
                           warmup_steps=150, eval_every=0, eval_pairs=512)
        c.imdb.eval_every = 500
        c.imdb.reward_model.update(steps=2000, batch_size=64, lr=1e-6, warmup_steps=150,
                                   eval_fraction=0.05)
        c.imdb.ppo_gt_target_kls = (3.0, 6.0, 9.0, 12.0)
        c.imdb.ppo.update(steps=1000, batch_size=256, lr=1.41e-5, warmup_steps=0,
                          max_grad_norm=1.0, epochs=4, minibatches=4, init_kl_coef=0.2,
                          kl_horizon=10000, eval_every=100)
        c.imdb.ppo_gt.update(kl_horizon=10000, eval_every=100)
    else:
        raise ValueError(f"unknown variant {variant!r} of configs/imdb.py "
                         "(known: tiny, cpu, gpu, smollm2, paper)")
    return c
