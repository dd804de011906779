"""A synthetic preference task with a known ground-truth reward, for the offline default run.

Nothing is downloaded: pairs are generated from a seed. The task is prompt-conditional, so a
model must attend to the prompt to rank responses (a unigram bias alone cannot reach high
accuracy):

* token 0 is EOS (and the pad id), tokens ``1 .. num_topics`` are topic tokens, the rest are
  content tokens;
* a prompt is a topic token followed by random content tokens;
* a content token ``c`` is *liked* under topic ``k`` when ``c % num_topics == k - 1``;
* the true reward of a response is the fraction of its content tokens liked under the prompt's
  topic. In each pair the chosen response has the higher true reward, by at least ``min_gap``.

A policy that has learnt the task puts more probability on liked tokens given the topic, so the
DPO implicit reward ranks held-out pairs like the ground truth does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

EOS_ID = 0


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    vocab_size: int = 128  # EOS + topics + content tokens
    num_topics: int = 4  # topic tokens 1..num_topics; liked content depends on the topic
    prompt_len: tuple[int, int] = (4, 12)  # content tokens after the topic token, inclusive
    response_len: tuple[int, int] = (6, 14)  # content tokens per response, inclusive (+EOS)
    min_gap: float = 0.25  # chosen reward - rejected reward is at least this

    @property
    def first_content(self) -> int:
        return self.num_topics + 1

    @classmethod
    def from_config(cls, block) -> "SyntheticTask":
        """The task of a data config's ``synthetic`` block."""
        return cls(vocab_size=int(block.vocab_size), num_topics=int(block.num_topics),
                   prompt_len=tuple(block.prompt_len), response_len=tuple(block.response_len),
                   min_gap=float(block.min_gap))


def true_reward(task: SyntheticTask, prompt: np.ndarray, response: np.ndarray) -> float:
    """Fraction of the response's content tokens liked under the prompt's topic (EOS ignored)."""
    topic = int(prompt[0])
    content = response[response >= task.first_content]
    if content.size == 0:
        return 0.0
    return float(np.mean(content % task.num_topics == topic - 1))


def _sample_response(task: SyntheticTask, rng: np.random.Generator, topic: int, rate: float):
    n = int(rng.integers(task.response_len[0], task.response_len[1] + 1))
    content = np.arange(task.first_content, task.vocab_size)
    liked = content[content % task.num_topics == topic - 1]
    other = content[content % task.num_topics != topic - 1]
    take_liked = rng.random(n) < rate
    tokens = np.where(take_liked, rng.choice(liked, n), rng.choice(other, n))
    return np.concatenate([tokens, [EOS_ID]]).astype(np.int32)


