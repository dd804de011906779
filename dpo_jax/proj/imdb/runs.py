"""The IMDb pipeline's training runs: each run's config, derived from the experiment config,
and the library task function that trains it (every run resumes from its own checkpoints).

* ``sft``: the reviews' language model, init and reference of every later run;
* DPO per beta, Preferred-FT and Unlikelihood on the reward-labelled pairs (:func:`variants`);
* the reward model (Bradley-Terry on the same pairs, prompts split train/held-out);
* PPO against that reward model and PPO-GT against the ground-truth reward, one run per target
  KL (:func:`ppo_variants`). Both are the same PPO task; PPO-GT is given the pipeline's
  ground-truth reward object as ``reward_fn``, so the library needs no IMDb code to run it;
* online and iterative DPO (:func:`online_variants`): the ``online_dpo`` task on the train
  prefixes, its pairs judged by the same ground-truth reward object.
"""

from __future__ import annotations

import ml_collections

from dpo_jax import reward_model as reward_lib
from dpo_jax import sft as sft_lib
from dpo_jax import online as online_lib
from dpo_jax import train as dpo_lib
from dpo_jax.ppo import run as ppo_lib
from dpo_jax.ppo.rewards import text_reward
from dpo_jax.proj.imdb.experiment import Experiment

# run name -> (method, setting, run config); the method names a frontier series.
Variants = dict[str, tuple[str, str, ml_collections.ConfigDict]]


def _pair_data(exp: Experiment, path: str, **extra) -> dict:
    """``data`` block of a run on pairs at ``path`` (generic jsonl), sized to the prefixes.
    Sampled completions whose first token merges with the prefix's last one have no exact
    prompt/response boundary: they are skipped and counted (summary: bad_rows_skipped)."""
    c = exp.imdb
    return dict({"source": "generic", "path": path, "tokenizer": exp.tokenizer_dir,
                 "on_bad_row": "skip",
                 "max_length": int(c.max_prefix_tokens) + int(c.max_new_tokens) + 2,
                 "max_prompt_length": int(c.max_prefix_tokens) + 1}, **extra)


def _init_from_sft(exp: Experiment) -> dict:
    return {"policy": str(exp.workdir / "sft"), "reference": ""}


