"""Pairs from graded rollouts: counts, seeds, every filter, skipped prompts, KTO and SFT rows, file formats."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest

from mtpo.agent.pairs import PairsConfig, build_pairs, cli, load_trajectories, run_pairs
from mtpo.data import RecordError, parse_conversation, parse_labeled, parse_pair


def traj(pid, sample, correct, finish="answered", tool_ok=True, calls=1, text=None):
    """A contract-format trajectory record; `text` makes two samples identical on purpose."""
    body = text if text is not None else f"sample {sample}"
    messages = [{"role": "user", "content": f"Question {pid}"},
                {"role": "assistant", "content": f"{body}\n```python\nprint(6*7)\n```"},
                {"role": "user", "content": "```output\n42\n```"},
                {"role": "assistant", "content": "\\boxed{42}" if correct else "\\boxed{41}"}]
    return {"prompt_id": pid, "sample": sample, "messages": messages, "gold": "42",
            "answer": "42" if correct else "41", "correct": correct, "finish_reason": finish,
            "num_tool_calls": calls, "num_tool_errors": 0 if tool_ok else 1, "last_tool_ok": tool_ok,
            "num_generated_tokens": 10, "meta": {}}


def mixed(pid, n_good, n_bad):
    return [traj(pid, i, i < n_good) for i in range(n_good + n_bad)]


def test_counts_skips_and_row_kinds():
    records = (mixed("a", 2, 2) + mixed("b", 3, 0) + mixed("c", 0, 3)
               + [traj("d", 0, True, finish="max_calls"), traj("d", 1, False, finish="length")])
    result = build_pairs(records)
    rep = result.report
    assert rep["trajectories"] == 12 and rep["prompts"] == 4 and rep["correct"] == 6
    assert rep["filtered"] == {"hit_limit": 2, "last_tool_error": 0, "no_tool_call": 0, "duplicate": 0}
    assert rep["kept"] == 10
    assert rep["prompts_skipped"] == {"all_correct": 1, "all_wrong": 1, "none_kept": 1}
    assert rep["prompts_paired"] == 1 and rep["pairs"] == 1 == len(result.dpo)
    assert rep["kto_rows"] == {"desirable": 5, "undesirable": 5, "dropped_by_balance": 0}
    assert rep["sft_rows"] == 5 == len(result.sft)
    pair = result.dpo[0]
    assert pair["prompt_id"] == "a" and pair["chosen"][-1]["content"] == "\\boxed{42}"
    assert pair["rejected"][-1]["content"] == "\\boxed{41}"
    assert {r["prompt_id"] for r in result.sft} == {"a", "b"}
    assert all(r["label"] == (r["messages"][-1]["content"] == "\\boxed{42}") for r in result.kto)


def test_rows_parse_and_render_with_the_trainers_readers(tiny_tok):
    from mtpo.render import ChatRenderer

    result = build_pairs(mixed("a", 2, 1) + mixed("b", 1, 2))
    renderer = ChatRenderer(tiny_tok)
    for i, row in enumerate(result.dpo):
        pair = parse_pair(row, i)
        assert [m.role for m in pair.prompt] == ["user"] and pair.chosen[0].role == "assistant"
        chosen, rejected = renderer.render_pair(pair)
        assert chosen.trainable.sum() > 0 and rejected.trainable.sum() > 0
    for i, row in enumerate(result.kto):
        assert parse_labeled(row, i).label is row["label"]
    for i, row in enumerate(result.sft):
        assert len(parse_conversation(row, i).messages) == 4


def test_pairs_are_distinct_combinations_capped_by_what_exists():
    records = mixed("a", 2, 2)
    three = build_pairs(records, PairsConfig(pairs_per_prompt=3)).dpo
    keys = {(r["chosen_sample"], r["rejected_sample"]) for r in three}
    assert len(three) == 3 == len(keys)
    every = build_pairs(records, PairsConfig(pairs_per_prompt=10)).dpo
    # brute force: all 2 × 2 (correct, incorrect) combinations, each once
    assert sorted((r["chosen_sample"], r["rejected_sample"]) for r in every) == list(itertools.product([0, 1], [2, 3]))


def test_seeded_order_independent_and_roughly_uniform():
    records = [r for p in range(30) for r in mixed(f"p{p}", 3, 3)]
    first = build_pairs(records, PairsConfig(seed=1)).dpo
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert build_pairs(shuffled, PairsConfig(seed=1)).dpo == first  # input order does not matter
    assert build_pairs(records, PairsConfig(seed=2)).dpo != first  # the seed does
    # Over many seeds each of the 3 × 3 combinations of one prompt is drawn about equally often.
    counts = Counter()
    for seed in range(900):
        row = build_pairs(mixed("x", 3, 3), PairsConfig(seed=seed)).dpo[0]
        counts[(row["chosen_sample"], row["rejected_sample"])] += 1
    assert set(counts) == set(itertools.product(range(3), range(3, 6)))
    assert all(60 <= n <= 140 for n in counts.values()), counts  # expected 100, sd ≈ 9.4


@pytest.mark.parametrize("bad,reason,flag", [
    (dict(finish="max_calls"), "hit_limit", "drop_hit_limit"),
    (dict(finish="max_tokens"), "hit_limit", "drop_hit_limit"),
    (dict(finish="length"), "hit_limit", "drop_hit_limit"),
    (dict(tool_ok=False), "last_tool_error", "drop_last_tool_error"),
    (dict(finish="tool_error"), "last_tool_error", "drop_last_tool_error"),
    (dict(calls=0), "no_tool_call", "drop_no_tool_call"),
])
def test_each_filter_counts_and_can_be_switched(bad, reason, flag):
    records = mixed("a", 1, 1) + [traj("a", 2, False, **bad)]
    options = {"drop_no_tool_call": True, "pairs_per_prompt": 5}
    on = build_pairs(records, PairsConfig(**options))
    assert on.report["filtered"][reason] == 1 and sum(on.report["filtered"].values()) == 1
    assert on.report["pairs"] == 1 and on.report["kept"] == 2
    off = build_pairs(records, PairsConfig(**{**options, flag: False}))
    assert off.report["filtered"][reason] == 0 and off.report["pairs"] == 2


def test_no_tool_call_is_dropped_by_default_as_in_the_original_pair_script():
    records = mixed("a", 1, 1) + [traj("a", 2, True, calls=0)]
    assert build_pairs(records).report["filtered"]["no_tool_call"] == 1


def test_duplicates_counted_and_never_paired_with_themselves():
    records = [traj("a", 0, True, text="same"), traj("a", 1, True, text="same"), traj("a", 2, False),
               traj("a", 3, False, text="other"), traj("a", 4, False, text="other")]
    result = build_pairs(records, PairsConfig(pairs_per_prompt=10))
    assert result.report["filtered"]["duplicate"] == 2
    assert result.report["pairs"] == 2 and result.report["sft_rows"] == 1  # 1 correct × 2 distinct wrong
    off = build_pairs(records, PairsConfig(pairs_per_prompt=10, drop_duplicates=False))
    assert off.report["pairs"] == 6


def test_kto_balance_is_seeded_and_counted():
    records = mixed("a", 5, 1) + mixed("b", 3, 1)
    plain = build_pairs(records)
    assert plain.report["kto_rows"] == {"desirable": 8, "undesirable": 2, "dropped_by_balance": 0}
    balanced = build_pairs(records, PairsConfig(kto_balance=True))
    assert balanced.report["kto_rows"] == {"desirable": 2, "undesirable": 2, "dropped_by_balance": 6}
    assert balanced.kto == build_pairs(records, PairsConfig(kto_balance=True)).kto
    assert balanced.report["sft_rows"] == 8  # balancing is for KTO only


def test_bad_records_name_the_row_and_field(tmp_path):
    rec = traj("a", 0, True)
    del rec["correct"]
    with pytest.raises(RecordError, match=r"row 1: missing field `correct`"):
        build_pairs([traj("a", 1, False), rec])
    with pytest.raises(RecordError, match=r"`correct` has the wrong type"):
        build_pairs([{**traj("a", 0, True), "correct": "yes"}])
    no_calls = traj("a", 0, True)
    del no_calls["num_tool_calls"]
    with pytest.raises(RecordError, match=r"row 0: missing field `num_tool_calls` \(needed by drop_no_tool_call"):
        build_pairs([no_calls])
    assert build_pairs([no_calls], PairsConfig(drop_no_tool_call=False)).report["kept"] == 1
    other = traj("a", 1, False)
    other["messages"][0]["content"] = "another question"
    with pytest.raises(RecordError, match="prompt 'a': samples 0 and 1 start with different prompt messages"):
        build_pairs([traj("a", 0, True), other])
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(traj("a", 0, True)) + "\n")
    b.write_text(json.dumps(traj("a", 0, False)) + "\n")
    with pytest.raises(RecordError, match="appears twice"):
        load_trajectories([str(a), str(b)])


def test_sharded_inputs_give_the_unsharded_result_and_cli_writes_files(tmp_path):
    records = [r for p in range(6) for r in mixed(f"p{p}", 2, 2)]
    whole, s0, s1 = (tmp_path / n for n in ("all.jsonl", "s0.jsonl", "s1.jsonl"))
    for path, rows in ((whole, records), (s0, records[1::2]), (s1, records[::2])):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = run_pairs(PairsConfig(rollouts=[str(whole)], output_dir=str(tmp_path / "one")))
    assert cli([f"--rollouts={s0},{s1}", f"--output_dir={tmp_path / 'two'}"]) == 0
    assert cli([f"--rollouts={tmp_path / 's*.jsonl'}", f"--output_dir={tmp_path / 'glob'}"]) == 0
    for name in ("pairs.jsonl", "kto.jsonl", "sft.jsonl"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "glob" / name).read_text()
    report = json.loads((tmp_path / "two" / "pairs_report.json").read_text())
    assert report["pairs"] == one["pairs"] == 6 and report["inputs"] == [str(s0), str(s1)]
    assert not list(tmp_path.glob("*/*.tmp*"))  # no temporary file left behind
    assert cli([f"--rollouts={tmp_path / 'missing.jsonl'}", f"--output_dir={tmp_path}"]) == 2


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "q"}, {"role": "assistant"}], r"row 0, messages, message 1: empty content"),
    (["q", {"role": "assistant", "content": "a"}], r"row 0, messages, message 0: message must be an object"),
    ([{"role": "robot", "content": "q"}], r"row 0, messages, message 0: unknown role 'robot'"),
])
def test_a_broken_message_is_an_error_naming_row_and_message(tmp_path, messages, match):
    """Found by QA: such a record used to pass into kto.jsonl (or give a misleading "different prompt
    messages" error) and fail only later, in the trainer, as a row of the wrong file."""
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({**traj("a", 0, False), "messages": messages}) + "\n")
    with pytest.raises(RecordError, match=match + r".*r\.jsonl"):
        load_trajectories([str(path)], PairsConfig())
