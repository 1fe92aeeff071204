"""`mtpo inspect`: see exactly which tokens of each row enter the loss.

Rows go through the same path as training (`data` → `render.ChatRenderer`), so what you see is
what the trainers compute logps over. Three views of the same `Rendered`:

- text (terminal): trained tokens on a green background, external tokens dimmed. When stdout is
  not a terminal (or NO_COLOR is set) trained runs are wrapped in ⟦ ⟧ instead, so piping to a
  file or `less` still shows exactly what is trained.
- json: one object per side per row (`input_ids`, `trainable`, `segments`), for other tools; a side
  scored per turn (templates that rewrite history, `mtpo.render_turns`) holds `sequences` instead,
  and the text and HTML views show each of its sequences: every turn in its own context.
- html: one self-contained page; hover a token for its index, id and vocabulary string.

In every view control characters stay readable: a newline shows as ↵ followed by a real line
break, a tab as ⇥, other control characters as their Unicode control pictures (␛, ␍, ...).

`colorize(rendered, tokenizer, style)` is the reusable part: trainers call it to log a sample.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass

from mtpo.data import KNOWN_ROLES, RecordError, load_rows, parse_conversation, parse_labeled, parse_pair
from mtpo.render import END_OF_TURN_MODES, RENDER_MODES, ChatRenderer, Rendered, RenderOptions, make_renderer
from mtpo.render_mistral import is_mistral_common, mistral_format
from mtpo.render_turns import sequences

KINDS = ("pair", "labeled", "conversation")
_DEFAULT_ROWS = -1  # --rows not given: 5 rows to show, every row to verify
STYLES = ("ansi", "plain", "html")
OPEN, CLOSE = "⟦", "⟧"  # plain-text markers around a run of trained tokens
_ANSI_TRAINED, _ANSI_EXTERNAL, _ANSI_RESET = "\x1b[1;30;42m", "\x1b[2m", "\x1b[0m"
# Control characters → something visible; C1 controls too (0x9b is a terminal escape introducer).
_VISIBLE = {**{i: chr(0x2400 + i) for i in range(32)}, 0x7F: "␡", **{i: f"\\x{i:02x}" for i in range(0x80, 0xA0)},
            ord("\n"): "↵\n", ord("\t"): "⇥\t"}


@dataclass
class Side:
    """One rendered trajectory of a row: a pair's chosen/rejected, a labeled completion, or SFT messages."""

    name: str  # chosen | rejected | completion | messages
    rendered: Rendered
    label: bool | None = None


# --------------------------------------------------------------------------------------------
# Rows → rendered sides


def row_kind(row) -> str | None:
    """What a single row looks like (None if it matches no known format). Keys holding None count as
    absent: Parquet files and HF datasets give every row every column."""
    if not isinstance(row, dict):
        return None
    has = {k for k, v in row.items() if v is not None}
    if {"chosen", "rejected"} <= has:
        return "pair"
    if "messages" in has or {"prompt", "completion"} <= has:
        return "labeled" if "label" in has else "conversation"
    return None


def detect_kind(rows: list[dict]) -> str:
    """The most common row kind of the set (ties: pair > labeled > conversation)."""
    counts = Counter(k for k in map(row_kind, rows) if k)
    if not counts:
        raise ValueError("cannot tell what kind of rows these are (expected chosen+rejected, label with "
                         "messages or prompt+completion, or messages); pass --kind")
    return max(KINDS, key=lambda k: counts[k])  # max keeps the first of equals


def render_row(row: dict, index: int, kind: str, renderer: ChatRenderer) -> list[Side]:
    """Parse and render one row exactly as the trainers would. Raises RecordError naming the row."""
    if kind == "pair":
        chosen, rejected = renderer.render_pair(parse_pair(row, index))
        return [Side("chosen", chosen), Side("rejected", rejected)]
    if kind == "labeled":
        traj = parse_labeled(row, index)
        return [Side("completion", renderer.render_labeled(traj), traj.label)]
    conv = parse_conversation(row, index)
    return [Side("messages", renderer.render_trajectory(conv), conv.label)]


