"""Conversation → (input_ids, trainable mask, segments), from the tokenizer's own chat template.

How it works (no hard-coded token ids anywhere):

1. Render the whole conversation once with the chat template → `text`.
2. Render the prefixes that end where something trainable starts or stops (messages[:k], and
   messages[:k] + generation prompt before each trained assistant message). Each must be a string
   prefix of `text` — otherwise the template rewrites history and we refuse (pitfall: thinking
   templates that drop old <think> blocks). Consecutive external messages (e.g. parallel tool
   results that a template groups into one turn) are one segment, so no boundary is needed there.
   An eos_token the template writes only after the last message (Phi-3) is cut from the prefixes
   first: it closes the conversation, it does not rewrite it, and no turn owns it.
3. Inside a trained assistant message: the generation prompt (`<|im_start|>assistant\\n`) is
   external; the rest up to and including the end-of-turn text (`<|im_end|>`, `<end_of_turn>`,
   `<|eot_id|>`, `</s>`, detected from the template) is what the policy emitted; whatever the
   template appends after it (a newline) is external.
4. Tokenize `text` once with offsets and map every token to the character region it lies in
   (vectorised). A token that straddles two regions goes to the side holding its non-whitespace
   characters (SentencePiece's `▁Hello` after `[/INST]`); if both sides hold text we raise.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from mtpo.data import Conversation, LabeledTrajectory, Message, PreferencePair, RecordError

END_OF_TURN_MODES = ("every", "last", "none")
RENDER_MODES = ("auto", "single", "per_turn")
_PROBE_USER, _PROBE_ASSISTANT = "MTPO_PROBE_QUESTION", "MTPO_PROBE_ANSWER"


@dataclass(frozen=True)
class RenderOptions:
    trainable_roles: tuple[str, ...] = ("assistant",)
    """Roles whose messages the policy generated. Everything else is external (not trained)."""
    end_of_turn: str = "every"
    """Train the end-of-turn token of assistant messages on `every` turn, the `last` one, or `none`."""
    end_of_turn_text: tuple[str, ...] = ()
    """End-of-turn strings to look for; empty = detect from the chat template (plus eos_token)."""
    chat_template: str | None = None
    """Chat template text overriding the tokenizer's own."""
    render_mode: str = "auto"
    """`single`: one sequence per trajectory; `per_turn`: each assistant turn in the context the policy saw
    (mtpo.render_turns); `auto`: single where the template is prefix-stable for the row, else per turn."""

    def __post_init__(self):
        if self.end_of_turn not in END_OF_TURN_MODES:
            raise ValueError(f"end_of_turn must be one of {END_OF_TURN_MODES}, got {self.end_of_turn!r}")
        if self.render_mode not in RENDER_MODES:
            raise ValueError(f"render_mode must be one of {RENDER_MODES}, got {self.render_mode!r}")
        object.__setattr__(self, "trainable_roles", tuple(self.trainable_roles))
        eot = self.end_of_turn_text
        object.__setattr__(self, "end_of_turn_text", (eot,) if isinstance(eot, str) else tuple(eot))


@dataclass
class Segment:
    """A run of messages sharing one fate, with its character and token spans."""

    messages: tuple[int, ...]  # indices into the conversation's messages
    role: str  # role of the first message
    trained: bool  # does any token of this segment enter the loss
    char_span: tuple[int, int]
    token_span: tuple[int, int] = (0, 0)


@dataclass
class Rendered:
    """One tokenized trajectory. `trainable[t]` = token t was emitted by the policy."""

    input_ids: np.ndarray  # (T,) int64
    trainable: np.ndarray  # (T,) bool
    text: str
    offsets: np.ndarray  # (T, 2) character span of each token in `text`
    segments: list[Segment] = field(default_factory=list)
    index: int = 0  # source row
    prompt_tokens: int = 0  # number of leading tokens that belong to the prompt

    @property
    def attention_mask(self) -> np.ndarray:
        return np.ones_like(self.input_ids)

    @property
    def num_trainable(self) -> int:
        return int(self.trainable.sum())

    def __len__(self) -> int:
        return len(self.input_ids)

    def truncated(self, max_length: int) -> "Rendered":
        """The first `max_length` tokens (for the `keep_start` truncation policy)."""
        segments = [replace(s, token_span=(min(s.token_span[0], max_length), min(s.token_span[1], max_length)))
                    for s in self.segments if s.token_span[0] < max_length]
        return Rendered(self.input_ids[:max_length], self.trainable[:max_length], self.text,
                        self.offsets[:max_length], segments, self.index, min(self.prompt_tokens, max_length))


