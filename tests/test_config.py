"""Configs: YAML + `--key=value` overrides, type checks, aliases, and errors that come before any model
is loaded (`mtpo.config`, `mtpo.trainers.setup.run_cli`). Also: every shipped recipe under configs/dpo/
parses, and docs/dpo.md documents every DPO option."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from mtpo.cli import main as cli_main
from mtpo.config import ConfigError, MTPOConfig, load_config, parse_overrides, save_config
from mtpo.trainers.dpo import DPOConfig, train_dpo

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-model"
EXAMPLE_YAML = str(ROOT / "examples" / "dpo.yaml")
RECIPES = sorted((ROOT / "configs" / "dpo").glob("*.yaml"))
ROW = {"chosen": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}],
       "rejected": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 5."}]}


def dpo(*overrides: str, **extra) -> DPOConfig:
    return load_config(DPOConfig, EXAMPLE_YAML, list(overrides), **extra)


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load model weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded: {args}")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


# ----------------------------------------------------------------------------------- YAML + overrides


def test_yaml_file_values_and_warmup_ratio_alias():
    config = dpo()
    assert isinstance(config, DPOConfig)
    assert (config.model_name_or_path, config.loss_type, config.beta) == ("examples/tiny-model", "sigmoid", 0.1)
    assert config.learning_rate == 5e-4 and config.max_length == 1024
    assert config.warmup_steps == 0.1  # `warmup_ratio: 0.1` in the file; a float < 1 is a ratio in transformers 5
    assert config.get_warmup_steps(100) == 10
    assert config.remove_unused_columns is False  # batches carry explicit masks: keep every column


def test_overrides_are_typed():
    config = dpo("--beta=1", "--use_peft=true", "--lora_target_modules=[q_proj,v_proj]",
                 "--trainable_roles=assistant,tool", "--max_length=null", "--learning_rate=2e-7",
                 "--eval_strategy=no", "--bf16", "--max_steps", "3", "--run-name=x")
    assert config.beta == 1.0 and type(config.beta) is float  # float from an int
    assert config.use_peft is True and config.bf16 is True  # explicit and bare flag
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    assert config.trainable_roles == ["assistant", "tool"]  # comma-separated string → list
    assert config.max_length is None
    assert config.learning_rate == 2e-7  # YAML 1.1 would read `2e-7` as a string
    assert config.eval_strategy == "no"  # ... and `no` as false
    assert config.max_steps == 3 and config.run_name == "x"


def test_yaml_words_for_booleans_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("use_peft: yes\ndisable_dropout: off\nlearning_rate: 4e-7\n", encoding="utf-8")
    config = load_config(DPOConfig, str(path))
    assert config.use_peft is True and config.disable_dropout is False and config.learning_rate == 4e-7


@pytest.mark.parametrize("override, key", [
    ("--beta=abc", "beta"),
    ("--use_peft=maybe", "use_peft"),
    ("--max_steps=1.5", "max_steps"),
    ("--max_length=long", "max_length"),
    ("--trainable_roles=[1, 2]", "trainable_roles"),
    ("--loss_type=dpo", "loss_type"),
    ("--beta=0", "beta"),
    ("--truncation=keep_end", "truncation"),
])
def test_wrong_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        dpo(override)


def test_unknown_keys_suggest_the_closest_option(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option 'betta' \(did you mean 'beta'\?\)"):
        dpo("--betta=0.2")
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 1.0e-6\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config(DPOConfig, str(path))


def test_warmup_alias_rules(tmp_path):
    assert dpo("--warmup_steps=5").warmup_steps == 5  # a newer source's new name beats the file's old name
    assert dpo("--warmup_ratio=0.25").warmup_steps == 0.25
    with pytest.raises(ConfigError, match="warmup_steps"):
        dpo("--warmup_ratio=1.5")  # a ratio must be < 1
    path = tmp_path / "both.yaml"
    path.write_text("warmup_ratio: 0.1\nwarmup_steps: 10\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="either 'warmup_ratio' or 'warmup_steps'"):
        load_config(DPOConfig, str(path))


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(DPOConfig, str(tmp_path / "nope.yaml"))
    path = tmp_path / "list.yaml"
    path.write_text("- beta\n- 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(DPOConfig, str(path))
    path.write_text("beta: [0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DPOConfig, str(path))
    with pytest.raises(ConfigError, match="--key=value"):
        parse_overrides(["beta=0.1"])


def test_dpo_option_combinations_are_checked():
    with pytest.raises(ConfigError, match="label_smoothing only applies"):
        dpo("--loss_type=ipo", "--label_smoothing=0.1")
    with pytest.raises(ConfigError, match="use_peft"):
        dpo("--use_peft=true", "--ref_model_name_or_path=some/model")
    with pytest.raises(ConfigError, match="dtype=float16 contradicts bf16"):
        dpo("--dtype=float16", "--bf16=true")


def test_saved_config_reloads_to_the_same_values(tmp_path):
    config = dpo("--beta=0.3", "--loss_type=rev_kl", "--lora_target_modules=[q_proj]", output_dir=str(tmp_path))
    save_config(config, str(tmp_path / "mtpo_config.yaml"))
    again = load_config(DPOConfig, str(tmp_path / "mtpo_config.yaml"))
    own = [f.name for f in dataclasses.fields(DPOConfig) if f.name not in TrainingArguments.__dataclass_fields__]
    for name in own + ["learning_rate", "warmup_steps", "lr_scheduler_type", "seed", "output_dir"]:
        assert getattr(again, name) == getattr(config, name), name


# ----------------------------------------------------------------------------------- fail before loading


def _config(tmp_path, **values) -> DPOConfig:
    base = dict(model_name_or_path=str(TINY), train_data=write_rows(tmp_path / "train.jsonl", [ROW] * 3),
                output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", eval_strategy="no")
    return load_config(DPOConfig, **{**base, **values})


@pytest.mark.parametrize("key, message", [
    ("train_data", "train_data: path not found"),
    ("model_name_or_path", "model_name_or_path: path not found"),
    ("ref_model_name_or_path", "ref_model_name_or_path: path not found"),
    ("eval_data", "eval_data: path not found"),
    ("chat_template", "chat_template: path not found"),
])
def test_missing_files_fail_before_any_model_is_loaded(tmp_path, no_model_loading, key, message):
    name = {"train_data": "x.jsonl", "eval_data": "x.jsonl", "chat_template": "x.jinja"}.get(key, "model")
    missing = str(tmp_path / "missing" / name)
    with pytest.raises(ConfigError, match=message):
        train_dpo(_config(tmp_path, **{key: missing}))


def test_empty_dataset_fails_before_any_model_is_loaded(tmp_path, no_model_loading):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="is empty"):
        train_dpo(_config(tmp_path, train_data=str(empty)))


def test_all_rows_dropped_by_max_length_names_the_reason(tmp_path, no_model_loading):
    with pytest.raises(ConfigError, match=r"every row was dropped.*3 longer than max_length=8"):
        train_dpo(_config(tmp_path, max_length=8))


def test_eval_strategy_without_eval_data_fails_early(tmp_path, no_model_loading):
    with pytest.raises(ConfigError, match="eval_strategy=epoch needs eval_data"):
        train_dpo(_config(tmp_path, eval_strategy="epoch"))


# ----------------------------------------------------------------------------------- the CLI


def _cli_error(capsys, *args: str) -> str:
    rc = cli_main(["dpo", EXAMPLE_YAML, *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("mtpo dpo: error:")]
    assert len(lines) == 1, err
    assert err.rstrip().endswith(lines[0])  # one line, and the last thing printed
    return lines[0]


def test_cli_exits_2_with_one_line(tmp_path, capsys, no_model_loading):
    data = write_rows(tmp_path / "train.jsonl", [ROW] * 3)
    common = [f"--model_name_or_path={TINY}", f"--output_dir={tmp_path / 'out'}", "--eval_data=null",
              "--eval_strategy=no"]
    assert "beta" in _cli_error(capsys, "--beta=abc")
    assert "did you mean 'beta'" in _cli_error(capsys, "--betta=0.1")
    assert "train_data: path not found" in _cli_error(capsys, *common, f"--train_data={tmp_path / 'none.jsonl'}")
    line = _cli_error(capsys, *common, f"--train_data={data}", "--max_length=8")
    assert "every row was dropped" in line and "longer than max_length=8" in line
    bad = write_rows(tmp_path / "bad.jsonl", [ROW, {"chosen": ROW["chosen"]}])
    assert "row 1" in _cli_error(capsys, *common, f"--train_data={bad}")


def test_cli_unresolvable_hub_name_is_one_line(tmp_path, capsys, monkeypatch, no_model_loading):
    # transformers raises OSError for a Hub name it cannot resolve (offline, typo, gated): one line, exit 2
    def unresolvable(name, *args, **kwargs):
        raise OSError(f"{name} is not a local folder and is not a valid model identifier")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", unresolvable)
    data = write_rows(tmp_path / "train.jsonl", [ROW] * 3)
    line = _cli_error(capsys, f"--train_data={data}", f"--output_dir={tmp_path / 'out'}", "--eval_data=null",
                      "--eval_strategy=no", "--model_name_or_path=no-such-org/no-such-model")
    assert "no-such-org/no-such-model is not a local folder" in line


def test_cli_usage():
    assert cli_main(["--help"]) == 0
    assert cli_main(["nonsense"]) == 2


# ----------------------------------------------------------------------------------- shipped recipes


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"m-dpo-gemma-7b.yaml", "m-dpo-mistral-7b.yaml", "m-dpo-lora.yaml", "m-dpo-iterative.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_without_touching_models_or_network(path, no_model_loading, monkeypatch):
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("tokenizer loaded"))
    # bf16 recipes are for GPUs; transformers refuses bf16 on a CPU-only machine unless use_cpu is set
    config = load_config(DPOConfig, str(path), use_cpu=not torch.cuda.is_available())
    assert isinstance(config, DPOConfig) and config.model_name_or_path and config.train_data


@pytest.mark.parametrize("name, lr", [("m-dpo-gemma-7b.yaml", 2e-7), ("m-dpo-mistral-7b.yaml", 4e-7)])
def test_paper_recipes_use_the_paper_settings(name, lr):
    config = load_config(DPOConfig, str(ROOT / "configs" / "dpo" / name), use_cpu=not torch.cuda.is_available())
    assert (config.loss_type, config.beta, config.learning_rate) == ("sigmoid", 0.1, lr)
    assert config.lr_scheduler_type == "cosine" and config.warmup_steps == 0.1
    assert config.bf16 and config.dtype == "bfloat16" and config.max_length == 2048
    assert config.activation_checkpointing
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps * 8 == 32  # 8 GPUs


def test_iterative_recipe_uses_previous_iteration_as_reference():
    config = load_config(DPOConfig, str(ROOT / "configs" / "dpo" / "m-dpo-iterative.yaml"),
                         use_cpu=not torch.cuda.is_available())
    assert config.ref_model_name_or_path == config.model_name_or_path


def test_docs_describe_every_dpo_option():
    text = (ROOT / "docs" / "dpo.md").read_text(encoding="utf-8")
    own = [f.name for f in dataclasses.fields(DPOConfig) if f.name not in TrainingArguments.__dataclass_fields__]
    assert own and set(own) > {f.name for f in dataclasses.fields(MTPOConfig)} - set(TrainingArguments.__dataclass_fields__)
    missing = [name for name in own if f"`{name}`" not in text]
    assert not missing, f"docs/dpo.md does not describe {missing}"
