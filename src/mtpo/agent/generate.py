"""`mtpo generate config.yaml`: sample tool-using trajectories for a prompt set, graded, as JSONL.

    summary = run_generate(load_config(GenerateConfig, "examples/generate.yaml"))

Resumable per prompt: all samples of a prompt are written together in one `write` once the last of
them finishes, and a rerun skips every prompt whose samples are all in the file. A torn last line or
a prompt with missing samples (a kill mid-write) is removed on the rerun (counted and reported) and
generated again. `--shard I/N` keeps the prompts whose id hashes to I mod N, so N machines together
produce the same records as one unsharded run (sampling is seeded per trajectory, see rollout.py).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from mtpo.agent.backends import HFBackend, VLLMBackend
from mtpo.agent.prompts import ANSWER_FORMATS, Prompt, load_prompts
from mtpo.agent.rollout import CONSISTENCY_MODES, TOOL_FORMATS, Rollout, RolloutConfig
from mtpo.config import ConfigError
from mtpo.render import ChatRenderer, RenderOptions, make_renderer

logger = logging.getLogger("mtpo")
BACKENDS = ("hf", "vllm")


@dataclass
class RolloutSettings:
    """Fields shared by `mtpo generate` and `mtpo eval`."""

    # --- policy
    model_name_or_path: str | None = field(default=None, metadata={"help": "Policy: Hub name or local folder."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    chat_template: str | None = field(default=None, metadata={"help": "A .jinja file overriding the tokenizer's template."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub."})
    backend: str = field(default="hf", metadata={"help": "hf (transformers generate) or vllm."})
    device: str = field(default="auto", metadata={"help": "hf backend: cpu, cuda, ... (auto: cuda if available)."})
    batch_size: int = field(default=64, metadata={"help": "hf backend: rows per generate call."})
    cpu_threads: int | None = field(default=None, metadata={"help": "hf backend: torch CPU threads while generating "
                                                                    "(1 is fastest for tiny models on a busy CPU)."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm backend."})
    data_parallel_size: int = field(default=1, metadata={"help": "vllm backend."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vllm backend."})
    # --- prompts
    prompts: str | None = field(default=None, metadata={"help": "JSONL/Parquet file or dataset folder of problems."})
    split: str = field(default="train", metadata={"help": "Split of a dataset folder."})
    question_field: str | None = field(default=None, metadata={"help": "Default: question (GSM8K) / problem (MATH)."})
    answer_field: str | None = field(default=None, metadata={"help": "Default: answer (GSM8K) / solution (MATH)."})
    answer_format: str = field(default="auto", metadata={"help": "auto, gsm8k (#### n), math (\\boxed{}), plain."})
    id_field: str | None = field(default=None, metadata={"help": "Field holding a prompt id (default: <name>/<row>)."})
    prompt_name: str | None = field(default=None, metadata={"help": "<name> of default ids (default: file name)."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N prompts."})
    # --- the tool loop
    max_tool_calls: int = field(default=6, metadata={"help": "Cells run per trajectory at most."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Tokens per turn."})
    max_length: int = field(default=4096, metadata={"help": "Tokens per trajectory (context + turn)."})
    stop: list[str] = field(default_factory=lambda: ["```output"], metadata={"help": "Stop strings (besides end of turn)."})
    tool_format: str = field(default="user", metadata={"help": "user (\"```output\" turns) or tool (tool messages)."})
    answer_fallback: bool = field(default=False, metadata={"help": "Accept 'The answer is X' without \\boxed{}."})
    consistency: str = field(default="warn", metadata={"help": "Generated vs trained tokens: warn, strict, off."})
    prompts_per_round: int = field(default=32, metadata={"help": "Prompts rolled out together (× samples)."})
    # --- sandbox
    sandbox: dict = field(default_factory=dict, metadata={"help": "PythonSandbox options (timeout_s, memory_mb, ...)."})
    sandbox_workers: int = field(default=4, metadata={"help": "Sessions running cells in parallel."})

    def __post_init__(self):
        for key, value, allowed in (("backend", self.backend, BACKENDS), ("tool_format", self.tool_format, TOOL_FORMATS),
                                    ("consistency", self.consistency, CONSISTENCY_MODES),
                                    ("answer_format", self.answer_format, ANSWER_FORMATS),
                                    ("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))):
            if value not in allowed:
                raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
        for key in ("batch_size", "prompts_per_round", "sandbox_workers", "max_new_tokens", "max_length", "cpu_threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        self.sandbox = check_sandbox_options(self.sandbox)

    def check_paths(self) -> None:
        if not self.prompts:
            raise ConfigError("prompts is required")
        if not os.path.exists(os.path.expanduser(self.prompts)):
            raise ConfigError(f"prompts: path not found: {self.prompts}")
        if self.chat_template and not os.path.isfile(self.chat_template):
            raise ConfigError(f"chat_template: path not found: {self.chat_template}")

    def load_prompts(self) -> list[Prompt]:
        return load_prompts(self.prompts, name=self.prompt_name, question_field=self.question_field,
                            answer_field=self.answer_field, answer_format=self.answer_format, id_field=self.id_field,
                            system_prompt=self.system_prompt, split=self.split, limit=self.limit)

    def rollout_config(self, temperature: float, top_p: float, seed: int) -> RolloutConfig:
        return RolloutConfig(self.max_tool_calls, self.max_new_tokens, self.max_length, tuple(self.stop),
                             self.tool_format, temperature, top_p, seed, self.answer_fallback, self.consistency)


@dataclass
class GenerateConfig(RolloutSettings):
    """`mtpo generate`: N sampled trajectories per prompt."""

    samples_per_prompt: int = field(default=4, metadata={"help": "Trajectories per prompt."})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    seed: int = field(default=0, metadata={"help": "Same seed, same trajectories (hf backend on CPU)."})
    output_file: str = field(default="outputs/rollouts.jsonl", metadata={"help": "JSONL of trajectory records."})
    shard: str | None = field(default=None, metadata={"help": "I/N: only the prompts of shard I (0-based) of N."})

    def __post_init__(self):
        super().__post_init__()
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt must be positive, got {self.samples_per_prompt}")
        parse_shard(self.shard)


def check_sandbox_options(options: dict) -> dict:
    """`sandbox:` names and value types checked against `PythonSandbox`'s keywords when the config is
    read — a typo would otherwise surface only after the model loaded (or, in `mtpo iterate`, after
    earlier stages ran)."""
    import inspect
    import typing

    from mtpo.agent.sandbox import PythonSandbox
    from mtpo.config import _coerce  # the config loader's own type check, so messages read the same

    params = {n: p for n, p in inspect.signature(PythonSandbox.__init__).parameters.items() if n != "self"}
    hints = typing.get_type_hints(PythonSandbox.__init__)
    out = {}
    for key, value in options.items():
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1)
            raise ConfigError(f"sandbox: unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; known: {', '.join(params)}")
        out[key] = _coerce(f"sandbox.{key}", value, hints.get(key, typing.Any))
    return out


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise ConfigError(f"shard must look like I/N (e.g. 0/4), got {shard!r}") from None
    if not 0 <= i < n:
        raise ConfigError(f"shard {shard}: need 0 <= I < N")
    return i, n


def in_shard(prompt_id: str, shard: tuple[int, int] | None) -> bool:
    """Deterministic by prompt id (not by position), so every machine agrees whatever the order."""
    if shard is None:
        return True
    return int(hashlib.sha256(prompt_id.encode()).hexdigest(), 16) % shard[1] == shard[0]


# ------------------------------------------------------------------------------------------ building


def build_renderer(settings: RolloutSettings, tokenizer) -> ChatRenderer:
    template = None
    if settings.chat_template:
        with open(settings.chat_template, encoding="utf-8") as f:
            template = f.read()
    return make_renderer(tokenizer, RenderOptions(chat_template=template))  # mistral-common for tekken dirs


def build_backend(settings: RolloutSettings, renderer: ChatRenderer, model=None):
    """The configured backend; `model` (already loaded, with `renderer.tokenizer`) skips loading."""
    ends = renderer.end_of_turn_texts
    if settings.backend == "vllm":
        return VLLMBackend(settings.model_name_or_path, renderer.tokenizer, ends, settings.tensor_parallel_size,
                           settings.data_parallel_size, settings.gpu_memory_utilization, settings.dtype,
                           trust_remote_code=settings.trust_remote_code)
    if model is not None:
        return HFBackend(model, renderer.tokenizer, ends, settings.batch_size)
    return HFBackend.from_pretrained(settings.model_name_or_path, renderer.tokenizer, settings.dtype, settings.device,
                                     settings.trust_remote_code, end_texts=ends, batch_size=settings.batch_size)


def build_executor(settings: RolloutSettings):
    """A `SandboxPool`, checked before any generation: no namespaces → a clear error, not a late one."""
    from mtpo.agent.sandbox import PythonSandbox, SandboxPool, SandboxUnavailable

    try:
        sandbox = PythonSandbox(**settings.sandbox)
        sandbox.check()
    except (TypeError, ValueError, SandboxUnavailable) as e:  # bad options, or no namespaces here
        raise ConfigError(f"sandbox: {e}") from None
    return SandboxPool(sandbox, max_workers=settings.sandbox_workers)


def load_tokenizer(settings: RolloutSettings, tokenizer=None):
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    if not settings.model_name_or_path:
        raise ConfigError("model_name_or_path is required")
    return AutoTokenizer.from_pretrained(settings.tokenizer_name_or_path or settings.model_name_or_path,
                                         trust_remote_code=settings.trust_remote_code)


# ------------------------------------------------------------------------------------------ output file


def read_complete(path: str, samples_per_prompt: int) -> dict[str, list[dict]]:
    """Records of the prompts that have all their samples. Anything else in the file (a torn line, a
    prompt with missing samples) is dropped by rewriting the file atomically, and reported."""
    if not os.path.exists(path):
        return {}
    by_prompt: dict[str, dict[int, dict]] = {}
    torn = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                by_prompt.setdefault(rec["prompt_id"], {})[int(rec["sample"])] = rec
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                torn += 1
    complete = {pid: [recs[s] for s in range(samples_per_prompt)] for pid, recs in by_prompt.items()
                if all(s in recs for s in range(samples_per_prompt))}
    partial = len(by_prompt) - len(complete)
    if torn or partial:
        logger.warning("%s: dropping %d unreadable line(s) and %d prompt(s) with missing samples; they are "
                       "generated again", path, torn, partial)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for recs in complete.values() for r in recs)
        os.replace(tmp, path)
    return complete


def append_prompt(path: str, records: list[dict]) -> None:
    """All samples of one prompt in one write, flushed to disk."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ running


