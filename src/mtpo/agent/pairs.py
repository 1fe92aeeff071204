"""Graded rollouts → training rows in the trainers' own formats: DPO pairs, KTO rows, SFT/RAFT rows.

    mtpo pairs --rollouts=iter_1/rollouts.jsonl --output_dir=iter_1      (or a YAML config)

Per prompt, the kept trajectories split into correct and incorrect ones; `pairs_per_prompt` random
(correct, incorrect) combinations — distinct, drawn without replacement — become research-format DPO
rows {"chosen": msgs, "rejected": msgs}. The draw is seeded per prompt (`seed` + prompt id), so the
result does not depend on the order of the input files or on how generation was sharded.

Filters, applied in this order, each trajectory counted under the first one it fails:
  hit_limit        finish_reason max_calls / max_tokens / length (the policy never finished)
  last_tool_error  the last tool output was an error (last_tool_ok false, or finish_reason tool_error)
  no_tool_call     no tool call at all (as the original pair script did; `drop_no_tool_call: false` keeps them)
  duplicate        the same message list as an earlier sample of the same prompt
Prompts whose kept samples are all correct or all wrong give no pair and are counted.
KTO rows: every kept trajectory, label = correct (`kto_balance` down-samples the larger class, seeded).
SFT/RAFT rows: every kept correct trajectory.

Outputs (each written atomically: a killed run never leaves a half-written file under the final name):
  pairs.jsonl  kto.jsonl  sft.jsonl  pairs_report.json
Rows carry `prompt_id` (and the sample indices) for traceability; the trainers ignore extra keys.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field

from mtpo.config import ConfigError
from mtpo.data import RecordError, load_rows, parse_messages

logger = logging.getLogger("mtpo")

LIMIT_REASONS = ("max_calls", "max_tokens", "length")
FILTERS = ("hit_limit", "last_tool_error", "no_tool_call", "duplicate")
OUTPUT_FILES = {"dpo": "pairs.jsonl", "kto": "kto.jsonl", "sft": "sft.jsonl", "report": "pairs_report.json"}


@dataclass
class PairsConfig:
    """`mtpo pairs` options."""

    rollouts: list[str] = field(default_factory=list, metadata={"help": "Trajectory JSONL file(s) or patterns (all shards)."})
    output_dir: str = field(default="outputs/pairs", metadata={"help": "Where pairs/kto/sft .jsonl + report go."})
    pairs_per_prompt: int = field(default=1, metadata={"help": "Distinct (correct, incorrect) pairs per prompt, at most."})
    seed: int = field(default=42, metadata={"help": "Seed of the pair draw (mixed with each prompt id)."})
    drop_hit_limit: bool = field(default=True, metadata={"help": "Drop trajectories that hit max_calls/max_tokens/length."})
    drop_last_tool_error: bool = field(default=True, metadata={"help": "Drop trajectories whose last tool output is an error."})
    drop_no_tool_call: bool = field(default=True, metadata={"help": "Drop trajectories that made no tool call."})
    drop_duplicates: bool = field(default=True, metadata={"help": "Drop repeated message lists within a prompt."})
    kto_balance: bool = field(default=False, metadata={"help": "Down-sample the larger KTO class to the smaller (seeded)."})

    def __post_init__(self):
        if isinstance(self.rollouts, str):
            self.rollouts = [self.rollouts]
        if self.pairs_per_prompt < 1:
            raise ConfigError(f"pairs_per_prompt must be at least 1, got {self.pairs_per_prompt}")


@dataclass
class PairsResult:
    dpo: list[dict]
    kto: list[dict]
    sft: list[dict]
    report: dict


# ------------------------------------------------------------------------------------------ reading


def check_record(rec: dict, row: int, where: str = "", need_tool_calls: bool = False) -> None:
    """A trajectory record has the fields pairs need, with the right types (error names row + field)."""
    suffix = f" ({where})" if where else ""
    if need_tool_calls and "num_tool_calls" not in rec:
        raise RecordError(row, f"missing field `num_tool_calls` (needed by drop_no_tool_call){suffix}")
    for key, types in (("prompt_id", (str, int)), ("messages", list), ("correct", bool), ("finish_reason", str)):
        if key not in rec:
            raise RecordError(row, f"missing field `{key}`{suffix}")
        if not isinstance(rec[key], types) or (key == "correct" and not isinstance(rec[key], bool)):
            raise RecordError(row, f"`{key}` has the wrong type: {type(rec[key]).__name__}{suffix}")
    for key in ("last_tool_ok", "num_tool_calls", "sample"):
        if rec.get(key) is not None and not isinstance(rec[key], (bool if key == "last_tool_ok" else int)):
            raise RecordError(row, f"`{key}` has the wrong type: {type(rec[key]).__name__}{suffix}")
    try:  # each message as the trainers read it: a broken one fails here, not as a row of pairs.jsonl later
        parse_messages(rec["messages"], row, "messages")
    except RecordError as e:
        e.args = (f"{e}{suffix}",)
        raise


def load_trajectories(paths: list[str], config: PairsConfig | None = None) -> list[dict]:
    """All records of all files, validated; a (prompt_id, sample) seen twice is an error (overlapping shards)."""
    if not paths:
        raise ConfigError("rollouts: no trajectory file given")
    expanded = []
    for path in paths:  # a pattern (`iter_1/rollouts.*.jsonl`) stands for all shards it matches
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        if not matches:
            raise ConfigError(f"rollouts: no file matches {path}")
        expanded += matches
    records, seen = [], {}
    for path in expanded:
        for i, rec in enumerate(load_rows(path)):
            check_record(rec, i, path, need_tool_calls=bool(config and config.drop_no_tool_call))
            key = (str(rec["prompt_id"]), rec.get("sample"))
            if rec.get("sample") is not None and key in seen:
                raise RecordError(i, f"prompt {key[0]!r} sample {key[1]} appears twice (also {seen[key]}); "
                                     f"overlapping shards? ({path})")
            seen[key] = f"{path} row {i}"
            records.append(rec)
    return records


# ------------------------------------------------------------------------------------------ building


def filter_reason(rec: dict, config: PairsConfig) -> str | None:
    """The first filter the trajectory fails (duplicates are found per prompt, not here)."""
    if config.drop_hit_limit and rec["finish_reason"] in LIMIT_REASONS:
        return "hit_limit"
    if config.drop_last_tool_error and (rec["finish_reason"] == "tool_error" or rec.get("last_tool_ok") is False):
        return "last_tool_error"
    if config.drop_no_tool_call and rec["num_tool_calls"] == 0:  # presence checked by check_record
        return "no_tool_call"
    return None


def prompt_rng(seed: int, *parts) -> random.Random:
    """A generator seeded by (seed, parts) through a hash: stable across runs, platforms and processes."""
    digest = hashlib.sha256(json.dumps([seed, *map(str, parts)]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _group(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(str(rec["prompt_id"]), []).append(rec)
    for pid, recs in groups.items():
        recs.sort(key=lambda r: (r.get("sample") is None, r.get("sample") or 0))
    return dict(sorted(groups.items()))


def _keep(recs: list[dict], config: PairsConfig, filtered: Counter) -> list[dict]:
    kept, seen = [], set()
    for rec in recs:
        reason = filter_reason(rec, config)
        if reason is None and config.drop_duplicates:
            key = json.dumps(rec["messages"], sort_keys=True)
            reason = "duplicate" if key in seen else None
            seen.add(key)
        if reason:
            filtered[reason] += 1
        else:
            kept.append(rec)
    return kept


def _prompt_messages(messages: list[dict]) -> list[dict]:
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant":
            return messages[:i]
    return messages


def _row(rec: dict, **values) -> dict:
    row = {**values, "prompt_id": str(rec["prompt_id"])}
    if rec.get("tools") is not None:
        row["tools"] = rec["tools"]
    return row


def _draw_pairs(pid: str, good: list[dict], bad: list[dict], config: PairsConfig) -> list[dict]:
    if _prompt_messages(good[0]["messages"]) != _prompt_messages(bad[0]["messages"]):
        raise RecordError(None, f"prompt {pid!r}: samples {good[0].get('sample')} and {bad[0].get('sample')} start "
                                "with different prompt messages (one prompt id used for two prompts?)")
    combos = [(g, b) for g in range(len(good)) for b in range(len(bad))]
    chosen = prompt_rng(config.seed, "pairs", pid).sample(combos, min(config.pairs_per_prompt, len(combos)))
    return [_row(good[g], chosen=good[g]["messages"], rejected=bad[b]["messages"],
                 chosen_sample=good[g].get("sample"), rejected_sample=bad[b].get("sample")) for g, b in chosen]


def _balance(rows: list[dict], config: PairsConfig) -> tuple[list[dict], int]:
    good = [r for r in rows if r["label"]]
    bad = [r for r in rows if not r["label"]]
    n = min(len(good), len(bad))
    if not config.kto_balance or not n or len(good) == len(bad):
        return rows, 0
    rng = prompt_rng(config.seed, "kto_balance")
    big = good if len(good) > len(bad) else bad
    keep = set(map(id, rng.sample(big, n)))
    out = [r for r in rows if (r["label"] == (big is bad)) or id(r) in keep]
    return out, len(rows) - len(out)


def build_pairs(records: list[dict], config: PairsConfig | None = None) -> PairsResult:
    """Trajectory records → DPO / KTO / SFT rows and a report of every count (pure: no files)."""
    config = config or PairsConfig()
    for i, rec in enumerate(records):
        check_record(rec, i, need_tool_calls=config.drop_no_tool_call)
    filtered, skipped = Counter({k: 0 for k in FILTERS}), Counter(all_correct=0, all_wrong=0, none_kept=0)
    dpo, kto, sft = [], [], []
    groups = _group(records)
    for pid, recs in groups.items():
        kept = _keep(recs, config, filtered)
        good = [r for r in kept if r["correct"]]
        bad = [r for r in kept if not r["correct"]]
        kto += [_row(r, messages=r["messages"], label=r["correct"], sample=r.get("sample")) for r in kept]
        sft += [_row(r, messages=r["messages"], sample=r.get("sample")) for r in good]
        if good and bad:
            dpo += _draw_pairs(pid, good, bad, config)
        else:
            skipped["none_kept" if not kept else "all_correct" if good else "all_wrong"] += 1
    kto, dropped = _balance(kto, config)
    n_correct = sum(r["correct"] for r in records)
    report = {
        "trajectories": len(records), "prompts": len(groups), "correct": n_correct,
        "accuracy": n_correct / len(records) if records else 0.0,
        "finish_reasons": dict(sorted(Counter(r["finish_reason"] for r in records).items())),
        "filtered": dict(filtered), "kept": len(records) - sum(filtered.values()),
        "prompts_skipped": dict(skipped), "prompts_paired": len(groups) - sum(skipped.values()),
        "pairs": len(dpo), "kto_rows": {"desirable": sum(r["label"] for r in kto),
                                        "undesirable": sum(not r["label"] for r in kto), "dropped_by_balance": dropped},
        "sft_rows": len(sft), "pairs_per_prompt": config.pairs_per_prompt, "seed": config.seed,
    }
    return PairsResult(dpo, kto, sft, report)


# ------------------------------------------------------------------------------------------ writing


def atomic_write_text(path: str, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path` (atomic on POSIX)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_jsonl(path: str, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_outputs(result: PairsResult, output_dir: str) -> dict[str, str]:
    """The three row files, then the report (written last: its presence means the others are complete)."""
    paths = {k: os.path.join(output_dir, name) for k, name in OUTPUT_FILES.items()}
    for kind in ("dpo", "kto", "sft"):
        atomic_write_jsonl(paths[kind], getattr(result, kind))
    atomic_write_text(paths["report"], json.dumps(result.report, indent=2) + "\n")
    return paths


def run_pairs(config: PairsConfig) -> dict:
    """Read the rollouts, build every kind of row, write them; returns the report (+ the file paths)."""
    result = build_pairs(load_trajectories(config.rollouts, config), config)
    result.report["inputs"] = list(config.rollouts)
    result.report["files"] = write_outputs(result, config.output_dir)
    return result.report


def format_report(report: dict) -> str:
    filtered = ", ".join(f"{k} {v}" for k, v in report["filtered"].items())
    skipped = ", ".join(f"{k} {v}" for k, v in report["prompts_skipped"].items())
    kto = report["kto_rows"]
    return "\n".join([
        f"trajectories {report['trajectories']} ({report['prompts']} prompts), accuracy {report['accuracy']:.3f}",
        f"  filtered: {filtered}  → kept {report['kept']}",
        f"  prompts without a pair: {skipped}",
        f"  DPO pairs {report['pairs']}, KTO rows {kto['desirable']} desirable + {kto['undesirable']} undesirable"
        f" ({kto['dropped_by_balance']} dropped by balancing), SFT rows {report['sft_rows']}",
    ])


def cli(argv: list[str]) -> int:
    from mtpo.cli import run_config_command

    def pairs(config: PairsConfig) -> None:
        """Graded rollouts → DPO pairs, KTO rows and SFT/RAFT rows (the trainers' own formats)."""
        report = run_pairs(config)
        print(format_report(report))
        print(f"  → {report['files']['dpo']}, {report['files']['kto']}, {report['files']['sft']}")

    return run_config_command("pairs", PairsConfig, pairs, argv)
