"""Conversation → (input_ids, trainable mask, segments) with mistral-common's own encoder.

Current Mistral models (Mistral Small 3.x, Ministral, Magistral, Devstral, Nemo) ship `tekken.json`
and no Jinja template; transformers loads them as `MistralCommonBackend`, a wrapper around
mistral-common's `MistralTokenizer`, which is the reference for this format. `MistralRenderer` is
`ChatRenderer`'s public API (render, render_pair, render_labeled, generation_context) on top of it.
`mtpo.render.make_renderer` picks it for a `MistralCommonBackend` tokenizer.

How it works (no hard-coded token ids, no template text):

1. The whole conversation is encoded once by `MistralTokenizer.encode_chat_completion` — in
   finetuning mode when it ends with an assistant message, else in test mode (serving rules without
   the model-name requirement): those are the only modes mistral-common's validator accepts for
   such conversations. These ids are the row's `input_ids`, exactly.
2. Where trained text starts or stops, the prefix `messages[:k]` is encoded the same way (test mode
   when it ends with a user/tool turn, finetuning mode when it ends with an assistant turn) and must
   be a token prefix of the whole encoding; its length is the boundary. mistral-common encodes
   every message on its own, so no token straddles two messages.
3. A trained assistant message owns the tokens between its two boundaries: its content, its
   `[TOOL_CALLS]…` and its closing `</s>` (the tokenizer's eos id; not trained with
   `end_of_turn: none`, or `last` on earlier turns). `[INST]…[/INST]`, `[TOOL_RESULTS]…`, the system
   prompt, `[AVAILABLE_TOOLS]…` and BOS belong to the other messages: external.
4. `text` and `offsets` (for `mtpo inspect`) come from each token's own bytes, decoded in sequence;
   a token ending inside a multi-byte character has zero width, the next one carries the character.

Versions v2/v3 (SentencePiece v2, v3 and the tekken files mistral-common ships) put the system prompt
(and v2–v11 the `[AVAILABLE_TOOLS]` list) into the LAST user message, and v2 drops tool calls before
it: with a later user turn those conversations are not prefix-stable. Such rows get a RecordError
naming the row, the message and the reason (step 2 finds it; the cause is diagnosed by re-encoding).
`render_turns` gives the per-turn alternative: one sequence per assistant turn, exact for every version.

Special-token text in content (`[INST]`, `</s>`) is harmless here: mistral-common never parses
control tokens out of text, so no content check is needed.
"""

from __future__ import annotations

import codecs
import re

import numpy as np

from mtpo.data import Conversation, Message, RecordError
from mtpo.render import ChatRenderer, Rendered, RenderOptions, Segment, TemplateRewrite

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def mistral_format(value: bool | None, chat_template) -> bool | None:
    """transformers' `mistral_format` for AutoTokenizer: a Jinja template (`chat_template`) needs the
    HF tokenizer, so auto (None) becomes False when one is given."""
    return False if value is None and chat_template else value


def is_mistral_common(tokenizer) -> bool:
    """True for transformers' `MistralCommonBackend` (checked by name: no mistral-common import needed)."""
    return any(c.__name__ == "MistralCommonBackend" for c in type(tokenizer).__mro__)