def run_generate(config: GenerateConfig, *, model=None, tokenizer=None, backend=None, executor=None,
                 grader=None) -> dict:
    """Roll out `config.samples_per_prompt` trajectories for every prompt of this shard not yet in
    `config.output_file`; returns (and logs) the summary over the whole file. `model`/`tokenizer`
    (already loaded), `backend` and `executor` can be passed in instead of being built."""
    config.check_paths()
    prompts = [p for p in config.load_prompts() if in_shard(p.prompt_id, parse_shard(config.shard))]
    os.makedirs(os.path.dirname(os.path.abspath(config.output_file)), exist_ok=True)
    done = read_complete(config.output_file, config.samples_per_prompt)
    todo = [p for p in prompts if p.prompt_id not in done]
    if done:
        logger.info("%s: %d prompt(s) already complete, %d to go", config.output_file,
                    sum(p.prompt_id in done for p in prompts), len(todo))
    stats = Counter()
    if todo:
        own_executor = executor is None
        executor = executor or build_executor(config)  # before the model loads: a sandbox error costs no load
        try:
            warm_up_grader(grader)
            renderer = build_renderer(config, load_tokenizer(config, tokenizer))
            backend = backend or build_backend(config, renderer, model)
            threads = _set_threads(config.cpu_threads)
            try:
                stats = _roll(config, todo, Rollout(backend, renderer, executor, config.rollout_config(
                    config.temperature, config.top_p, config.seed), grader))
            finally:
                _set_threads(threads)
        finally:
            if own_executor:
                executor.shutdown()
    ids = {p.prompt_id for p in prompts}
    records = [r for pid, recs in read_complete(config.output_file, config.samples_per_prompt).items()
               if pid in ids for r in recs]
    summary = summarize(records, stats, len(todo))
    logger.info("generate summary (%s):\n%s", config.output_file, format_summary(summary))
    return summary