def _sample_prompt(task: SyntheticTask, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """``(topic, prompt)``: a topic in 1..num_topics, then the int32 prompt of that topic
    token followed by ``prompt_len`` uniform content tokens (drawn in that order)."""
    topic = int(rng.integers(1, task.num_topics + 1))
    n_prompt = int(rng.integers(task.prompt_len[0], task.prompt_len[1] + 1))
    prompt = np.concatenate(
        [[topic], rng.integers(task.first_content, task.vocab_size, n_prompt)]).astype(np.int32)
    return topic, prompt


def split_draw(cfg, split: str) -> tuple[SyntheticTask, int, int]:
    """``(task, count, seed)`` of ``split`` for the data block ``cfg``: the task of
    ``cfg.synthetic``; train: ``num_train`` items from ``train_seed``; eval: ``num_eval`` (its
    first ``cfg.eval_size`` when > 0) from ``eval_seed``. Every synthetic loader draws its items
    with these."""
    s = cfg.synthetic
    if split == "train":
        return SyntheticTask.from_config(s), int(s.num_train), int(s.train_seed)
    n = s.num_eval if cfg.eval_size <= 0 else min(cfg.eval_size, s.num_eval)
    return SyntheticTask.from_config(s), int(n), int(s.eval_seed)


def make_pairs(task: SyntheticTask, num_pairs: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``num_pairs`` tokenised pairs ``{prompt, chosen, rejected}``, EOS ending each response."""
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < num_pairs:
        topic, prompt = _sample_prompt(task, rng)
        a = _sample_response(task, rng, topic, rng.random())
        b = _sample_response(task, rng, topic, rng.random())
        ra, rb = true_reward(task, prompt, a), true_reward(task, prompt, b)
        if abs(ra - rb) < task.min_gap:
            continue
        chosen, rejected = (a, b) if ra > rb else (b, a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def make_ranked(task: SyntheticTask, num_prompts: int, seed: int, num_responses: int = 4
                ) -> list[dict]:
    """``num_prompts`` ranked lists ``{prompt, responses, scores}``: ``num_responses`` responses
    per prompt (each with its own uniform liked-token rate), sorted by true reward, best first;
    ``scores`` float32 [K] are the true rewards (ties possible: equal fractions). Drawn from
    their own stream (``seed``), so pairs of ``make_pairs`` are unchanged."""
    rng = np.random.default_rng([seed, 4099])
    items = []
    for _ in range(num_prompts):
        topic, prompt = _sample_prompt(task, rng)
        responses = [_sample_response(task, rng, topic, rng.random())
                     for _ in range(num_responses)]
        scores = np.asarray([true_reward(task, prompt, r) for r in responses], np.float32)
        order = np.argsort(-scores, kind="stable")
        items.append({"prompt": prompt, "responses": [responses[i] for i in order],
                      "scores": scores[order]})
    return items


def best_vs_random(lists: list[dict], seed: int) -> list[dict[str, np.ndarray]]:
    """The common binarisation of ranked lists (UltraFeedback's): per list, the best response
    against one drawn uniformly from those with a lower score (lists whose responses all tie
    give no pair)."""
    rng = np.random.default_rng([seed, 7717])
    pairs = []
    for it in lists:
        lower = np.nonzero(it["scores"] < it["scores"][0])[0]
        if lower.size:
            pairs.append({"prompt": it["prompt"], "chosen": it["responses"][0],
                          "rejected": it["responses"][int(rng.choice(lower))]})
    return pairs


def labelled(lists: list[dict], threshold: float = 0.5) -> list[dict]:
    """Every response of ranked lists as an unpaired example: desirable when its true reward is
    at least ``threshold`` (an absolute thumbs-up, as unpaired feedback is collected)."""
    return [{"prompt": it["prompt"], "completion": r, "desirable": bool(s >= threshold)}
            for it in lists for r, s in zip(it["responses"], it["scores"])]


# ------------------------------------------------------------------ multi-turn conversations
#
# The task extended to turns (issue 31, item 5): a conversation is T rounds of a user turn (its
# own topic token, then ``prompt_len`` content tokens) and an assistant turn (``response_len``
# content tokens). The true reward of an assistant turn is the fraction of its content tokens
# liked under its own turn's topic, with the liked class shifted by ``turn_shift`` per turn:
# content ``c`` is liked at turn ``t`` (0-based) under topic ``k`` when
# ``c % num_topics == (k - 1 + t * turn_shift) % num_topics``. With ``turn_shift`` 0 one rule
# holds at every turn (the policy must find the latest topic token in a long history); with
# ``turn_shift`` != 0 the preference also depends on how many turns came before, so the history
# decides which tokens are liked. At every turn two alternatives are drawn (each its own uniform
# liked-token rate, true rewards at least ``min_gap`` apart); the chosen one (higher reward)
# continues the conversation. Inside a conversation an assistant turn has no end token: the next
# user turn's topic token delimits it (as ``"\n\nHuman:"`` does in HH); a response that is
# scored gets EOS.


def liked_class(task: SyntheticTask, topic: int, turn: int, turn_shift: int) -> int:
    """The residue ``c % num_topics`` of the content tokens liked at ``turn`` under ``topic``."""
    return (topic - 1 + turn * turn_shift) % task.num_topics


def turn_reward(task: SyntheticTask, topic: int, turn: int, response: np.ndarray,
                turn_shift: int = 0) -> float:
    """True reward of an assistant turn: the fraction of its content tokens (EOS and topic
    tokens ignored) liked at ``turn`` under ``topic`` (module section above); 0 with none."""
    response = np.asarray(response)
    content = response[response >= task.first_content]
    if content.size == 0:
        return 0.0
    return float(np.mean(content % task.num_topics == liked_class(task, topic, turn, turn_shift)))


def make_conversations(task: SyntheticTask, num: int, seed: int, turns: int,
                       turn_shift: int = 0) -> list[dict]:
    """``num`` conversations of ``turns`` rounds (module section above), from ``seed``.

    Each is ``{"topics": [T] ints, "users": [T] int32 arrays (topic token + content),
    "chosen": [T], "rejected": [T] int32 arrays (content only, no EOS), "rewards": float32
    [T, 2] (true reward of chosen, rejected per turn)}``. Raises ValueError for ``turns < 1``."""
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    rng = np.random.default_rng([seed, 31, turns])
    content = np.arange(task.first_content, task.vocab_size)
    out = []
    for _ in range(num):
        conv = {"topics": [], "users": [], "chosen": [], "rejected": [], "rewards": []}
        for t in range(turns):
            topic, user = _sample_prompt(task, rng)
            cls = liked_class(task, topic, t, turn_shift)
            liked, other = content[content % task.num_topics == cls], \
                content[content % task.num_topics != cls]
            while True:
                pair = []
                for _ in range(2):
                    n = int(rng.integers(task.response_len[0], task.response_len[1] + 1))
                    take = rng.random(n) < rng.random()
                    pair.append(np.where(take, rng.choice(liked, n),
                                         rng.choice(other, n)).astype(np.int32))
                ra, rb = (turn_reward(task, topic, t, r, turn_shift) for r in pair)
                if abs(ra - rb) >= task.min_gap:
                    break
            if ra < rb:
                pair, (ra, rb) = pair[::-1], (rb, ra)
            conv["topics"].append(topic)
            conv["users"].append(user)
            conv["chosen"].append(pair[0])
            conv["rejected"].append(pair[1])
            conv["rewards"].append((ra, rb))
        conv["rewards"] = np.asarray(conv["rewards"], np.float32)
        out.append(conv)
    return out


def _eos(tokens: np.ndarray) -> np.ndarray:
    return np.concatenate([tokens, [EOS_ID]]).astype(np.int32)


def conversation_history(conv: dict, turn: int) -> np.ndarray:
    """int32 tokens before assistant turn ``turn``: every earlier user turn and chosen
    assistant turn, then user turn ``turn``."""
    parts = []
    for t in range(turn):
        parts += [conv["users"][t], conv["chosen"][t]]
    parts.append(conv["users"][turn])
    return np.concatenate(parts).astype(np.int32)


def conversation_branch_points(conv: dict) -> list[dict]:
    """The preference tree of a conversation: per turn ``t`` a branch point ``{history,
    responses: [chosen + EOS, rejected + EOS], depth: t}`` whose history holds the chosen turns
    before it (turn-level DPO: a pair at every assistant turn)."""
    return [{"history": conversation_history(conv, t),
             "responses": [_eos(conv["chosen"][t]), _eos(conv["rejected"][t])], "depth": t}
            for t in range(len(conv["users"]))]


CONVERSATION_PAIRS = ("last_turn", "whole")


def conversation_pair(conv: dict, mode: str) -> dict[str, np.ndarray]:
    """One pair per conversation: ``'last_turn'`` = the final turn's alternatives after the full
    (chosen) history; ``'whole'`` = the all-chosen conversation against the all-rejected one
    after the first user turn (the later user turns are part of both responses, as when whole
    dialogues are given as chosen / rejected texts: every token after the shared prompt is
    scored). Raises ValueError for another ``mode``."""
    last = len(conv["users"]) - 1
    if mode == "last_turn":
        return {"prompt": conversation_history(conv, last), "chosen": _eos(conv["chosen"][last]),
                "rejected": _eos(conv["rejected"][last])}
    if mode == "whole":
        side = lambda key: _eos(np.concatenate(  # noqa: E731
            [conv[key][0]] + [x for t in range(1, last + 1)
                              for x in (conv["users"][t], conv[key][t])]))
        return {"prompt": np.asarray(conv["users"][0], np.int32), "chosen": side("chosen"),
                "rejected": side("rejected")}
    raise ValueError(f"conversation pairs mode must be one of {CONVERSATION_PAIRS}, got {mode!r}")
