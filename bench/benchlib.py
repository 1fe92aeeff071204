"""Shared plumbing of the benchmark scripts: machine facts, memory probes, tiny models, subprocesses, output.

Every measured configuration runs in its OWN subprocess (``run_worker``) so that one run's peak memory
never pollutes another's: on CPU the peak is the process's peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), on CUDA ``torch.cuda.max_memory_allocated``.
A worker prints one JSON object as the last line of its stdout; a worker that crashes, is killed for
memory or runs past its time limit becomes a result with an ``error`` field (recorded, never skipped).
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))


# ------------------------------------------------------------------------------------------ machine


def machine_info(device: str = "cpu") -> dict:
    """CPU model, cores, RAM, library versions (and the GPU when one is used)."""
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _lscpu_field("Model name") or platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return info


def _lscpu_field(name: str) -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(rf"^{re.escape(name)}:\s*(.+)$", out, re.MULTILINE)
    return match.group(1).strip() if match else None


def _meminfo_kib(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------------------ memory


def current_rss_mib() -> float:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryProbe:
    """Baseline and peak memory of one device: RSS on CPU, allocated tensor memory on CUDA."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.baseline_mib = 0.0

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mib = torch.cuda.memory_allocated() / 2**20
        else:
            self.baseline_mib = current_rss_mib()

    def peak_mib(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return peak_rss_mib()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ models


def tiny_llama(vocab: int, hidden: int, layers: int, seed: int = 0, max_positions: int = 8192):
    """A randomly initialised Llama (untied LM head, like Llama-3) built from a config, in float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 32)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=False,
    )
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------------------------ subprocesses


def run_worker(script: Path, worker_args: list[str], timeout: float | None, env: dict | None = None) -> dict:
    """Run ``script --worker ...`` in a fresh interpreter; the last stdout line is its JSON result."""
    cmd = [sys.executable, str(script), "--worker", *worker_args]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s", "wall_s": round(time.perf_counter() - started, 1)}
    wall = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        if proc.returncode in (-9, 137):
            reason = "killed (out of memory?)"
        else:
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
            reason = f"exit {proc.returncode}: {tail[0][:300]}"
        return {"error": reason, "wall_s": wall}
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        return {"error": "worker printed no result", "wall_s": wall}
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    return result


# ------------------------------------------------------------------------------------------ output


def write_outputs(out: Path | None, payload: dict, markdown: str) -> None:
    """``out.json`` (everything) and ``out.md`` (the tables), when ``out`` is given; Markdown to stdout."""
    print(markdown, flush=True)
    if out is None:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown + "\n")


def md_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one char per column (l or r), default right except the first."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, spec: str = ".2f", missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def command_line() -> str:
    return " ".join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