def warm_up_grader(grader=None) -> None:
    """Start the grader's math-verify workers in the background (`grade.warm_up`), so that their start-up
    overlaps the model load instead of delaying the first graded answer. A custom grader without
    `warm_up` (tests' fakes) is left alone."""
    if grader is None:
        from mtpo.agent import grade as grader
    warm = getattr(grader, "warm_up", None)
    if warm is not None:
        threading.Thread(target=warm, name="mtpo-grader-warm-up", daemon=True).start()


def _set_threads(n: int | None) -> int | None:
    """Set torch's CPU thread count; returns the previous one (None: nothing changed)."""
    if n is None:
        return None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def _roll(config, todo: list[Prompt], rollout: Rollout) -> Counter:
    bar = tqdm(total=len(todo), desc="prompts", unit="prompt", dynamic_ncols=True)

    def written(prompt, records):
        append_prompt(config.output_file, records)
        bar.update(1)

    try:
        for start in range(0, len(todo), config.prompts_per_round):
            rollout.run(todo[start:start + config.prompts_per_round], config.samples_per_prompt, written)
    finally:
        bar.close()
    return rollout.stats


def summarize(records: list[dict], stats: Counter | dict, prompts_run: int = 0) -> dict:
    """Accuracy, finish reasons, tool errors/timeouts and (for what ran now) tokens/s."""
    n = len(records)
    seconds = stats.get("generate_seconds", 0.0)
    return {
        "trajectories": n,
        "prompts": len({r["prompt_id"] for r in records}),
        "prompts_generated_now": prompts_run,
        "accuracy": sum(r["correct"] for r in records) / n if n else 0.0,
        "finish_reasons": dict(Counter(r["finish_reason"] for r in records).most_common()),
        "tool_calls": sum(r["num_tool_calls"] for r in records),
        "tool_errors": sum(r["num_tool_errors"] for r in records),
        "tool_timeouts": sum(r.get("num_tool_timeouts", 0) for r in records),
        "executor_failures": int(stats.get("executor_failures", 0)),
        "consistency": dict(Counter(r.get("consistency", "unchecked") for r in records).most_common()),
        "generated_tokens_now": int(stats.get("generated_tokens", 0)),
        "generate_seconds_now": round(seconds, 3),
        "tool_seconds_now": round(stats.get("tool_seconds", 0.0), 3),
        "tokens_per_second": round(stats.get("generated_tokens", 0) / seconds, 1) if seconds else 0.0,
    }


def format_summary(summary: dict) -> str:
    width = max(len(k) for k in summary)
    lines = []
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4f}" if key == "accuracy" else f"{value}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        lines.append(f"  {key:<{width}}  {value}")
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    from mtpo.cli import run_config_command

    def generate(config: GenerateConfig) -> None:
        """Sample tool-using trajectories (JSONL records); the summary is printed as JSON on stdout."""
        print(json.dumps(run_generate(config), indent=1))

    return run_config_command("generate", GenerateConfig, generate, argv)