# --------------------------------------------------------------------------------------------
# Colouring the mask


def visible(s: str) -> str:
    """Make whitespace and control characters readable (newlines keep their line break)."""
    return s.translate(_VISIBLE)


def token_pieces(rendered: Rendered, tokenizer=None) -> list[str]:
    """The text of every token, read from its character offsets: `"".join(pieces)` is the rendered
    text up to the last token. A token inside a multi-byte character already shown by the previous
    token gets ""; a zero-width special token (a BOS added by the tokenizer) shows its vocab string."""
    text, pieces, cursor = rendered.text, [], 0
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    for t, (start, end) in enumerate(rendered.offsets.tolist()):
        if end > cursor:
            pieces.append(text[cursor:end])  # also picks up any gap the offsets leave before it
            cursor = end
        elif start == end and int(rendered.input_ids[t]) in special:
            pieces.append(tokenizer.convert_ids_to_tokens(int(rendered.input_ids[t])))
        else:
            pieces.append("")
    return pieces


def _runs(rendered: Rendered, tokenizer) -> list[list]:
    """[[text, trained], ...]: consecutive tokens of the same fate merged."""
    runs: list[list] = []
    for piece, trained in zip(token_pieces(rendered, tokenizer), rendered.trainable.tolist()):
        if not piece:
            continue
        if runs and runs[-1][1] == trained:
            runs[-1][0] += piece
        else:
            runs.append([piece, bool(trained)])
    return runs


def colorize(rendered: Rendered, tokenizer=None, style: str = "ansi") -> str:
    """The rendered text with its trained tokens marked.

    style="ansi": terminal colours (trained: bold on green; external: dim).
    style="plain": trained runs wrapped in ⟦ ⟧, no escape codes (logs, files, pipes).
    style="html": a <pre> fragment, one <span> per token with a hover title (see HTML_CSS).
    """
    if style == "html":
        return _html_tokens(rendered, tokenizer)
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    out = []
    for text, trained in _runs(rendered, tokenizer):
        text = visible(text)
        if style == "plain":
            out.append(f"{OPEN}{text}{CLOSE}" if trained else text)
        else:  # colour each line on its own so a background never bleeds to the end of a line
            code = _ANSI_TRAINED if trained else _ANSI_EXTERNAL
            out.append("\n".join(f"{code}{line}{_ANSI_RESET}" if line else "" for line in text.split("\n")))
    return "".join(out)


def _html_tokens(rendered: Rendered, tokenizer) -> str:
    ids, trainable = rendered.input_ids.tolist(), rendered.trainable.tolist()
    names = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [str(i) for i in ids]
    units: list[list] = []  # [first token, last token, text, trained]: empty pieces join the previous one
    for t, piece in enumerate(token_pieces(rendered, tokenizer)):
        if piece or not units:
            units.append([t, t, piece, bool(trainable[t])])
        else:
            units[-1][1], units[-1][3] = t, units[-1][3] or bool(trainable[t])
    spans = []
    for n, (a, b, piece, trained) in enumerate(units):
        title = "; ".join(f"token {t}: id {ids[t]} {names[t]!r}" + (" trained" if trainable[t] else "")
                          for t in range(a, b + 1))
        cls = ("tok tr" if trained else "tok ex") + (" alt" if n % 2 else "")
        spans.append(f'<span class="{cls}" title="{html.escape(title)}">{html.escape(visible(piece))}</span>')
    return f'<pre class="mtpo-tokens">{"".join(spans)}</pre>'


