"""Per-turn scoring for chat templates that rewrite history (Qwen3, DeepSeek-R1/V3, gpt-oss, Nemotron 3).

A template is *prefix-stable* for a conversation when rendering messages[:k] (+ generation prompt) is a
prefix of rendering the whole conversation. Then one sequence holds every assistant turn in exactly the
context the policy saw (`ChatRenderer.render`). Thinking templates break this: Qwen3 drops the reasoning
of turns before the last user query, DeepSeek and Nemotron open `<think>` in the generation prompt but not
in the history, gpt-oss ends the last turn with `<|return|>` and earlier ones with `<|end|>`.

The trajectory log-probability M-DPO/M-KTO need is Σ_k log π(y_k | x_k), where x_k is the context turn
k was *generated* in: `render(messages[:k], add_generation_prompt=True)`, the same text the rollout
feeds the model (`ChatRenderer.generation_context`). So a trajectory becomes a list of sequences
(`TurnSequences.parts`), each a `Rendered` holding one or more turns, and its log-prob is the sum over
its parts (the collator records each part's owner, the trainer adds them up with `index_add`).

How a trajectory is split (cost: up to one sequence per turn, often fewer):
* Greedy groups of consecutive trained turns: a group of turns k_i..k_j is `ChatRenderer.render` of
  messages[:k_j + 1] with the trained turns outside the group marked untrained. That render checks,
  as always, that each turn's context and generation prompt are a prefix of the sequence, so every
  turn of a group is scored in its own generation context. A group grows until the template rewrites.
  The last turn of a group is the last message rendered, so it ends as a final turn does (gpt-oss
  `<|return|>`), which is how the policy ended it.
* A turn that is not a continuation of its own context even alone (the generation prompt prefills
  text the history rendering drops: DeepSeek's `<think>\\n`) is rebuilt: context = its generation
  context; produced = the message content as generated (minus the prefilled text) + the end-of-turn
  text the template closes the turn with. This needs the content to carry the whole generation (the
  reasoning included, `...</think>` closing the prefilled block); otherwise the row is refused,
  naming row and message — the generated text is then unknown.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, replace

import numpy as np

from mtpo.data import Conversation, RecordError
from mtpo.render import NoEndOfTurn, Rendered, Segment, TemplateRewrite

logger = logging.getLogger("mtpo")
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
_PROBE = "MTPO_PROBE_ANSWER"
_OPEN_TAG = re.compile(r"<([A-Za-z_][\w-]*)>\s*$")  # a prefill that opens a block: "<think>\n"


@dataclass
class TurnSequences:
    """One trajectory scored as several sequences; its log-prob is the sum over `parts`."""

    parts: list[Rendered]
    index: int = 0  # source row

    @property
    def num_trainable(self) -> int:
        return sum(p.num_trainable for p in self.parts)

    @property
    def prompt_tokens(self) -> int:
        return self.parts[0].prompt_tokens

    def __len__(self) -> int:
        """The longest part: what `max_length` bounds (each part is one padded row of a batch)."""
        return max(len(p) for p in self.parts)

    def truncated(self, max_length: int) -> "TurnSequences":
        """`keep_start`: the parts that fit, then the first part that does not, cut to `max_length`."""
        kept = []
        for p in self.parts:
            kept.append(p if len(p) <= max_length else p.truncated(max_length))
            if len(p) > max_length:
                break
        return TurnSequences(kept, self.index)


def per_turn_count(examples) -> tuple[int, int]:
    """(trajectories scored per turn, their sequences) among prepared examples (pairs, labeled, plain)."""
    trajectories, seqs = 0, 0
    for e in examples:
        for r in (getattr(e, "chosen", None), getattr(e, "rejected", None), getattr(e, "completion", None), e):
            if isinstance(r, TurnSequences):
                trajectories, seqs = trajectories + 1, seqs + len(r.parts)
    return trajectories, seqs


def sequences(r) -> list[Rendered]:
    """The sequences one trajectory is scored as: [r] for a single sequence, else its parts."""
    return r.parts if isinstance(r, TurnSequences) else [r]


def trained_turns(rendered) -> list[tuple[int, Rendered, int, int]]:
    """(message index, sequence, first trained token, segment end) of every trained message, in order:
    `sequence.input_ids[:first]` is the context the turn is scored in (for an assistant turn: exactly its
    `generation_context` tokens). For consumers that check rollouts against training (mtpo.agent.rollout)."""
    out = []
    for part in sequences(rendered):
        for seg in part.segments:
            if seg.trained:
                a, b = seg.token_span
                run = np.flatnonzero(part.trainable[a:b])
                out.append((seg.messages[0], part, a + (int(run[0]) if len(run) else 0), b))
    return out


def render_trajectory(renderer, conv: Conversation, prompt_len: int = 0, memo: dict | None = None):
    """`renderer.render` (one sequence) or per-turn parts, per `renderer.options.render_mode`."""
    out = _render_mode(renderer, conv, prompt_len, memo)
    _warn_dropped_reasoning(renderer, conv, out)
    return out


def _render_mode(renderer, conv: Conversation, prompt_len: int, memo: dict | None):
    mode = renderer.options.render_mode
    if mode != "per_turn":
        try:
            rendered = renderer.render(conv, prompt_len, memo)
        except (TemplateRewrite, NoEndOfTurn) as e:
            if mode == "single":
                raise
            _log_switch_once(renderer, e)
        else:
            bad = None if mode == "single" else _first_inexact_turn(renderer, conv, rendered)
            if bad is None:
                return rendered
            _log_switch_once(renderer, RecordError(conv.index, "the tokens before this assistant turn differ from its "
                                                   "generation context (a token merges across the turn boundary)", bad))
    return render_per_turn(renderer, conv, prompt_len, memo)


def _first_inexact_turn(renderer, conv: Conversation, part: Rendered) -> int | None:
    """The first trained assistant message of `part` whose preceding tokens are not exactly its generation
    context's tokens (what `generation_context` gives the rollout), or None."""
    msgs = None
    added = renderer.__dict__.get("_added_ids")
    if added is None:  # the tokenizer's added tokens, read once (building the decoder map is not free)
        added = renderer.__dict__["_added_ids"] = _added_token_ids(renderer.tokenizer)
    for seg in part.segments:
        k = seg.messages[0]
        if not seg.trained or conv.messages[k].role != "assistant":
            continue
        run = np.flatnonzero(part.trainable[seg.token_span[0]: seg.token_span[1]])
        start = seg.token_span[0] + (int(run[0]) if len(run) else 0)
        at = seg.char_span[0]
        if renderer.generation_prompt and part.text.startswith(renderer.generation_prompt, at):
            boundary = at + len(renderer.generation_prompt)  # as `ChatRenderer._header_end` finds it
        else:
            msgs = msgs or [m.to_template() for m in conv.messages]
            boundary = len(renderer.apply_template(msgs[:k], conv.tools, True))
        if not _same_tokens_up_to(renderer, part, start, boundary, added):
            return k
    return None


