"""Tiny tokenizers built locally (no hub) that mimic the BOS/EOS/chat conventions of real ones.

Tests need GPT-2-like (no BOS, pad == EOS, GPT-2's split regex), Llama-3-like (BOS prepended,
byte-level BPE with Llama-3's split regex, which joins punctuation to a following newline),
Llama-2 / Mistral-like (SentencePiece-style Metaspace BPE with byte fallback, a '▁' prepended to
the text, ``transformers.LlamaTokenizer``) and chat-template (ChatML: EOS inside the template,
whitespace after it; Llama-3: end-of-turn token that may differ from EOS; Llama-2 / Mistral:
EOS closes the assistant turn) behaviour without network.
"""

from __future__ import annotations

import pathlib

CORPUS = [
    "Human: what is the capital of France? Assistant: Paris is the capital of France.",
    "The movie was great, I loved it. The film was terrible and boring.",
    "SUBREDDIT: r/relationships TITLE: help POST: my friend is late TL;DR: friend late",
    "Hello there! How are you today? I am fine, thank you very much.",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 \n\n \n",
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# Llama-3's pre-tokenizer split (its tokenizer.json): unlike GPT-2's, a punctuation run takes the
# newlines after it (':\n' is one piece) and one non-letter may lead a word (':Paris').
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


# Text that makes the Llama-3-style tokenizer learn the pieces its split allows and GPT-2's does
# not (':\n', '?\n', ':Paris'), as the real Llama-3 vocabulary has them.
LLAMA3_EXTRA = ["Question:\nAnswer:\nWhy?\nHow?\n:Paris :Paris"] * 8


def _byte_bpe(specials: list[str], vocab_size: int = 400, split: str = "gpt2"):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if split == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS + (LLAMA3_EXTRA if split == "llama3" else []), trainer)
    return tok


def llama3_style_tokenizer(eos: str = "<|end_of_text|>"):
    """BOS '<|begin_of_text|>' prepended by the post-processor, Llama-3 chat template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = _byte_bpe(specials, split="llama3")
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token=eos, pad_token="<|end_of_text|>",
                                   chat_template=LLAMA3_TEMPLATE)


def chatml_tokenizer(eos: str = "<|im_end|>"):
    """No BOS; '<|im_end|>' (id 2) closes each turn inside the template, followed by a newline.
    EOS is '<|im_end|>' (Qwen2-Instruct) or, with ``eos='<|endoftext|>'`` (id 0, a base model's
    EOS), a token other than the turn end."""
    from transformers import PreTrainedTokenizerFast

    tok = _byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos,
                                   pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def gpt2_style_tokenizer():
    """No BOS added, EOS '<|endoftext|>', pad unset (load_tokenizer sets pad = EOS)."""
    from transformers import PreTrainedTokenizerFast

    tok = _byte_bpe(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")


DATA_ENV = "DPO_JAX_DATA"


def data_root(start: "str | pathlib.Path | None" = None) -> "pathlib.Path":
    """The real-data root holding ``imdb/``, ``gpt2_tokenizer/`` and ``hh_rlhf/``.

    ``$DPO_JAX_DATA`` when set; else the nearest ``shared/data`` directory above ``start``
    (default: this repository), which is ``../shared/data`` beside a checkout (a worktree
    nested deeper finds the same one); else ``../shared/data`` beside the repository. The
    returned directory may not exist: configs use it as a default, tests skip without it
    (:func:`find_shared_data`)."""
    import os
    import pathlib

    env = os.environ.get(DATA_ENV)
    if env:
        return pathlib.Path(env)
    repo = pathlib.Path(__file__).resolve().parents[2]
    here = pathlib.Path(start).resolve() if start is not None else repo
    for parent in here.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return repo.parent / "shared" / "data"


def llama2_style_tokenizer(chat_template: str = LLAMA2_TEMPLATE):
    """``transformers.LlamaTokenizer`` over a locally trained Metaspace BPE with byte fallback:
    '<s>' prepended, '</s>' EOS, no pad, and '▁' prepended to the text, so a response
    tokenised alone starts with a word-start piece ('4' -> '▁4') that it never has after a
    prompt ('A:4' -> 'A', ':', '4'). ``chat_template``: Llama-2's (default) or MISTRAL_TEMPLATE;
    both close the assistant turn with EOS."""
    import json
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Merges never cross a word start, as in SentencePiece; encoding then uses the whole text.
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                 split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=list(string.printable.strip() + "\u2581"))
    bpe.train_from_iterator(CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    return LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                          add_bos_token=True, chat_template=chat_template)


def find_shared_data(start: "str | pathlib.Path | None" = None) -> "pathlib.Path | None":
    """:func:`data_root` when that directory exists, else None (so tests can skip, naming
    ``$DPO_JAX_DATA``)."""
    root = data_root(start)
    return root if root.is_dir() else None