HTML_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:120em;color:#222}
h2{border-bottom:2px solid #ccc;margin-top:2em}
pre.mtpo-tokens{white-space:pre-wrap;word-break:break-all;font:13px/1.6 ui-monospace,Menlo,monospace;
  background:#fafafa;border:1px solid #ddd;padding:.6em}
.tok.ex{color:#888}.tok.ex.alt{color:#666}
.tok.tr{background:#b6efb0;color:#033}.tok.tr.alt{background:#8fe08a}
.tok:hover{outline:1px solid #d00;background:#ffe9a8}
.legend span{padding:.1em .5em;margin-right:1em}
table.segs{border-collapse:collapse;font-size:12px;margin:.4em 0}
table.segs td,table.segs th{border:1px solid #ddd;padding:1px 8px;text-align:left}
.err{color:#900;background:#fee;border:1px solid #e99;padding:.5em;white-space:pre-wrap}
"""


# --------------------------------------------------------------------------------------------
# Summaries, JSON and the HTML page


def _messages(msgs) -> str:
    return f"m{msgs[0]}" if len(msgs) == 1 else f"m{msgs[0]}-{msgs[-1]}"


def views(side: Side) -> list[tuple[str, Rendered]]:
    """(title, sequence) of each sequence a side is scored as: one, or one per turn group when the template
    rewrites history (`mtpo.render_turns`: each turn shown in the context it was generated in)."""
    parts = sequences(side.rendered)
    if len(parts) == 1 and parts[0] is side.rendered:
        return [(side.name, parts[0])]
    return [(f"{side.name} [turn sequence {i + 1}/{len(parts)}]", p) for i, p in enumerate(parts)]


def summary(side: Side, title: str | None = None, r: Rendered | None = None) -> str:
    """One line: tokens, trainable tokens, and every segment (messages, role, token span, trained?)."""
    r = side.rendered if r is None else r
    label = "" if side.label is None else f" (label={str(side.label).lower()})"
    segs = " ".join(f"[{_messages(s.messages)} {s.role} {s.token_span[0]}:{s.token_span[1]} "
                    f"{'TRAINED' if s.trained else 'external'}]" for s in r.segments)
    return f"{title or side.name}{label}: {len(r)} tokens, {r.num_trainable} trainable | segments: {segs}"


def _sequence_record(r: Rendered) -> dict:
    return dict(input_ids=r.input_ids.tolist(), trainable=r.trainable.astype(int).tolist(), num_tokens=len(r),
                num_trainable=r.num_trainable,
                segments=[{"messages": list(s.messages), "role": s.role, "token_span": list(s.token_span),
                           "trained": s.trained} for s in r.segments])


def side_record(row: int, side: Side) -> dict:
    """The JSON object for one side of one row (what `--format json` prints, one per line). A side scored
    per turn has `sequences`: one object per sequence (input_ids, trainable, segments) in turn order."""
    rec: dict = {"row": row, "side": side.name}
    if side.label is not None:
        rec["label"] = side.label
    parts = sequences(side.rendered)
    if len(parts) == 1 and parts[0] is side.rendered:
        rec.update(_sequence_record(side.rendered))
    else:
        rec.update(mode="per_turn", num_tokens=sum(len(p) for p in parts), num_trainable=side.rendered.num_trainable,
                   sequences=[_sequence_record(p) for p in parts])
    return rec


def _html_side(side: Side, tokenizer) -> str:
    return "".join(_html_sequence(side, title, r, tokenizer) for title, r in views(side))


def _html_sequence(side: Side, title: str, r: Rendered, tokenizer) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(_messages(s.messages))}</td><td>{esc(s.role)}</td>"
                   f"<td>{s.token_span[0]}:{s.token_span[1]}</td><td>{'trained' if s.trained else 'external'}</td></tr>"
                   for s in r.segments)
    label = "" if side.label is None else f" — label={str(side.label).lower()}"
    return (f"<h3>{esc(title + label)}</h3><p>{len(r)} tokens, {r.num_trainable} trainable</p>"
            f'<table class="segs"><tr><th>messages</th><th>role</th><th>tokens</th><th>loss</th></tr>{rows}</table>'
            + colorize(r, tokenizer, "html"))


def html_page(results: list[tuple[int, list[Side] | None, str | None]], tokenizer, title: str) -> str:
    """A single self-contained page: legend, then per row its sides (or its error)."""
    body = []
    for index, sides, error in results:
        body.append(f'<section><h2>row {index}</h2>')
        body.append(f'<div class="err">{html.escape(error)}</div>' if error else
                    "".join(_html_side(s, tokenizer) for s in sides))
        body.append("</section>")
    legend = ('<p class="legend"><span class="tok tr">trained (enters the loss)</span>'
              '<span class="tok ex">external (attended to, not trained)</span>'
              "hover a token for its index, id and vocabulary string; shading alternates per token; "
              "↵ marks a newline, ⇥ a tab</p>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{HTML_CSS}</style></head><body><h1>{html.escape(title)}</h1>{legend}"
            + "\n".join(body) + "</body></html>\n")


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtpo inspect", description="Render rows with the tokenizer's chat template and show which tokens "
        "are trained (enter the loss) and which are external.",
        epilog="Text output marks trained runs with colour on a terminal, else with ⟦ ⟧. Exit status: 0 ok, "
        "1 some rows failed to render (all are reported) or, with --verify, disagree; 2 bad arguments or unreadable data/tokenizer.")
    p.add_argument("data", metavar="DATA", help="JSONL / JSON / Parquet file, a datasets.save_to_disk folder, "
                   "or a Hub dataset name")
    p.add_argument("--tokenizer", required=True, metavar="PATH_OR_NAME", help="tokenizer folder or Hub name")
    p.add_argument("--chat-template", metavar="FILE", help="jinja file overriding the tokenizer's chat template")
    p.add_argument("--mistral-format", choices=("auto", "true", "false"), default="auto",
                   help="Mistral model dirs with tekken.json: mistral-common's encoder (true) or the HF tokenizer + "
                   "Jinja template (false); auto: mistral-common unless --chat-template is given")
    p.add_argument("--rows", type=_rows_arg, default=_DEFAULT_ROWS, metavar="N",
                   help="rows to show (default 5; 'all'); with --verify, rows to check (default all)")
    p.add_argument("--start", type=_count_arg, default=0, metavar="K", help="first row to show (default 0)")
    p.add_argument("--split", default="train", help="split of a dataset folder or Hub dataset (default train)")
    p.add_argument("--html", metavar="OUT.html", help="also write a self-contained HTML page here")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="stdout: highlighted text (default) or one JSON object per side per row")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="terminal colours (auto: when stdout is a terminal and NO_COLOR is unset)")
    p.add_argument("--end-of-turn", choices=END_OF_TURN_MODES, default="every",
                   help="train the end-of-turn token of every assistant turn, the last one, or none")
    p.add_argument("--trainable-roles", type=_roles_arg, default=("assistant",), metavar="ROLES",
                   help="comma-separated roles whose messages are trained (default assistant)")
    p.add_argument("--render-mode", choices=RENDER_MODES, default="auto",
                   help="auto: one sequence where the template is prefix-stable, else each assistant turn in its own "
                   "generation context (per_turn); or force single / per_turn")
    p.add_argument("--kind", choices=("auto",) + KINDS, default="auto",
                   help="row format (auto: chosen+rejected → pair; label → labeled; messages → conversation)")
    p.add_argument("--verify", action="store_true",
                   help="check every row's mask against an independent method (token-prefix differences); "
                   "print the rows where they disagree (exit 1 if any) instead of the rows")
    return p


def _rows_arg(value: str) -> int | None:
    if value == "all":
        return None
    n = _count_arg(value)
    if n == 0:
        raise argparse.ArgumentTypeError("must be at least 1 (or 'all')")
    return n


def _count_arg(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {n}")
    return n


def _roles_arg(value: str) -> tuple[str, ...]:
    roles = tuple(r.strip() for r in value.split(",") if r.strip())
    bad = [r for r in roles if r not in KNOWN_ROLES]
    if not roles or bad:
        raise argparse.ArgumentTypeError(f"unknown role(s) {bad or value!r}; choose from {', '.join(KNOWN_ROLES)}")
    return roles


def _setup(args, parser) -> tuple[ChatRenderer, list[dict], str]:
    template = None
    if args.chat_template:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                template = f.read()
        except OSError as e:
            parser.error(f"--chat-template: cannot read {args.chat_template}: {e.strerror or e}")
    if args.tokenizer.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(args.tokenizer)):
        parser.error(f"--tokenizer: no such folder {args.tokenizer}")
    from transformers import AutoTokenizer  # heavy import: only once the arguments are known good

    try:
        fmt = {"auto": None, "true": True, "false": False}[args.mistral_format]
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(args.tokenizer),
                                                  mistral_format=mistral_format(fmt, template))
        if not (template or getattr(tokenizer, "chat_template", None) or is_mistral_common(tokenizer)):
            raise ValueError("has no chat template; give one with --chat-template FILE")
        options = RenderOptions(trainable_roles=args.trainable_roles, end_of_turn=args.end_of_turn,
                                chat_template=template, render_mode=args.render_mode)
        renderer = make_renderer(tokenizer, options)
    except Exception as e:
        raise ValueError(f"tokenizer {args.tokenizer}: {e}") from None
    rows = load_rows(args.data, split=args.split)
    kind = detect_kind(rows) if args.kind == "auto" else args.kind
    return renderer, rows, kind


def cli(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        renderer, rows, kind = _setup(args, parser)
    except Exception as e:  # tokenizer / data / template problems: say what, no traceback
        print(f"mtpo inspect: error: {e}", file=sys.stderr)
        return 2
    if args.start >= len(rows):
        print(f"mtpo inspect: error: --start {args.start} but {args.data} has {len(rows)} rows", file=sys.stderr)
        return 2
    if args.verify:
        return _verify(args, rows, kind, renderer)
    n = 5 if args.rows == _DEFAULT_ROWS else args.rows
    stop = len(rows) if n is None else min(len(rows), args.start + n)
    try:
        results = _show_rows(args, rows[:stop], kind, renderer)
    except BrokenPipeError:  # `mtpo inspect ... | head`: stop quietly, like other command-line tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail
        return 1
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(html_page(results, renderer.tokenizer, f"mtpo inspect: {os.path.basename(args.data)} ({kind})"))
        print(f"mtpo inspect: wrote {args.html}", file=sys.stderr)
    failed = [i for i, _, error in results if error]
    if failed:
        shown = ", ".join(map(str, failed[:20])) + (", ..." if len(failed) > 20 else "")
        print(f"mtpo inspect: {len(failed)} of {len(results)} rows failed to render (rows {shown})", file=sys.stderr)
        return 1
    return 0


def _verify(args, rows: list[dict], kind: str, renderer: ChatRenderer) -> int:
    from mtpo.verify import verify_rows

    n = None if args.rows in (None, _DEFAULT_ROWS) else args.rows
    stop = len(rows) if n is None else min(len(rows), args.start + n)
    report = verify_rows(rows, renderer, range(args.start, stop), kind,
                         progress=sys.stderr.isatty())
    print("\n".join(report.lines()), flush=True)
    return 1 if report.mismatches or report.failed else 0


def _show_rows(args, rows: list[dict], kind: str, renderer: ChatRenderer) -> list[tuple]:
    """Render rows[args.start:] one by one, writing each to stdout as soon as it is done; a failing
    row is reported on stderr (naming the row) and the next one is tried."""
    use_color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty()
                                           and not os.environ.get("NO_COLOR"))
    style, out, tok = ("ansi" if use_color else "plain"), sys.stdout, renderer.tokenizer
    results = []
    for i in range(args.start, len(rows)):
        try:
            sides, error = render_row(rows[i], i, kind, renderer), None
        except RecordError as e:
            sides, error = None, str(e)
        except Exception as e:  # a bug or an unexpected template error: still name the row, keep going
            sides, error = None, f"row {i}: {type(e).__name__}: {e}"
        results.append((i, sides, error))
        if error:
            out.flush()
            print(f"mtpo inspect: error: {error}", file=sys.stderr, flush=True)
        elif args.format == "json":
            out.writelines(json.dumps(side_record(i, side)) + "\n" for side in sides)
        else:
            out.write(f"=== row {i} ({kind}) ===\n")
            for side in sides:
                for title, r in views(side):
                    text = colorize(r, tok, style)
                    out.write(f"--- {summary(side, title, r)}\n{text}{'' if text.endswith(chr(10)) else chr(10)}\n")
    out.flush()
    return results