def _same_tokens_up_to(renderer, part: Rendered, start: int, boundary: int, added: frozenset) -> bool:
    """Do part.input_ids[:start] equal the tokens of part.text[:boundary] tokenized alone?

    Only the stretch after the last added token before the boundary is re-tokenized: fast tokenizers split
    added tokens (`<|im_start|>`, `<|eot_id|>`, ...) out of the text before anything else, so what precedes
    one is tokenized identically with or without the text that follows."""
    if start >= len(part) or part.offsets[start][0] != boundary or (start and part.offsets[start - 1][1] > boundary):
        return False  # a token straddles the boundary (or the turn's first token does not start there)
    ids = part.input_ids
    anchor = next((t for t in range(start - 1, -1, -1) if int(ids[t]) in added), None)
    if anchor is None:
        window_ids, window_text = ids[:start], part.text[:boundary]
    else:
        window_ids, window_text = ids[anchor:start], part.text[int(part.offsets[anchor][0]):boundary]
    backend = getattr(renderer.tokenizer, "_tokenizer", None)  # the Rust tokenizer: no per-call Python overhead
    if backend is not None and hasattr(backend, "encode"):
        again = backend.encode(window_text, add_special_tokens=False).ids
    else:
        again = renderer.tokenizer(window_text, add_special_tokens=False)["input_ids"]
    return list(again) == window_ids.tolist()


def _added_token_ids(tokenizer) -> frozenset:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return frozenset(int(i) for i in decoder)


