"""The turn-synchronous tool loop: policy turn → run its last ```python block → tool turn → ...

Every round, each active trajectory generates one assistant turn (one batched backend call over all
of them), then every closed ```python block runs at once through the executor (a `SandboxPool`: one
persistent, isolated Python session per trajectory), then the outputs are appended and the next
round starts. A turn's context is `ChatRenderer.generation_context(messages)`: the policy's own chat
template, tokenized exactly as the trainer tokenizes — so what is generated is what is trained.

Finish reasons (`record["finish_reason"]`):
  answered    a turn without code that holds an answer (`\\boxed{}`; a fallback only if configured)
  no_code     a turn without code and without an answer
  max_calls   a turn with code after `max_tool_calls` cells already ran (that code is not run)
  max_tokens  a turn used its whole `max_new_tokens` budget
  length      the conversation reached `max_length` tokens (context + turn)
  tool_error  the executor itself failed (sandbox unavailable, crashed pool) — not the model's code:
              errors *in* the model's code are ordinary tool outputs, counted in `num_tool_errors`
  control_token  the backend produced a control token (`<|im_start|>` …) inside a turn; the turn is
              cut before it (HFBackend suppresses these tokens, so this only comes from other backends)
  empty       a turn with no text (only its end token, or the stop string right away): it is not
              appended, since the trainers reject an empty message

Consistency (see docs/generate.md): after a trajectory finishes it is rendered as the trainer will
render it; each turn's context must be a prefix of that rendering and the trained tokens of each
assistant turn must be the tokens the policy generated. A turn that stopped on a stop string
("```output") keeps the tokens before it (and before the whitespace preceding it); the template then closes the turn with its end-of-turn
token, which the trainer trains (the policy learns to end its turn where the harness ended it).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from mtpo.agent.backends import SamplingParams
from mtpo.agent.prompts import Prompt
from mtpo.data import Conversation, Message, RecordError
from mtpo.render import ChatRenderer, _special_token_pattern
from mtpo.render_turns import trained_turns

logger = logging.getLogger("mtpo")
FINISH_REASONS = ("answered", "no_code", "max_calls", "max_tokens", "length", "tool_error", "control_token", "empty")
TOOL_FORMATS = ("user", "tool")
CONSISTENCY_MODES = ("warn", "strict", "off")
NO_OUTPUT = "(no output)"  # a `tool` message for a cell that printed nothing (user turns hold the fences)
_CODE = re.compile(r"```python[ \t]*\n(.*?)```", re.S)


class ConsistencyError(RuntimeError):
    """Strict mode: a trajectory would be trained on tokens other than those the policy generated."""


@dataclass
class RolloutConfig:
    max_tool_calls: int = 6
    max_new_tokens: int = 1024  # per turn
    max_length: int = 4096  # context + turn, tokens
    stop: tuple[str, ...] = ("```output",)
    tool_format: str = "user"  # user: research-format "```output\n…\n```" turns; tool: `tool` messages
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    answer_fallback: bool = False
    consistency: str = "warn"  # warn: count + log; strict: raise; off: skip the check

    def __post_init__(self):
        if self.tool_format not in TOOL_FORMATS:
            raise ValueError(f"tool_format must be one of {TOOL_FORMATS}, got {self.tool_format!r}")
        if self.consistency not in CONSISTENCY_MODES:
            raise ValueError(f"consistency must be one of {CONSISTENCY_MODES}, got {self.consistency!r}")
        if self.max_tool_calls < 0 or self.max_new_tokens < 1 or self.max_length < 2:
            raise ValueError("need max_tool_calls >= 0, max_new_tokens >= 1, max_length >= 2")
        self.stop = tuple(self.stop)

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.stop)


@dataclass
class Turn:
    context_text: str
    context_ids: list[int]
    token_ids: list[int]  # everything generated in this turn
    finish: str  # the backend's: eos | stop | length
    cut: bool  # the content ends before what was generated does (stop string, control token)


@dataclass
class Trajectory:
    prompt: Prompt
    sample: int
    messages: list[dict]
    turns: list[Turn] = field(default_factory=list)
    num_tool_calls: int = 0
    num_tool_errors: int = 0
    num_tool_timeouts: int = 0
    last_tool_ok: bool | None = None
    finish_reason: str | None = None
    consistency: str = "unchecked"
    generated_tokens: int = 0

    @property
    def key(self) -> str:
        return f"{self.prompt.prompt_id}#{self.sample}"

    def record(self, grader, fallback: bool) -> dict:
        last = next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")
        answer = grader.extract_answer(last, fallback=fallback) if self.finish_reason == "answered" else None
        rec = {"prompt_id": self.prompt.prompt_id, "sample": self.sample, "messages": self.messages,
               "gold": self.prompt.gold, "answer": answer, "correct": False, "finish_reason": self.finish_reason,
               "num_tool_calls": self.num_tool_calls, "num_tool_errors": self.num_tool_errors,
               "num_tool_timeouts": self.num_tool_timeouts, "last_tool_ok": self.last_tool_ok,
               "num_generated_tokens": self.generated_tokens,
               "consistency": self.consistency, "meta": dict(self.prompt.meta)}
        # the answer was found with the fallback, so it must be graded with it too
        rec["correct"] = bool(grader.grade(rec, self.prompt.gold, fallback=True) if fallback
                              else grader.grade(rec, self.prompt.gold))
        return rec


def turn_seed(seed: int, prompt_id: str, sample: int, turn: int) -> int:
    """A trajectory's random stream for one turn: a function of its identity only."""
    digest = hashlib.sha256(f"{seed}|{prompt_id}|{sample}|{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def last_code_block(text: str) -> str | None:
    """The last closed ```python block of a turn (the cell the harness runs), or None."""
    blocks = _CODE.findall(text)
    return blocks[-1] if blocks else None


class Rollout:
    """Runs the loop for a list of prompts. `executor` has `submit(key, code) -> Future[CellResult]`
    and `close(key)` (a `SandboxPool`); `grader` has `extract_answer` and `grade` (`mtpo.agent.grade`)."""

    def __init__(self, backend, renderer: ChatRenderer, executor, config: RolloutConfig | None = None,
                 grader=None, tools: list[dict] | None = None):
        if grader is None:
            from mtpo.agent import grade as grader
        self.backend, self.renderer, self.executor, self.grader = backend, renderer, executor, grader
        self.config, self.tools = config or RolloutConfig(), tools
        self.tokenizer = renderer.tokenizer
        self._special = _special_token_pattern(self.tokenizer)
        self.stats = Counter()

    def run(self, prompts: list[Prompt], samples_per_prompt: int = 1,
            on_prompt_done: Callable[[Prompt, list[dict]], None] | None = None) -> list[dict]:
        """All trajectories of `prompts`; `on_prompt_done(prompt, records)` fires as soon as all samples
        of a prompt are finished (so callers can write prompt by prompt)."""
        trajs = [Trajectory(p, s, [dict(m) for m in p.messages]) for p in prompts for s in range(samples_per_prompt)]
        waiting = {p.prompt_id: samples_per_prompt for p in prompts}
        done: dict[str, list[dict]] = {p.prompt_id: [] for p in prompts}
        records: list[dict] = []
        active = list(trajs)
        while active:
            self._generate_round(active)
            self._execute_round([t for t in active if t.finish_reason is None])
            for t in (t for t in active if t.finish_reason is not None):
                rec = self._finish(t)
                records.append(rec)
                done[t.prompt.prompt_id].append(rec)
                waiting[t.prompt.prompt_id] -= 1
                if waiting[t.prompt.prompt_id] == 0 and on_prompt_done is not None:
                    on_prompt_done(t.prompt, sorted(done[t.prompt.prompt_id], key=lambda r: r["sample"]))
            active = [t for t in active if t.finish_reason is None]
        return records

    # ------------------------------------------------------------------ one round
    def _generate_round(self, active: list[Trajectory]) -> None:
        cfg = self.config
        batch, contexts, budgets = [], [], []
        for t in active:
            text, ids = self.renderer.generation_context(t.messages, self.tools)
            if len(ids) >= cfg.max_length:
                t.finish_reason = "length"
                continue
            batch.append(t)
            contexts.append((text, ids))
            budgets.append(min(cfg.max_new_tokens, cfg.max_length - len(ids)))
        if not batch:
            return
        seeds = [turn_seed(cfg.seed, t.prompt.prompt_id, t.sample, len(t.turns)) for t in batch]
        started = time.perf_counter()
        outs = self.backend.generate([ids for _, ids in contexts], cfg.sampling(), seeds, budgets)
        self.stats["generate_seconds"] += time.perf_counter() - started
        for t, (text, ids), budget, out in zip(batch, contexts, budgets, outs):
            self.stats["generated_tokens"] += len(out.token_ids)
            self._apply_turn(t, text, ids, out, budget)

    def _apply_turn(self, t: Trajectory, ctx_text: str, ctx_ids: list[int], out, budget: int) -> None:
        """Append the generated turn and decide whether the trajectory is finished."""
        body = out.token_ids[:-1] if out.finish == "eos" else list(out.token_ids)
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        content, cut = text, False
        if out.finish == "stop":
            hits = [text.find(s) for s in self.config.stop if s and s in text]
            # whitespace before the stop string goes with it (templates such as Gemma's trim it anyway)
            content, cut = (text[: min(hits)].rstrip(), True) if hits else (text, False)
        bad = self._special.search(content) if self._special is not None else None
        if bad:  # would become structure, not text, when re-rendered: cut the turn before it
            content, cut = content[: bad.start()], True
        t.generated_tokens += len(out.token_ids)
        if not content:  # trainers reject an empty message: the turn is not appended, the trajectory ends
            t.finish_reason = "control_token" if bad else "empty"
            return
        t.turns.append(Turn(ctx_text, ctx_ids, list(out.token_ids), out.finish, cut))
        t.messages.append({"role": "assistant", "content": content})
        if bad:
            t.finish_reason = "control_token"
        elif out.finish == "length":
            t.finish_reason = "max_tokens" if budget == self.config.max_new_tokens else "length"
        elif last_code_block(content) is not None:
            if t.num_tool_calls >= self.config.max_tool_calls:
                t.finish_reason = "max_calls"
        elif self.grader.extract_answer(content, fallback=self.config.answer_fallback) is not None:
            t.finish_reason = "answered"
        else:
            t.finish_reason = "no_code"

    def _execute_round(self, pending: list[Trajectory]) -> None:
        started = time.perf_counter()
        futures = [(t, self.executor.submit(t.key, last_code_block(t.messages[-1]["content"]))) for t in pending]
        for t, fut in futures:
            try:
                result = fut.result()
            except Exception as e:  # the executor failed, not the model's code
                logger.warning("executor failed for %s: %s: %s", t.key, type(e).__name__, e)
                self.stats["executor_failures"] += 1
                t.finish_reason = "tool_error"
                continue
            t.num_tool_calls += 1
            t.num_tool_errors += not result.ok
            t.num_tool_timeouts += bool(result.timed_out)
            t.last_tool_ok = bool(result.ok)
            t.messages.append(self._tool_message(result.output))
        self.stats["tool_seconds"] += time.perf_counter() - started

    def _tool_message(self, output: str) -> dict:
        output = output.rstrip("\n")
        if self._special is not None:  # a printed `<|im_end|>` must stay text, never become a control token
            output = self._special.sub(lambda m: m.group(0).replace("<", "<\u200b", 1), output)
        if self.config.tool_format == "tool":  # a silent cell (`x = 1`): the trainers reject an empty message
            return {"role": "tool", "content": output or NO_OUTPUT}
        return {"role": "user", "content": f"```output\n{output}\n```"}

    def _finish(self, t: Trajectory) -> dict:
        if t.num_tool_calls or t.finish_reason == "tool_error":  # it has (or had) a session
            self.executor.close(t.key)
        if self.config.consistency != "off":
            t.consistency, why = check_consistency(self.renderer, t, self.tools)
            self.stats[f"consistency_{t.consistency}"] += 1
            if t.consistency not in ("ok", "empty"):
                msg = f"{t.key}: generated and trained tokens differ ({t.consistency}): {why}"
                if self.config.consistency == "strict":
                    raise ConsistencyError(msg)
                if self.stats[f"consistency_{t.consistency}"] <= 3:
                    logger.warning(msg)
        return t.record(self.grader, self.config.answer_fallback)


def check_consistency(renderer: ChatRenderer, t: Trajectory, tools=None) -> tuple[str, str]:
    """("ok" | "text" | "tokens" | "empty", why). `text`: the rendering differs from what the policy
    saw or wrote (a template that rewrites history). `tokens`: same text, other tokens (a sampled
    non-canonical BPE split, or a merge across a turn boundary): the trainer would score tokens the
    policy did not sample."""
    if not t.turns:
        return "empty", "no assistant turn"
    conv = Conversation([Message(m["role"], m["content"], extra={k: v for k, v in m.items()
                                                                  if k not in ("role", "content")})
                         for m in t.messages], tools)
    try:
        r = renderer.render_trajectory(conv)  # one sequence, or per turn for templates that rewrite history
    except RecordError as e:
        return "text", str(e)
    turns = [x for x in trained_turns(r) if t.messages[x[0]]["role"] == "assistant"]
    if len(turns) != len(t.turns):
        return "text", f"{len(turns)} trained assistant segments for {len(t.turns)} generated turns"
    worst = "ok", ""
    for k, (turn, (msg, part, first, end)) in enumerate(zip(t.turns, turns)):
        if not part.text.startswith(turn.context_text):
            return "text", f"turn {k}: its context is not a prefix of the rendering it is trained in"
        ids = part.input_ids.tolist()
        trained = [i for i, keep in zip(ids[first:end], part.trainable[first:end]) if keep]
        content = t.messages[msg]["content"]
        trained_text = renderer.tokenizer.decode(trained, skip_special_tokens=False)
        tail = trained_text[len(content):].strip()
        if not trained_text.startswith(content) or tail not in (*renderer.end_of_turn_texts, ""):
            return "text", f"turn {k}: trained text {trained_text[-40:]!r} is not the content + end of turn"
        if ids[: len(turn.context_ids)] != turn.context_ids:
            worst = "tokens", f"turn {k}: context tokens differ from the final rendering's"
        elif not _same_tokens(renderer.tokenizer, turn, trained, content):
            worst = "tokens", f"turn {k}: trained tokens differ from the generated ones"
    return worst


def _same_tokens(tokenizer, turn: Turn, trained: list[int], content: str) -> bool:
    """A turn that ended on its end token: trained == generated, end token included. Otherwise (cut at
    a stop string or control token, or out of budget) the end of turn comes from the template and
    the trainer re-tokenizes the content's last characters: BPE merges never cross a pre-tokenizer
    boundary, so the tokens must agree up to the start of the content's last pre-token chunk
    (Llama-3 samples "``" "`\n" "```output"; the trainer sees "```" <end_of_turn>)."""
    if turn.finish == "eos" and not turn.cut:
        return trained == turn.token_ids
    body = turn.token_ids[:-1] if turn.finish == "eos" else turn.token_ids
    common = next((i for i, (a, b) in enumerate(zip(trained, body)) if a != b), min(len(trained), len(body)))
    covered = len(tokenizer.decode(body[:common], skip_special_tokens=False))
    return covered >= min(_last_chunk_start(tokenizer, content), len(content))


def _last_chunk_start(tokenizer, content: str) -> int:
    """Where the last pre-tokenizer chunk of `content` starts (no pre-tokenizer: its end)."""
    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if pre is None or not content:
        return len(content)
    pieces = pre.pre_tokenize_str(content)
    return pieces[-1][1][0] if pieces else len(content)
