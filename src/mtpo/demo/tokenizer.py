"""The demo's tokenizer: a small BPE vocabulary built locally with `tokenizers`, Gemma's chat format.

Why these choices (measured by the probe in docs/demo.md):
- Numbers are cut into chunks of at most three digits, left to right (`16940` → `169` `40`), and
  every chunk of 1–3 digits is a token. A tiny model can then copy a number from the question into
  its code, and from the tool output into its answer, token by token; with one token per character
  it invented operands instead.
- Words keep their leading space (` pens`), runs of punctuation are pre-tokens of their own (so
  "```" and "))" can become single tokens); BPE merges are learnt from demo trajectories. Anything
  unseen falls back to single characters; a character outside printable ASCII becomes `<unk>`.
- The chat template is Gemma's own (`<bos><start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>
  model\\n…`), so the demo runs the same rendering, masking and rollout code as a real Gemma model.
  `<end_of_turn>` is also the eos token: generation stops where the assistant turn ends.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = {"pad_token": "<pad>", "eos_token": "<end_of_turn>", "bos_token": "<bos>", "unk_token": "<unk>"}
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# Gemma's chat template as published (the same text as TRL's gemma.jinja).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
# digit chunks | words with their leading space | one whitespace character | punctuation runs
PRE_TOKEN = r"\d{1,3}| ?[A-Za-z_]+|\s|[^\sA-Za-z0-9_]+"
DIGIT_CHUNKS = [str(i) for i in range(10)] + [f"{i:02d}" for i in range(100)] + [f"{i:03d}" for i in range(1000)]


def build_tokenizer(texts: list[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Train the BPE merges on `texts` (message contents) and wrap it with the Gemma template."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRE_TOKEN), behavior="isolated")
    tok.decoder = decoders.Fuse()  # tokens carry their own spaces: decoding is concatenation
    alphabet = sorted(set(string.printable) - set("\x0b\x0c\r"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CONTROL, initial_alphabet=alphabet,
                                  min_frequency=2, show_progress=False)
    # Every digit chunk, several times, so each 2- and 3-digit chunk gets its merge whatever the corpus.
    tok.train_from_iterator(list(texts) + [" ".join(DIGIT_CHUNKS)] * 3, trainer=trainer)
    missing = [c for c in DIGIT_CHUNKS if tok.token_to_id(c) is None]
    if missing:
        raise RuntimeError(f"vocab_size {vocab_size} too small: digit chunks {missing[:5]}... have no token")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                 model_max_length=1024, **SPECIAL)
    hf.chat_template = GEMMA_TEMPLATE
    return hf