def _warn_dropped_reasoning(renderer, conv: Conversation, out) -> None:
    """Nothing dropped silently: a trained message's separate reasoning field that the template does not
    render is not trained (the policy could not have written it under this template). Warned once."""
    if getattr(renderer, "_reasoning_warned", False):
        return
    texts = [p.text for p in sequences(out)]
    for k, m in enumerate(conv.messages):
        reasoning = next((m.extra[key] for key in _REASONING_KEYS if isinstance(m.extra.get(key), str)), None)
        if reasoning and renderer._is_trained(m) and not any(reasoning.strip() in t for t in texts):
            renderer._reasoning_warned = True
            logger.warning("row %d, message %d: the chat template does not render this message's reasoning field; "
                           "that reasoning is not trained (if the policy wrote it, put it in `content` as generated). "
                           "Logged once.", conv.index, k)
            return


def _log_switch_once(renderer, error: RecordError) -> None:
    if getattr(renderer, "_per_turn_logged", False):
        return
    renderer._per_turn_logged = True
    logger.warning("%s — scoring such rows per turn, each assistant turn in the context the policy generated it in "
                   "(render_mode: auto; set render_mode: single to refuse instead). Logged once.", error)


def render_per_turn(renderer, conv: Conversation, prompt_len: int = 0, memo: dict | None = None):
    """The trajectory as greedy groups of prefix-stable consecutive turns (see the module docstring)."""
    trained = [k for k, m in enumerate(conv.messages) if renderer._is_trained(m)]
    if not trained:
        raise RecordError(conv.index, "no trainable tokens (no assistant message, or all marked train: false)")
    last_assistant = max((k for k in trained if conv.messages[k].role == "assistant"), default=-1)
    parts, i = [], 0
    group = functools.partial(_exact_group, renderer, conv, trained, prompt_len=prompt_len, memo=memo,
                              last_assistant=last_assistant)
    while i < len(trained):
        part = group(i, i + 1)
        if part is None:
            parts.append(_rebuild_turn(renderer, conv, trained[i], prompt_len, trained[i] == last_assistant))
            i += 1
            continue
        j = i + 1
        while j < len(trained):
            longer = group(i, j + 1)
            if longer is None:
                break
            part, j = longer, j + 1
        parts.append(part)
        i = j
    return parts[0] if len(parts) == 1 and _is_whole(parts[0], conv) else TurnSequences(parts, conv.index)


def _is_whole(part: Rendered, conv: Conversation) -> bool:
    """A single part covering the whole conversation is just the single-sequence rendering."""
    return part.segments[-1].messages[-1] == len(conv.messages) - 1


def _exact_group(renderer, conv, trained, i, j, *, prompt_len, memo, last_assistant) -> Rendered | None:
    """The group trained[i:j] as one sequence, or None if the template rewrites inside it or a turn's
    preceding tokens are not exactly its generation context."""
    try:
        part = _render_group(renderer, conv, trained, i, j, prompt_len, memo, last_assistant)
    except (TemplateRewrite, NoEndOfTurn):
        return None
    return part if _first_inexact_turn(renderer, conv, part) is None else None


def _render_group(renderer, conv, trained, i, j, prompt_len, memo, last_assistant) -> Rendered:
    """`render` of messages[:trained[j-1] + 1] with only trained[i:j] trained."""
    group = set(trained[i:j])
    stop = trained[j - 1] + 1
    messages = [m if k in group or k not in trained else replace(m, train=False)
                for k, m in enumerate(conv.messages[:stop])]
    part_conv = replace(conv, messages=messages)
    if renderer.options.end_of_turn == "last" and last_assistant not in group:
        renderer = _variant(renderer, "none")  # `last` = the trajectory's last turn, not this part's
    return renderer.render(part_conv, min(prompt_len, stop), memo)


def _variant(renderer, end_of_turn: str):
    """The same renderer with another `end_of_turn` (cached on it: probing the template is not free)."""
    cache = renderer.__dict__.setdefault("_eot_variants", {})
    if end_of_turn not in cache:
        clone = object.__new__(type(renderer))
        clone.__dict__.update({k: v for k, v in renderer.__dict__.items() if k != "_eot_variants"})
        clone.options = replace(renderer.options, end_of_turn=end_of_turn)
        cache[end_of_turn] = clone
    return cache[end_of_turn]


# ------------------------------------------------------------------------------------------ rebuilt turns


