"""Smoke test of bench/bench_per_turn.py in a tiny configuration, so the benchmark cannot rot: both modes
train the same tokens, per-turn uses one sequence per turn."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
pytest.importorskip("trl")

import bench_per_turn  # noqa: E402


def test_per_turn_bench_worker_compares_like_with_like():
    """The worker in-process (the script runs it in a subprocess per mode; that wrapper is benchlib's)."""
    tiny = ["--words", "5", "--batch", "1", "--vocab", "1000", "--hidden", "32", "--layers", "1", "--repeats", "1"]
    single = bench_per_turn.worker(bench_per_turn.parse_args(tiny + ["--mode", "single"]))
    per_turn = bench_per_turn.worker(bench_per_turn.parse_args(tiny + ["--mode", "per_turn"]))
    assert single["trained_tokens"] == per_turn["trained_tokens"] > 0
    assert (single["sequences"], per_turn["sequences"]) == (2, 8)  # 1 pair; 4 turns each scored on its own
    assert single["step_s"] > 0 and per_turn["peak_mib"] > 0
