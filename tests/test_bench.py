"""Smoke tests of bench/: every script runs in a tiny configuration, so the benchmarks cannot rot.

They also check what makes the comparison fair: at step 1 (policy == reference) mtpo and TRL report
the same loss and the same policy log-probs on the same token ids, for DPO and for KTO.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
pytest.importorskip("trl")

import bench_preprocess  # noqa: E402
import bench_scaling  # noqa: E402
import bench_train_step  # noqa: E402
import benchlib  # noqa: E402

TINY = ["--vocab", "256", "--seq", "48", "--round", "8", "--hidden", "32", "--layers", "1",
        "--warmup", "1", "--repeats", "1"]


def step(lib: str, algo: str, *extra: str) -> dict:
    return bench_train_step.worker_from_argv(["--lib", lib, "--algo", algo, *TINY, *extra])


@pytest.mark.parametrize("algo, loss_at_init", [("dpo", math.log(2)), ("kto", 0.5)])
def test_train_step_mtpo_and_trl_do_the_same_work(algo, loss_at_init):
    mtpo, trl = step("mtpo", algo, "--no-multiturn"), step("trl", algo, "--no-multiturn")
    for r in (mtpo, trl):
        assert r["step_s"] > 0 and r["peak_mib"] > 0 and len(r["step_s_all"]) == 2
        assert r["first_loss"] == pytest.approx(loss_at_init, abs=1e-4)
    assert mtpo["first_logps_chosen"] == pytest.approx(trl["first_logps_chosen"], rel=1e-4)
    multi = step("mtpo", algo, "--multiturn")
    assert multi["data"] == "multi-turn" and multi["first_logps_chosen"] != mtpo["first_logps_chosen"]
    table = bench_train_step.markdown([mtpo, trl, multi], {**vars(bench_train_step.parse(TINY)), "chunk_size": None})
    assert "| " + algo.upper() + " | 256 | 48 |" in table and "Multi-turn" in table


def test_train_step_driver_writes_json_and_markdown(tmp_path):
    """The real driver: one configuration in its own subprocess, results to OUT.json / OUT.md."""
    out = tmp_path / "step"
    bench_train_step.main(["--libs", "mtpo", "--algos", "dpo", "--no-multiturn", *TINY, "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    (result,) = data["results"]
    assert "error" not in result, result
    assert result["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert data["meta"]["machine"]["cpu_cores"] >= 1
    assert "| DPO | 256 | 48 |" in out.with_suffix(".md").read_text()


def test_worker_failure_is_recorded_not_skipped():
    r = benchlib.run_worker(BENCH / "bench_train_step.py", ["--lib", "nope"], timeout=60)
    assert "error" in r


def test_scaling_fits_a_slope(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_scaling.bl, "run_worker", lambda script, argv, timeout: step(*argv[1:4:2], *argv[4:]))
    out = tmp_path / "scaling"
    bench_scaling.main(["--vocab", "256", "--seq", "32", "64", "--hidden", "32", "--layers", "1",
                        "--chunk-size", "8", "--out", str(out)])
    meta = json.loads(out.with_suffix(".json").read_text())["meta"]
    assert set(meta["fits"]["mtpo"]) == {"intercept_mib", "mib_per_1k_tokens", "points"}
    assert bench_scaling.fit_line([1, 2, 3], [3, 5, 7]) == pytest.approx((1, 2))


def test_preprocess_variants_agree(tmp_path):
    out = tmp_path / "pre"
    bench_preprocess.main(["--rows", "3", "--rounds", "2", "--repeats", "1", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["identical_ids"] == "3/3"
    assert data["meta"]["trained_fraction_mtpo"] < data["meta"]["trained_fraction_trl"]  # tool outputs masked
    assert {r["variant"] for r in data["results"]} == {"mtpo", "trl", "trl-loop"}


def test_logprobs_bench_worker(capsys):
    import bench_logprobs

    bench_logprobs.main(["--worker", "chunked", "--vocab", "64", "--seq", "16", "--batch", "1", "--hidden", "16",
                         "--repeats", "1", "--warmup", "0"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["variant"] == "chunked" and result["median_s"] > 0


def test_grade_bench_tiny_run(tmp_path):
    """bench_grade on 20 MATH golds and 20 pairs (~10 s): every section runs, math-verify is reached,
    the JSON parses, and no wrong answer is graded correct."""
    import bench_grade

    if not (bench_grade.DATA / "math_test.jsonl").is_file() or not (bench_grade.DATA / "gsm8k_test.jsonl").is_file():
        pytest.skip(f"needs the MATH and GSM8K test sets in {bench_grade.DATA}")
    out = tmp_path / "grade"
    assert bench_grade.main(["--limit", "20", "--pairs", "20", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["false_positives"]["pairs"] == 20 and res["false_positives"]["equivalent_verdicts"] == 0
    assert res["near_misses"]["equivalent_verdicts"] == 0 and res["perturbations"]["equivalent_verdicts"] == 0
    assert res["self_equivalence"]["golds_passing_all"] == res["self_equivalence"]["golds"] == 20
    assert res["throughput"]["math_verify_decides_pool"]["math_verify_calls"] > 0
    assert "| false positives" in out.with_suffix(".md").read_text()