def _rebuild_turn(renderer, conv: Conversation, k: int, prompt_len: int, is_last: bool) -> Rendered:
    """Turn k alone: its generation context, tokenized as `generation_context` does, + what the policy
    produced, tokenized on its own. Produced = the template's rendering of the turn as the last message
    after the context, up to its end of turn (when a token would merge across that boundary, or the turn
    ends with a control token / the next role tag); or, when that rendering does not continue the context
    at all (a prefilled `<think>\\n` the history drops), the content as generated (`_prefilled_turn`)."""
    m = conv.messages[k]
    if m.role != "assistant":
        raise RecordError(conv.index, "a trained non-assistant message where the template rewrites history: "
                          "cannot tell which context it belongs to", k)
    msgs = [x.to_template() for x in conv.messages]
    context = renderer._apply(msgs[:k], conv, True)
    history = _strip_closing(renderer, renderer._apply(msgs[: k + 1], conv, False))
    if history.startswith(context):  # the template continues the context: it says what was produced
        produced, eot = _split_end_of_turn(renderer, history[len(context):], conv.index, k,
                                           lambda: _next_tag(renderer, conv, msgs, k, history))
    else:  # the history drops text the generation prompt prefills (DeepSeek's "<think>\n")
        produced, eot = _prefilled_turn(renderer, conv, k, context, history)
    train_eot = renderer.options.end_of_turn == "every" or (renderer.options.end_of_turn == "last" and is_last)
    text = context + produced + eot
    base = _strip_closing(renderer, renderer._apply(msgs[:k], conv, False))
    head = len(base) if context.startswith(base) else len(context)  # where turn k's header starts
    trained_end = len(text) - (0 if train_eot else len(eot))
    turn = 1 if k else 0  # segment of turn k (a trajectory opening with the assistant has no context segment)
    regions = [(0, head, False, 0), (head, len(context), False, turn), (len(context), trained_end, True, turn),
               (trained_end, len(text), False, turn)]
    regions = [r for r in regions if r[1] > r[0]]
    segments = [Segment(tuple(range(k)), conv.messages[0].role, False, (0, head))] if k else []
    segments.append(Segment((k,), "assistant", True, (head, len(text))))
    return _tokenized(renderer, text, len(context), regions, segments, conv.index, prompt_len)


def _prefilled_turn(renderer, conv: Conversation, k: int, context: str, history: str) -> tuple[str, str]:
    """(produced text, end-of-turn) of a turn whose history rendering does not continue its context: the
    content as generated (minus the prefill) + the end-of-turn text the template closes the turn with."""
    m = conv.messages[k]
    shared = len(os.path.commonprefix([context, history]))
    prefill, turn = context[shared:], history[shared:]
    body, eot = _split_end_of_turn(renderer, turn, conv.index, k)
    raw = m.content or ""
    reasoning = next((m.extra[key] for key in _REASONING_KEYS if m.extra.get(key)), None)
    why = _unreconstructable(prefill, raw, body, reasoning, history)
    if why:
        raise RecordError(conv.index, f"cannot rebuild what the policy generated in this turn: the template's "
                          f"generation prompt ends with {prefill!r} but it renders the turn as {turn!r}; {why}", k)
    return (raw[len(prefill):] if prefill and raw.startswith(prefill) else raw), eot


def _strip_closing(renderer, text: str) -> str:
    closing = renderer.closing_text
    return text[: -len(closing)] if closing and text.endswith(closing) else text


def _split_end_of_turn(renderer, turn: str, row: int, k: int, next_tag=None) -> tuple[str, str]:
    """(body, end-of-turn text) of the template's rendering of one assistant turn, as the last message.

    The end of turn is the last end-of-turn text in it; else a control token the rendering ends with
    (Gemma 4 ends a tool-calling turn with `<|tool_response>`); else (`next_tag`) the control token the
    template opens the next message with, which the policy emitted to stop (GLM-4.x `<|observation|>`,
    `<|user|>`); for the last turn of such a template nothing (its stop token is unknown: not trained)."""
    best = max(((turn.rfind(e), e) for e in renderer.end_of_turn_texts), default=(-1, ""))
    if best[0] >= 0:
        return turn[: best[0]], best[1]
    stripped = turn.rstrip()
    special = renderer._special_re
    last = None if special is None else next((m for m in special.finditer(stripped) if m.end() == len(stripped)), None)
    if last is not None:
        return stripped[: last.start()], last.group(0)
    tag = next_tag() if next_tag is not None else None
    if tag is None:
        raise RecordError(row, f"none of the end-of-turn texts {list(renderer.end_of_turn_texts)} found after this "
                          "assistant message; set `end_of_turn_text`", k)
    return turn, tag


