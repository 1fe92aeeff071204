"""`mtpo dpo|kto|sft` as a new user meets it (`mtpo.trainers.command`, `mtpo.options`): `--help`
lists every option; help and config errors never import torch; every config or data error is one
line and exit 2; data loss is loud (`max_skipped_fraction`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtpo.cli import main as cli_main
from mtpo.data import RecordError, parse_pair
from mtpo.options import DEFAULT_MARGIN, LOSS_TYPES, TRAINER_OPTIONS

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-model"
ROW = {"chosen": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}],
       "rejected": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 5."}]}


def light_run(*argv: str) -> subprocess.CompletedProcess:
    """`mtpo ARGV` in a fresh interpreter that then reports whether torch / transformers were imported."""
    code = ("import sys\nfrom mtpo.cli import main\nrc = main(sys.argv[1:])\n"
            "heavy = sorted(m for m in ('torch', 'transformers.training_args') if m in sys.modules)\n"
            "print('HEAVY:' + ','.join(heavy), file=sys.stderr)\nsys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")})


def one_error_line(proc: subprocess.CompletedProcess, name: str = "dpo") -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("HEAVY:")]
    assert len(lines) == 1 and lines[0].startswith(f"mtpo {name}: error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("name", ["dpo", "kto", "sft"])
def test_help_lists_every_option_with_default_and_imports_no_torch(name):
    from transformers import TrainingArguments

    proc = light_run(name, "--help")
    assert proc.returncode == 0 and "HEAVY:\n" in proc.stderr, proc.stderr
    text = proc.stdout
    assert "returns the run summary" not in text  # no internal docstring
    mtpo_part, _, training_part = text.partition("transformers TrainingArguments options")
    own = [f for f in dataclasses.fields(TRAINER_OPTIONS[name])]
    for f in own:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = repr(default) if isinstance(default, str) else str(default)
        assert f"  --{f.name}  (default: {shown})\n      {f.metadata['help'].split()[0]}" in mtpo_part, f.name
    assert mtpo_part.count("\n  --") == len(own)
    for f in dataclasses.fields(TrainingArguments):
        if f.init and not f.name.startswith("_"):
            assert f"  --{f.name}  (default: " in training_part, f.name
    assert "  --learning_rate  (default: 5e-05)\n      The initial learning rate for the optimizer.\n" in training_part


def test_config_errors_are_one_line_and_import_no_torch(tmp_path):
    line = one_error_line(light_run("dpo", "examples/kto.yaml"))
    assert "unknown option 'desirable_weight'" in line and "this looks like a `mtpo kto` config" in line
    assert "did you mean 'beta'" in one_error_line(light_run("dpo", "examples/dpo.yaml", "--betta=1"))
    assert "learning_rate: expected a number" in one_error_line(light_run("dpo", "examples/dpo.yaml",
                                                                          "--learning_rate=fast"))
    assert "loss_type must be one of" in one_error_line(light_run("dpo", "examples/dpo.yaml", "--loss_type=x"))
    if importlib.util.find_spec("wandb") is None:
        proc = light_run("sft", "examples/sft.yaml", "--report_to=wandb", f"--output_dir={tmp_path / 'out'}")
        assert "report_to: wandb is not installed (pip install wandb)" in one_error_line(proc, "sft")
        assert "HEAVY:\n" in proc.stderr
    for proc in (light_run("dpo", "examples/kto.yaml"), light_run("dpo", "examples/dpo.yaml", "--beta=-1")):
        assert "HEAVY:\n" in proc.stderr, proc.stderr


def test_report_to_without_its_package_fails_before_the_model(monkeypatch):
    from mtpo.config import ConfigError
    from mtpo.options import check_report_to

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="report_to: wandb is not installed"):
        check_report_to(["wandb"])
    with pytest.raises(ConfigError, match="unknown integration 'wandbb'"):
        check_report_to("wandbb")
    check_report_to("none")


def test_malformed_jsonl_line_is_one_line_exit_2(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(ROW) + "\n{not json\n", encoding="utf-8")
    rc = cli_main(["dpo", f"--model_name_or_path={TINY}", f"--train_data={data}", f"--output_dir={tmp_path / 'o'}",
                   "--use_cpu", "--report_to=none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == f"mtpo dpo: error: {data}:2: invalid JSON (Expecting property name enclosed " \
                                  "in double quotes)"
    assert not any("Traceback" in line for line in err)
    rc = cli_main(["inspect", str(data), "--tokenizer", str(TINY)])  # the same error, the same way
    assert rc == 2 and capsys.readouterr().err.strip().endswith(f"{data}:2: invalid JSON (Expecting property "
                                                                 "name enclosed in double quotes)")


def test_research_pair_without_assistant_turn_names_the_real_cause():
    row = {"chosen": ROW["chosen"], "rejected": ROW["rejected"][:1]}
    with pytest.raises(RecordError, match=r"row 4, rejected: empty completion: no assistant message"):
        parse_pair(row, 4)
    with pytest.raises(RecordError, match=r"row 4, chosen: empty completion: no assistant message"):
        parse_pair({"chosen": ROW["chosen"][:1], "rejected": ROW["rejected"]}, 4)
    differ = {"chosen": ROW["chosen"], "rejected": [{"role": "user", "content": "other"}, ROW["rejected"][1]]}
    with pytest.raises(RecordError, match="prompts differ"):  # a real prompt difference still says so
        parse_pair(differ, 4)


def test_light_constants_match_the_losses():
    from mtpo import losses as L

    assert LOSS_TYPES == tuple(sorted(L.PREFERENCE_LOSSES)) and DEFAULT_MARGIN == L.DEFAULT_MARGIN


# ----------------------------------------------------------------------------------- data loss is loud


def _long(row: dict) -> dict:
    row = json.loads(json.dumps(row))
    row["chosen"][-1]["content"] += " and so on" * 100
    return row


def test_skipped_rows_warn_with_counts_and_too_many_stop_with_reasons(tmp_path, capsys, caplog):
    from transformers import AutoModelForCausalLM

    def refuse(*a, **k):
        raise AssertionError("model loaded")

    data = tmp_path / "train.jsonl"
    common = [f"--model_name_or_path={TINY}", f"--train_data={data}", "--use_cpu", "--report_to=none",
              "--max_length=128", "--eval_strategy=no"]
    data.write_text("".join(json.dumps(r) + "\n" for r in [ROW] * 2 + [_long(ROW)] * 3), encoding="utf-8")
    mp = pytest.MonkeyPatch()
    mp.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    try:
        rc = cli_main(["dpo", *common, f"--output_dir={tmp_path / 'a'}"])  # 3 of 5 > 0.5
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert rc == 2 and "3 of 5 rows skipped, more than max_skipped_fraction=0.5" in line
        assert "3 longer than max_length=128 (first: row 2)" in line
        with caplog.at_level(logging.WARNING, logger="mtpo"), pytest.raises(AssertionError, match="model loaded"):
            cli_main(["dpo", *common, f"--output_dir={tmp_path / 'b'}", "--max_skipped_fraction=0.6"])
    finally:
        mp.undo()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("SKIPPED 3 of 5 rows" in w and "longer than max_length=128" in w for w in warnings), warnings


def test_ctrl_c_before_training_is_one_line_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("mtpo.trainers.setup.load_tokenizer", interrupted)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(ROW) + "\n", encoding="utf-8")
    rc = cli_main(["dpo", f"--model_name_or_path={TINY}", f"--train_data={data}", f"--output_dir={tmp_path / 'o'}",
                   "--use_cpu", "--report_to=none"])
    assert rc == 130 and capsys.readouterr().err.strip().splitlines() == ["mtpo dpo: interrupted; no checkpoint saved"]


def test_help_into_a_closed_pipe_is_not_a_traceback():
    """`mtpo generate --help | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the help is written: the write fails with EPIPE
    proc = subprocess.run([sys.executable, "-m", "mtpo", "generate", "--help"], stdout=write,
                          stderr=subprocess.PIPE, timeout=60)
    os.close(write)
    err = proc.stderr.decode()
    assert proc.returncode == 141 and "Traceback" not in err, err


def test_sigterm_in_a_config_command_is_one_line(capsys):
    """`mtpo generate|eval|pairs|iterate`: SIGTERM ends like Ctrl-C (one line, exit 143), and the
    previous SIGTERM handler is restored afterwards."""
    import dataclasses as dc
    import signal
    import time

    from mtpo.cli import run_config_command

    @dc.dataclass
    class Opts:
        n: int = 1

    def job(config):
        """A job that gets SIGTERM."""
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the job")

    before = signal.getsignal(signal.SIGTERM)
    assert run_config_command("job", Opts, job, []) == 143
    assert capsys.readouterr().err.strip() == "mtpo job: stopped by SIGTERM; rerun the same command to continue where it stopped"
    assert signal.getsignal(signal.SIGTERM) is before