class TemplateRewrite(RecordError):
    """The template renders an earlier part of the conversation differently once more turns follow (or its
    generation prompt differs from how it renders the turn): one sequence cannot hold every turn's context."""


class NoEndOfTurn(RecordError):
    """An assistant turn, rendered within the conversation, holds none of the end-of-turn texts (GLM-4.x:
    the turn ends with the next role tag, written as the next message's header). Per-turn scoring handles it."""


class ChatRenderer:
    """Renders conversations with one tokenizer + chat template. Build once, call per row."""

    def __init__(self, tokenizer, options: RenderOptions | None = None):
        self.tokenizer = tokenizer
        self.options = options or RenderOptions()
        self.template = self.options.chat_template or getattr(tokenizer, "chat_template", None)
        if not self.template:
            raise ValueError("the tokenizer has no chat template; pass one with `chat_template` (a .jinja file)")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("mtpo needs a fast (Rust) tokenizer for character offsets; load it with use_fast=True")
        self.bos_token_id = tokenizer.bos_token_id
        self._special_re = _special_token_pattern(tokenizer)
        probe = self._probe_renders()
        self.closing_text = self._detect_closing_text(probe)
        self.generation_prompt = self._detect_generation_prompt(probe)
        self.end_of_turn_texts = self.options.end_of_turn_text or self._detect_end_of_turn(probe)

    # ---------------------------------------------------------------- template plumbing
    def apply_template(self, messages: list[dict], tools, add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=self.template, tokenize=False,
            add_generation_prompt=add_generation_prompt)

    def _probe_renders(self) -> dict[str, str | Exception]:
        """A probe conversation rendered once in the three ways the detectors below read: the user turn
        alone (`user`), with the generation prompt (`prompt`), and answered (`answered`). A rendering the
        template refuses is kept as its exception."""
        user = {"role": "user", "content": _PROBE_USER}
        ways = {"user": ([user], False), "prompt": ([user], True),
                "answered": ([user, {"role": "assistant", "content": _PROBE_ASSISTANT}], False)}
        out: dict[str, str | Exception] = {}
        for name, (messages, gen) in ways.items():
            try:
                out[name] = self.apply_template(messages, None, gen)
            except Exception as e:
                out[name] = e
        return out

    def _detect_closing_text(self, probe: dict) -> str:
        """eos_token if the template writes it only at the very end of a conversation rendered without
        a generation prompt (Phi-3 does). No turn owns it: it is cut from the prefix renderings, so such
        a template is not mistaken for one that rewrites history, and it is never trained."""
        eos = getattr(self.tokenizer, "eos_token", None)
        one, two = probe["user"], probe["answered"]
        if isinstance(one, Exception) or isinstance(two, Exception):
            return ""
        closes = eos and not two.startswith(one) and one.endswith(eos) and two.endswith(eos)
        return eos if closes and two.startswith(one[: -len(eos)]) else ""

    def _detect_generation_prompt(self, probe: dict) -> str:
        """What `add_generation_prompt` appends after a user turn (`<|im_start|>assistant\\n`), or ""."""
        plain, with_prompt = probe["user"], probe["prompt"]
        if isinstance(plain, Exception) or isinstance(with_prompt, Exception):
            return ""
        plain = plain[: len(plain) - len(self.closing_text)] if self.closing_text and plain.endswith(self.closing_text) else plain
        return with_prompt[len(plain):] if with_prompt.startswith(plain) else ""

    def _header_end(self, text: str, start: int, prefix, k: int, row: int) -> int:
        """Where the generation prompt before assistant message k ends. Fast path: the template's
        generation prompt, detected once, stands right at the boundary; otherwise render the prefix
        with `add_generation_prompt` (templates whose prompt depends on the conversation)."""
        if self.generation_prompt and text.startswith(self.generation_prompt, start):
            return start + len(self.generation_prompt)
        head_end = self._prefix_end(prefix(k, True), text, row, k, "the generation prompt")
        if head_end < start:
            raise TemplateRewrite(row, "generation prompt is shorter than the previous turns", k)
        return head_end

    def _detect_end_of_turn(self, probe: dict) -> tuple[str, ...]:
        """What the template writes after an assistant message's content, minus trailing space."""
        found: list[str] = []
        head, full = probe["prompt"], probe["answered"]
        failed = next((r for r in (head, full) if isinstance(r, Exception)), None)
        if failed is not None:  # a template that rejects the probe; fall back to eos below
            warnings.warn(f"could not probe the chat template for its end-of-turn text ({failed}); using eos_token")
        else:
            full = full[: len(full) - len(self.closing_text)] if self.closing_text else full
            at = full.find(_PROBE_ASSISTANT, len(head) if full.startswith(head) else 0)
            if at >= 0 and full[at + len(_PROBE_ASSISTANT):].strip():
                found.append(full[at + len(_PROBE_ASSISTANT):].strip())
        eos = getattr(self.tokenizer, "eos_token", None)
        if eos and eos not in found:
            found.append(eos)
        return tuple(found)

    # ---------------------------------------------------------------- public API
    def generation_context(self, messages: list[dict], tools=None) -> tuple[str, list[int]]:
        """The text and token ids the policy sees before writing its next assistant turn:
        `messages` rendered with the generation prompt, tokenized as `render` tokenizes. Rollouts
        use exactly this, so that what is generated is what training later renders and masks."""
        text = self.apply_template(messages, tools, True)
        ids, _ = self._tokenize(text, -1)
        return text, ids.tolist()

    def render(self, conv: Conversation, prompt_len: int = 0, _memo: dict | None = None) -> Rendered:
        """Render one conversation. `prompt_len` = number of leading prompt messages (a boundary is
        forced there so the prompt's tokens can be compared across the two sides of a pair)."""
        msgs = [m.to_template() for m in conv.messages]
        trained = [self._is_trained(m) for m in conv.messages]
        self._check_no_control_tokens(conv)
        memo = {} if _memo is None else _memo

        def prefix(k: int, gen: bool) -> str:
            key = (k, gen)
            if key not in memo or k > prompt_len:
                out = self._apply(msgs[:k], conv, gen)
                if not gen and self.closing_text and out.endswith(self.closing_text):
                    out = out[: -len(self.closing_text)]  # the conversation goes on: not closed here
                memo[key] = out
            return memo[key]

        text = self._apply(msgs, conv, False)
        regions, segments = self._regions(conv, msgs, trained, text, prompt_len, prefix)
        ids, offsets = self._tokenize(text, conv.index)
        token_region = self._assign_tokens(text, offsets, regions, segments, conv.index)
        trainable = np.array([r[2] for r in regions], dtype=bool)[token_region]
        trainable[0] = False  # nothing predicts the first token
        region_segment = np.array([r[3] for r in regions])[token_region]
        for s, seg in enumerate(segments):
            where = np.flatnonzero(region_segment == s)
            seg.token_span = (int(where[0]), int(where[-1]) + 1) if len(where) else (0, 0)
        prompt_tokens = next((seg.token_span[0] for seg in segments if seg.messages[0] >= prompt_len), len(ids))
        out = Rendered(ids, trainable, text, offsets, segments, conv.index, prompt_tokens if prompt_len else 0)
        if out.num_trainable == 0:
            raise RecordError(conv.index, "no trainable tokens (no assistant message, or all marked train: false)")
        return out

    def render_trajectory(self, conv: Conversation, prompt_len: int = 0, _memo: dict | None = None):
        """`render`, or per-turn sequences (`mtpo.render_turns.TurnSequences`) per `render_mode`."""
        from mtpo.render_turns import render_trajectory

        return render_trajectory(self, conv, prompt_len, _memo)

    def render_pair(self, pair: PreferencePair) -> tuple[Rendered, Rendered]:
        """Render both sides; the shared prompt is rendered once and must tokenize identically."""
        memo: dict = {}
        n = len(pair.prompt)
        chosen = self._side(pair.chosen_conversation(), n, memo, "chosen")
        rejected = self._side(pair.rejected_conversation(), n, memo, "rejected")
        first_c, first_r = getattr(chosen, "parts", [chosen])[0], getattr(rejected, "parts", [rejected])[0]
        p = first_c.prompt_tokens
        if first_r.prompt_tokens != p or not np.array_equal(first_c.input_ids[:p], first_r.input_ids[:p]):
            raise RecordError(pair.index, "chosen and rejected prompts tokenize differently")
        return chosen, rejected

    def render_labeled(self, traj: LabeledTrajectory) -> Rendered:
        return self._side(traj.conversation(), len(traj.prompt), None, "completion")

    def _side(self, conv: Conversation, prompt_len: int, memo, side: str) -> Rendered:
        try:
            return self.render_trajectory(conv, prompt_len, memo)
        except RecordError as e:
            if e.side is None:  # add which side of the row failed
                raise type(e)(e.row, str(e).split(": ", 1)[1], e.message, side) from None
            raise

    # ---------------------------------------------------------------- steps
    def _check_no_control_tokens(self, conv: Conversation) -> None:
        """A special token's text inside content (a tool output printing `<|im_end|>`, HTML `<s>`) would
        be tokenized as a control token and silently end turns or split masks: refuse it."""
        if self._special_re is None:
            return
        for k, m in enumerate(conv.messages):
            hit = self._special_re.search(m.content or "")
            if hit:
                raise RecordError(conv.index, f"content contains the special token {hit.group(0)!r}, which the "
                                  "tokenizer would read as a control token; escape or remove it", k)

    def _is_trained(self, m: Message) -> bool:
        return m.train if m.train is not None else m.role in self.options.trainable_roles

    def _apply(self, msgs: list[dict], conv: Conversation, gen: bool) -> str:
        try:
            return self.apply_template(msgs, conv.tools, gen)
        except Exception as e:
            raise RecordError(conv.index, f"chat template failed on the first {len(msgs)} messages: {e}") from None

    def _regions(self, conv, msgs, trained, text, prompt_len, prefix):
        """Character regions (start, end, trainable, segment) covering `text`, plus the segments."""
        n = len(msgs)
        cuts = [k for k in range(1, n) if trained[k - 1] or trained[k] or k == prompt_len]
        bounds = [0]
        for k in cuts:
            bounds.append(self._prefix_end(prefix(k, False), text, conv.index, k))
        bounds.append(len(text))
        # `end_of_turn="last"` means the last trained *assistant* turn, whatever trained message follows it
        last_trained = max((k for k in range(n) if trained[k] and msgs[k]["role"] == "assistant"), default=-1)
        regions, segments = [], []
        for s, (first, start, end) in enumerate(zip([0] + cuts, bounds, bounds[1:])):
            last = cuts[s] if s < len(cuts) else n
            m = conv.messages[first]
            seg = Segment(tuple(range(first, last)), m.role, trained[first] and last - first == 1, (start, end))
            segments.append(seg)
            if not seg.trained:
                regions.append((start, end, False, s))
                continue
            if m.role == "assistant":
                head_end = self._header_end(text, start, prefix, first, conv.index)
                body_end = self._assistant_body_end(text, head_end, end, conv.index, first, first == last_trained)
            else:
                head_end, body_end = self._content_span(text, start, end, m, conv, msgs, first)
            regions += [(start, head_end, False, s), (head_end, body_end, True, s), (body_end, end, False, s)]
        regions = [r for r in regions if r[1] > r[0]]
        return regions, segments

    @staticmethod
    def _prefix_end(prefix_text: str, text: str, row: int, k: int, what: str = "") -> int:
        if not text.startswith(prefix_text):
            what = f"the conversation up to here + {what}" if what else "the conversation up to here"
            raise TemplateRewrite(row, f"chat template is not prefix-stable: rendering {what} is not a prefix of the "
                              "whole conversation (the template rewrites earlier turns; render_mode: auto or "
                              "per_turn scores each turn in its own context, or use a training template that keeps "
                              "history via `chat_template`)", k)
        return len(prefix_text)

    def _assistant_body_end(self, text, head_end, end, row, k, is_last):
        """End of what the policy emitted in this assistant turn: content + end-of-turn text."""
        chunk = text[head_end:end]
        if end == len(text) and self.closing_text and chunk.endswith(self.closing_text):
            chunk = chunk[: -len(self.closing_text)]  # the template's closing text is not this turn's
        best = -1, ""
        for eot in self.end_of_turn_texts:
            at = chunk.rfind(eot)
            if at > best[0]:
                best = at, eot
        at, eot = best
        if at < 0:
            raise NoEndOfTurn(row, f"none of the end-of-turn texts {list(self.end_of_turn_texts)} found after "
                              "this assistant message; set `end_of_turn_text`", k)
        train_eot = self.options.end_of_turn == "every" or (self.options.end_of_turn == "last" and is_last)
        return head_end + at + (len(eot) if train_eot else 0)

    def _content_span(self, text, start, end, m: Message, conv, msgs, k):
        """A non-assistant message forced into the loss: only its content characters are trained.

        The content is looked for where the template puts a probe in its place, not at the first
        match in the segment: a content such as "user" also occurs in its own header."""
        probe = self._apply(msgs[:k] + [{**msgs[k], "content": _PROBE_USER}], conv, False)
        at = probe.find(_PROBE_USER, start)
        if not m.content or at < 0 or not text.startswith(m.content, at) or at + len(m.content) > end:
            raise RecordError(conv.index, "message has train: true but its content was not found verbatim in the "
                              "rendered template", k)
        return at, at + len(m.content)

    def _tokenize(self, text: str, row: int) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        bos = self.bos_token_id
        if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            raise RecordError(row, "duplicated BOS token at the start (the template writes it and so does the "
                              "text); remove one")
        if len(ids) == 0:
            raise RecordError(row, "conversation renders to no tokens")
        return ids, offsets

    @staticmethod
    def _assign_tokens(text, offsets, regions, segments, row) -> np.ndarray:
        """Region index of every token (vectorised; straddling tokens resolved one by one)."""
        starts = np.array([r[0] for r in regions])
        tok_start, tok_end = offsets[:, 0], offsets[:, 1]
        first = np.searchsorted(starts, tok_start, side="right") - 1
        last = np.searchsorted(starts, np.maximum(tok_end - 1, tok_start), side="right") - 1
        for t in np.flatnonzero(first != last):
            a, b = int(first[t]), int(last[t])
            cut = int(starts[b])
            left, right = text[tok_start[t]:cut], text[cut:tok_end[t]]
            if b == a + 1 and not left.strip():
                first[t] = b
            elif b == a + 1 and not right.strip():
                pass
            else:
                seg = segments[regions[b][3]]
                raise RecordError(row, f"token {text[tok_start[t]:tok_end[t]]!r} straddles the boundary between "
                                  "trained and external text (both sides hold non-space characters); the "
                                  "template or the content merges across it", seg.messages[0])
        return first


def _special_token_pattern(tokenizer) -> "re.Pattern | None":
    """Regex matching the text of any special (control) token of the tokenizer."""
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    decoder = decoder if isinstance(decoder, dict) else {}  # MistralCommonBackend: a method that raises
    specials |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    specials = sorted((t for t in specials if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def make_renderer(tokenizer, options: RenderOptions | None = None) -> ChatRenderer:
    """The renderer for this tokenizer: mistral-common's own encoder (`mtpo.render_mistral`) for a
    tokenizer transformers loaded as `MistralCommonBackend` (a Mistral model dir with tekken.json),
    else the chat-template renderer."""
    from mtpo.render_mistral import MistralRenderer, is_mistral_common

    if is_mistral_common(tokenizer):
        return MistralRenderer(tokenizer, options)
    return ChatRenderer(tokenizer, options)