def _next_tag(renderer, conv: Conversation, msgs: list[dict], k: int, history: str) -> str | None:
    """The control token the template opens message k + 1 with ("" when k is the last message), or None.
    Read off a probe where message k is a plain answer, so a template that rewrites message k once another
    follows (GLM drops its reasoning) still shows where the next message starts."""
    if k + 1 >= len(msgs):  # the final turn: no stop token to train, if the template does stop turns this way
        return "" if _stops_with_next_tag(renderer, conv) else None
    plain = {key: v for key, v in msgs[k].items() if key not in _REASONING_KEYS}
    probe = msgs[:k] + [{**plain, "content": _PROBE}] + msgs[k + 1: k + 2]
    before = _strip_closing(renderer, renderer._apply(probe[: k + 1], conv, False))
    after = _strip_closing(renderer, renderer._apply(probe, conv, False))
    special = renderer._special_re
    hit = special.match(after, len(before)) if special is not None and after.startswith(before) else None
    return hit.group(0) if hit else None


def _stops_with_next_tag(renderer, conv: Conversation) -> bool:
    """Does the template end an assistant turn by opening the next message with a control token (GLM-4.x)?
    Probed once on [user, assistant, user]; otherwise a turn without end-of-turn text is an error."""
    if "_stops_with_next_tag" not in renderer.__dict__:
        probe = [{"role": "user", "content": "MTPO_PROBE_QUESTION"}, {"role": "assistant", "content": _PROBE},
                 {"role": "user", "content": "MTPO_PROBE_QUESTION"}]
        try:
            before = _strip_closing(renderer, renderer.apply_template(probe[:2], None, False))
            after = _strip_closing(renderer, renderer.apply_template(probe, None, False))
        except Exception:  # a template that refuses the probe: no evidence
            before, after = "", None
        special = renderer._special_re
        renderer.__dict__["_stops_with_next_tag"] = bool(
            after is not None and special is not None and after.startswith(before) and special.match(after, len(before)))
    return renderer.__dict__["_stops_with_next_tag"]


def _unreconstructable(prefill: str, raw: str, body: str, reasoning, history: str) -> str | None:
    """Why the generated text cannot be known from this message, or None when it can."""
    if reasoning and reasoning not in history:
        return ("the message's reasoning is a separate field the template drops, so where the policy wrote it is "
                "unknown; give the raw generation (reasoning included) as `content`")
    if reasoning:
        return ("the template renders this turn, reasoning included, as something that does not continue its "
                "generation prompt, so it cannot have been generated in that context (reasoning under a no-think "
                "prompt; a prompt that closes the turn the rendering continues)")
    produced = raw[len(prefill):] if prefill and raw.startswith(prefill) else raw
    if not produced.endswith(body.strip()):
        return "the content does not end with the text the template renders for it"
    opened = _OPEN_TAG.search(prefill)
    if opened and f"</{opened.group(1)}>" not in produced:
        return (f"the generation prompt opens <{opened.group(1)}> and the content does not close it, so the "
                "content is not the whole generation; give the raw generation (reasoning included) as `content`")
    return None


def _tokenized(renderer, text: str, cut: int, regions, segments, row: int, prompt_len: int) -> Rendered:
    """Tokenize text[:cut] (the context: exactly `generation_context`'s tokens) and text[cut:] (what the
    policy produced) separately, then map tokens to regions as `ChatRenderer.render` does."""
    ids, offsets = renderer._tokenize(text[:cut], row)
    more, more_offsets = renderer._tokenize(text[cut:], row)
    ids, offsets = np.concatenate([ids, more]), np.concatenate([offsets, more_offsets + cut])
    token_region = renderer._assign_tokens(text, offsets, regions, segments, row)
    trainable = np.array([r[2] for r in regions], dtype=bool)[token_region]
    trainable[0] = False
    region_segment = np.array([r[3] for r in regions])[token_region]
    for s, seg in enumerate(segments):
        where = np.flatnonzero(region_segment == s)
        seg.token_span = (int(where[0]), int(where[-1]) + 1) if len(where) else (0, 0)
    prompt_tokens = segments[-1].token_span[0] if prompt_len else 0
    out = Rendered(ids, trainable, text, offsets, segments, row, prompt_tokens)
    if out.num_trainable == 0:
        raise RecordError(row, "no trainable tokens in a rebuilt turn", segments[-1].messages[0])
    return out