def sft_config(exp: Experiment) -> ml_collections.ConfigDict:
    """The SFT run: next-token NLL on whole reviews (``sft_data``), held-out test reviews."""
    s, d = exp.imdb.sft, exp.workdir / "sft_data"
    return exp.run_config(
        "sft", sft={"source": "tokens", "target": "text", "objective": "nll",
                    "train_path": str(d / "train.jsonl.gz"), "eval_path": str(d / "eval.jsonl.gz")},
        train={"steps": s.steps, "batch_size": s.batch_size, "eval_every": s.eval_every,
               "eval_batch_size": s.batch_size, "checkpoint_every": s.checkpoint_every},
        optim={"lr": s.lr, "warmup_steps": s.warmup_steps},
        # whole reviews have no prompt: max_prompt_length only has to stay below max_length
        data={"max_length": int(exp.imdb.sft_max_length),
              "max_prompt_length": int(exp.imdb.sft_max_length) // 2})


def reward_model_config(exp: Experiment) -> ml_collections.ConfigDict:
    """The reward model run: ``rm_pairs`` train/test, decoder initialised from SFT."""
    m = exp.imdb.reward_model
    return exp.run_config(
        "reward",
        train={"steps": m.steps, "batch_size": m.batch_size, "eval_every": m.steps,
               "eval_batch_size": m.batch_size, "checkpoint_every": m.steps},
        data=_pair_data(exp, str(exp.workdir / "rm_pairs"), train_split="train",
                        eval_split="test", eval_size=0),
        init=_init_from_sft(exp),
        optim={"lr": m.lr, "name": "adamw", "warmup_steps": m.warmup_steps})


def _offline_train_and_data(exp: Experiment) -> tuple[dict, dict]:
    """The ``train`` and ``data`` blocks of the DPO-family runs on ``pairs.jsonl``
    (``imdb.runs``): checkpointed every ``imdb.eval_every`` steps, all checkpoints kept (each
    a frontier point), ``imdb.runs.eval_pairs`` held-out pairs."""
    c, r = exp.imdb, exp.imdb.runs
    train = {"steps": r.steps, "batch_size": r.batch_size, "eval_every": r.eval_every,
             "eval_batch_size": r.batch_size, "checkpoint_every": int(c.eval_every),
             "keep_checkpoints": r.steps // int(c.eval_every) + 2}
    data = _pair_data(exp, str(exp.workdir / "pairs.jsonl"), eval_split="",
                      eval_size=r.eval_pairs)
    return train, data


def variants(exp: Experiment) -> Variants:
    """DPO per beta (``imdb.betas``) and the baselines (``imdb.baselines``) on ``pairs.jsonl``,
    checkpointed every ``imdb.eval_every`` steps (each checkpoint a frontier point)."""
    c, r = exp.imdb, exp.imdb.runs
    train, data = _offline_train_and_data(exp)
    out = {}
    for beta in c.betas:
        out[f"dpo_beta{beta:g}"] = ("dpo", f"beta={beta:g}", exp.run_config(
            "dpo", train=train, data=data, init=_init_from_sft(exp),
            optim={"lr": r.lr, "name": r.optim, "warmup_steps": r.warmup_steps},
            loss={"name": "sigmoid", "beta": float(beta)}))
    for name in c.baselines:
        sft = {"source": "preference", "target": "response",
               "objective": "unlikelihood" if name == "unlikelihood" else "nll",
               "unlikelihood_alpha": float(c.unlikelihood_alpha)}
        lr = r.lr if name == "unlikelihood" else r.sft_lr
        out[name] = (name, "", exp.run_config(
            "sft", train=train, data=data, init=_init_from_sft(exp), sft=sft,
            optim={"lr": lr, "name": r.optim, "warmup_steps": r.warmup_steps}))
    return out


def ppo_variants(exp: Experiment) -> Variants:
    """PPO against the learned reward model per ``imdb.ppo_target_kls`` and PPO-GT (reward:
    ``ppo.reward='ground_truth'``, given as ``reward_fn`` by :func:`train_variant`) per
    ``imdb.ppo_gt_target_kls``: the same settings (``imdb.ppo``) but the few fields
    ``imdb.ppo_gt`` overrides for PPO-GT. Prompts: the train prefixes DPO's pairs came from."""
    c = exp.imdb
    eos = int(exp.tokenizer.eos_token_id)
    out = {}
    for method, kls in (("ppo", c.ppo_target_kls), ("ppo_gt", c.ppo_gt_target_kls)):
        p = c.ppo.to_dict()
        if method == "ppo_gt":
            p.update(c.ppo_gt.to_dict())
        every = int(p["eval_every"])
        train = {"steps": p["steps"], "batch_size": p["batch_size"], "eval_every": 0,
                 "checkpoint_every": every, "log_every": 1,
                 "keep_checkpoints": p["steps"] // every + 2}
        base = {"prompt_file": str(exp.workdir / "prefixes_train.jsonl"), "eval_prompt_file": "",
                "prompt_width": int(c.max_prefix_tokens), "max_new_tokens": int(c.max_new_tokens),
                "temperature": float(c.temperature), "stop_ids": (eos,), "pad_id": eos,
                "init_kl_coef": float(p["init_kl_coef"]), "adaptive_kl": True,
                "kl_horizon": int(p["kl_horizon"]), "epochs": int(p["epochs"]),
                "minibatches": int(p["minibatches"]),
                "detach_value_head": bool(p["detach_value_head"])}
        reward = ({"reward": "model", "reward_model": str(exp.workdir / "reward_model")}
                  if method == "ppo" else {"reward": "ground_truth"})
        for target in kls:
            out[f"{method}_kl{target:g}"] = (method, f"target_kl={target:g}", exp.run_config(
                "ppo", train=train, init=_init_from_sft(exp),
                data={"tokenizer": exp.tokenizer_dir,
                      "max_prompt_length": int(c.max_prefix_tokens)},
                optim={"lr": p["lr"], "name": "adamw", "warmup_steps": p["warmup_steps"],
                       "max_grad_norm": p["max_grad_norm"]},
                ppo=dict(base, target_kl=float(target), **reward)))
    return out


def online_variants(exp: Experiment) -> Variants:
    """Online DPO (``imdb.online_iterations`` entry 0: ``online_dpo_beta<b>``) and iterative
    DPO (entry n >= 1: ``iterative_dpo_beta<b>_r<n>``, n rounds): the offline DPO runs'
    optimizer, steps, batch size and checkpoints (frontier points), init and reference SFT,
    prompts the train prefixes the offline pairs were sampled from, ``imdb.online.
    samples_per_prompt`` completions per prefix of ``imdb.max_new_tokens`` tokens at
    ``imdb.temperature``, judged by the ground-truth reward (given as ``reward_fn`` by
    :func:`train_variant`). Eval: the offline runs' held-out pairs."""
    c, r, o = exp.imdb, exp.imdb.runs, exp.imdb.online
    eos, beta = int(exp.tokenizer.eos_token_id), float(o.beta)
    train, data = _offline_train_and_data(exp)
    online = {"reward": "ground_truth", "samples_per_prompt": int(o.samples_per_prompt),
              "max_new_tokens": int(c.max_new_tokens), "temperature": float(c.temperature),
              "stop_ids": (eos,), "pad_id": eos, "prompt_width": int(c.max_prefix_tokens),
              "prompt_file": str(exp.workdir / "prefixes_train.jsonl")}
    out = {}
    for n in c.online_iterations:
        n = int(n)
        name, method = ((f"online_dpo_beta{beta:g}", "online_dpo") if n == 0 else
                        (f"iterative_dpo_beta{beta:g}_r{n}", "iterative_dpo"))
        out[name] = (method, f"beta={beta:g}" + (f",rounds={n}" if n else ""), exp.run_config(
            "online_dpo", train=train, data=data, init=_init_from_sft(exp),
            optim={"lr": r.lr, "name": r.optim, "warmup_steps": r.warmup_steps},
            loss={"name": "sigmoid", "beta": beta}, online=dict(online, iterations=n)))
    return out


def ground_truth_reward(exp: Experiment):
    """The pipeline's ground-truth reward as a sampler reward function (``samples ->
    float32 [N]``): its completions decoded with the experiment's tokenizer and scored."""
    tok = exp.tokenizer
    return text_reward(exp.reward, lambda ids: tok.decode(ids, skip_special_tokens=True))


def train_sft(exp: Experiment) -> None:
    sft_lib.train_and_evaluate(sft_config(exp), str(exp.workdir / "sft"))


def train_reward_model(exp: Experiment) -> None:
    reward_lib.train_and_evaluate(reward_model_config(exp), str(exp.workdir / "reward_model"))


def train_variant(exp: Experiment, name: str, method: str,
                  config: ml_collections.ConfigDict) -> None:
    """Train run ``name`` of :func:`variants` / :func:`ppo_variants` in ``runs/NAME``. PPO-GT
    optimises exactly the pipeline's ground-truth reward object (the offline classifier or the
    hub one), the one that scores the frontier; PPO builds its learned reward from its config."""
    workdir = str(exp.workdir / "runs" / name)
    if method in ("ppo", "ppo_gt"):
        gt = ground_truth_reward(exp) if method == "ppo_gt" else None
        ppo_lib.train_and_evaluate(config, workdir, reward_fn=gt)
    elif method in ("online_dpo", "iterative_dpo"):
        online_lib.train_and_evaluate(config, workdir, reward_fn=ground_truth_reward(exp))
    elif method == "dpo":
        dpo_lib.train_and_evaluate(config, workdir)
    else:  # Preferred-FT, Unlikelihood: the sft task on preference data
        sft_lib.train_and_evaluate(config, workdir)