class MistralRenderer(ChatRenderer):
    """Renders conversations with mistral-common's encoder. Build once, call per row.

    Shares `render_pair`/`render_labeled` with `ChatRenderer` (they only call `render`); everything
    template-specific is replaced."""

    def __init__(self, tokenizer, options: RenderOptions | None = None):
        from mistral_common.protocol.instruct.normalize import get_normalizer
        from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self.tokenizer = tokenizer
        self.options = options or RenderOptions()
        if self.options.chat_template:
            raise ValueError("a Jinja chat template needs the Hugging Face tokenizer, not mistral-common's: load it "
                             "with `mistral_format: false` (inspect: --mistral-format false)")
        if set(self.options.trainable_roles) != {"assistant"}:
            raise ValueError("with mistral-common's encoder only assistant messages can be trained (trainable_roles: "
                             f"[assistant]), got {list(self.options.trainable_roles)}")
        if self.options.end_of_turn_text:
            raise ValueError("end_of_turn_text does not apply to mistral-common's encoder (the end of turn is </s>)")
        mt = tokenizer.tokenizer  # mistral_common MistralTokenizer
        self.version = mt.version.value
        self._raw = mt.instruct_tokenizer.tokenizer  # Tekkenizer or SentencePieceTokenizer
        normalizer = get_normalizer(mt.version, self._raw.model_settings_builder)
        # One encoder per validation mode, sharing the (large) instruct tokenizer.
        self._encoders = {mode: MistralTokenizer(mt.instruct_tokenizer, get_validator(mt.version, mode), normalizer)
                          for mode in (ValidationMode.test, ValidationMode.finetuning)}
        self._test, self._finetuning = ValidationMode.test, ValidationMode.finetuning
        self.bos_token_id, self.eos_token_id = self._raw.bos_id, self._raw.eos_id
        self._bytes_cache: dict[int, bytes] = {}
        self.template, self.closing_text, self.generation_prompt = None, "", ""
        self.end_of_turn_texts = (self._piece(self.eos_token_id).decode("utf-8", "replace"),)

    # ---------------------------------------------------------------- encoding
    def encode(self, messages: list[dict], tools=None) -> list[int]:
        """mistral-common's ids for `messages`: finetuning mode if the last message is the assistant's,
        test (serving) mode otherwise. Raises mistral-common's own errors."""
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        mode = self._finetuning if messages[-1].get("role") == "assistant" else self._test
        request = ChatCompletionRequest.from_openai([_plain(m) for m in messages], tools=tools)
        return list(self._encoders[mode].encode_chat_completion(request).tokens)

    def _encode_row(self, msgs: list[dict], conv: Conversation, k: int | None = None) -> list[int]:
        try:
            return self.encode(msgs, conv.tools)
        except Exception as e:  # validator / normalizer / tokenizer errors of mistral-common, pydantic errors
            reason = " ".join(str(e).split())[:400]
            raise RecordError(conv.index, f"mistral-common ({self.version}) cannot encode the first {len(msgs)} "
                              f"messages: {type(e).__name__}: {reason}", k) from None

    def _piece(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for (a control token: its name, e.g. b"[INST]")."""
        if token_id not in self._bytes_cache:
            raw = self._raw
            if hasattr(raw, "id_to_byte_piece"):  # tekken: byte-level BPE
                from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

                piece = raw.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP)
            else:  # SentencePiece: "▁" is a space, <0xAB> a byte-fallback piece
                text = raw.id_to_piece(token_id)
                byte = None if raw.is_special(token_id) else _BYTE_PIECE.fullmatch(text)
                piece = bytes([int(byte.group(1), 16)]) if byte else text.replace("▁", " ").encode("utf-8")
            self._bytes_cache[token_id] = piece
        return self._bytes_cache[token_id]

    def decode_with_offsets(self, ids) -> tuple[str, np.ndarray]:
        """Text of `ids` (control tokens as their names) and the (T, 2) character span of each token."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        parts, offsets, pos = [], np.zeros((len(ids), 2), dtype=np.int64), 0
        for t, token_id in enumerate(ids):
            part = decoder.decode(self._piece(int(token_id)))
            parts.append(part)
            offsets[t] = pos, pos + len(part)
            pos += len(part)
        tail = decoder.decode(b"", final=True)  # an incomplete character at the very end
        if tail and len(ids):
            parts.append(tail)
            offsets[-1, 1] += len(tail)
        return "".join(parts), offsets

    # ---------------------------------------------------------------- public API
    def generation_context(self, messages: list[dict], tools=None) -> tuple[str, list[int]]:
        """What the policy sees before its next assistant turn: mistral-common's serving encoding of
        `messages` (ending with a user or tool turn; `[/INST]` / `[/TOOL_RESULTS]` is the last token)."""
        ids = self.encode(messages, tools)
        return self.decode_with_offsets(ids)[0], ids

    def render(self, conv: Conversation, prompt_len: int = 0, _memo: dict | None = None) -> Rendered:
        """Render one conversation (`prompt_len`: leading prompt messages, a forced boundary)."""
        msgs = [m.to_template() for m in conv.messages]
        trained = [self._trained(m, conv, k) for k, m in enumerate(conv.messages)]
        memo = {} if _memo is None else _memo
        ids = self._encode_row(msgs, conv)
        n = len(msgs)
        cuts = [k for k in range(1, n) if trained[k - 1] or trained[k] or k == prompt_len]
        bounds = [0] + [self._boundary(msgs, k, ids, conv, memo if k <= prompt_len else None) for k in cuts]
        bounds.append(len(ids))
        last_trained = max((k for k in range(n) if trained[k]), default=-1)
        trainable = np.zeros(len(ids), dtype=bool)
        segments = []
        for s, (first, start, end) in enumerate(zip([0] + cuts, bounds, bounds[1:])):
            last = cuts[s] if s < len(cuts) else n
            seg = Segment(tuple(range(first, last)), conv.messages[first].role, trained[first] and last - first == 1,
                          (0, 0), (start, end))
            segments.append(seg)
            if seg.trained:
                trainable[start:self._body_end(ids, start, end, conv.index, first, first == last_trained)] = True
        trainable[0] = False  # nothing predicts the first token
        text, offsets = self.decode_with_offsets(ids)
        for seg in segments:
            a, b = seg.token_span
            seg.char_span = (int(offsets[a, 0]), int(offsets[b - 1, 1])) if b > a else (0, 0)
        prompt_tokens = next((seg.token_span[0] for seg in segments if seg.messages[0] >= prompt_len), len(ids))
        out = Rendered(np.asarray(ids, dtype=np.int64), trainable, text, offsets, segments, conv.index,
                       prompt_tokens if prompt_len else 0)
        if out.num_trainable == 0:
            raise RecordError(conv.index, "no trainable tokens (no assistant message, or all marked train: false)")
        return out

    def render_trajectory(self, conv: Conversation, prompt_len: int = 0, _memo: dict | None = None):
        """One sequence where mistral-common's encoding is prefix-stable for the conversation (every
        boundary is checked to be a token prefix, so each turn's context is exactly its generation
        context); else, in `render_mode: auto` or `per_turn`, one sequence per turn (`render_turns`)."""
        from mtpo.render_turns import TurnSequences

        mode = self.options.render_mode
        if mode != "per_turn":
            try:
                return self.render(conv, prompt_len, _memo)
            except TemplateRewrite:
                if mode == "single":
                    raise
        return TurnSequences(self.render_turns(conv, prompt_len), conv.index)

    def render_turns(self, conv: Conversation, prompt_len: int = 0) -> list[Rendered]:
        """One sequence per trained assistant message k: messages[:k+1], only message k trained.

        The building block for per-turn scoring of the versions that are not prefix-stable (v2/v3 move
        the system prompt and the tool list into the last user message): every such sequence ends with
        its own assistant turn, so its last user message is the same with and without that turn and
        the prefix difference is exact for every version."""
        out = []
        for k, m in enumerate(conv.messages):
            if self._trained(m, conv, k):
                own = [Message(x.role, x.content, x.train if j == k else False, x.extra)
                       for j, x in enumerate(conv.messages[:k + 1])]
                out.append(self.render(Conversation(own, conv.tools, conv.index, conv.label, conv.score),
                                       min(prompt_len, k + 1)))
        if not out:
            raise RecordError(conv.index, "no trainable tokens (no assistant message, or all marked train: false)")
        return out

    # ---------------------------------------------------------------- steps
    def _trained(self, m: Message, conv: Conversation, k: int) -> bool:
        if m.train and m.role != "assistant":
            raise RecordError(conv.index, f"`train: true` on a {m.role} message: with mistral-common's encoder only "
                              "assistant messages can be trained", k)
        return m.role == "assistant" if m.train is None else m.train

    def _boundary(self, msgs, k: int, ids: list[int], conv: Conversation, memo: dict | None) -> int:
        """Number of tokens of messages[:k]; they must be the first tokens of the whole encoding."""
        if memo is not None and k in memo:
            prefix = memo[k]
        else:
            prefix = self._encode_row(msgs[:k], conv, k)
            if memo is not None:
                memo[k] = prefix
        if ids[:len(prefix)] != prefix:
            raise TemplateRewrite(conv.index, f"mistral-common's encoding ({self.version}) is not prefix-stable here: "
                              f"{self._why_not_prefix(msgs, k, conv)}", k)
        return len(prefix)

    def _why_not_prefix(self, msgs: list[dict], k: int, conv: Conversation) -> str:
        """Name the cause by re-encoding without the suspect (only on the error path)."""
        later_user = any(m["role"] == "user" for m in msgs[k:])
        if msgs[k - 1]["role"] == msgs[k]["role"]:
            return (f"mistral-common merges consecutive {msgs[k]['role']} messages into one (joined by a blank line); "
                    "merge them in the data")
        hint = ("; `render_mode: auto` (the default) or `per_turn` scores such conversations one turn at a time "
                "(each in the context it was generated in); or put the system prompt into the first user message, "
                "pass tool outputs as `tool` messages, or use a v7+ tokenizer")

        def stable(ms, tools, cut) -> bool:
            try:
                part = self.encode(ms[:cut], tools)
                return self.encode(ms, tools)[:len(part)] == part
            except Exception:
                return False

        if later_user and k > 1 and msgs[0]["role"] == "system" and stable(msgs[1:], conv.tools, k - 1):
            return ("this tokenizer version moves the system prompt into the last user message, and a user message "
                    "follows" + hint)
        if later_user and conv.tools and stable(msgs, None, k):
            return ("this tokenizer version puts the [AVAILABLE_TOOLS] list before the last user message, and a user "
                    "message follows" + hint)
        return ("the encoding of the conversation up to here is not a prefix of the whole conversation's (the "
                "tokenizer version rewrites earlier turns, e.g. v2 drops tool calls before the last user message)"
                + hint)

    def _body_end(self, ids, start: int, end: int, row: int, k: int, is_last: bool) -> int:
        """End of what the policy emitted: the message's tokens, its closing </s> unless excluded."""
        if end <= start or ids[end - 1] != self.eos_token_id:
            raise RecordError(row, "mistral-common did not close this assistant message with </s> (is it encoded at "
                              "all? v2 drops tool calls before the last user message)", k)
        mode = self.options.end_of_turn
        return end if mode == "every" or (mode == "last" and is_last) else end - 1


def _plain(message: dict) -> dict:
    """A message as mistral-common's `from_openai` reads it (no mtpo-only keys)."""
    return {key: value for key, value in message.items() if key != "train"}
