"""`mtpo <command> ...` — parses, then calls library functions (everything it does is importable)."""

from __future__ import annotations

import importlib
import sys

# command → (module exposing `cli(argv) -> int`, or "module:function"; one-line help)
COMMANDS = {
    "dpo": ("mtpo.trainers.command:dpo", "train with multi-turn DPO (M-DPO):  mtpo dpo config.yaml [--key=value ...]"),
    "kto": ("mtpo.trainers.command:kto", "train with multi-turn KTO (M-KTO):  mtpo kto config.yaml [--key=value ...]"),
    "sft": ("mtpo.trainers.command:sft", "masked multi-turn SFT / RAFT:        mtpo sft config.yaml [--key=value ...]"),
    "inspect": ("mtpo.inspect", "show which tokens are trained:       mtpo inspect DATA --tokenizer PATH"),
    "generate": ("mtpo.agent.generate", "sample tool-using trajectories:      mtpo generate config.yaml [--shard I/N]"),
    "eval": ("mtpo.agent.evaluate", "pass@1 / maj@k with the Python tool: mtpo eval config.yaml"),
    "pairs": ("mtpo.agent.pairs", "graded rollouts → DPO/KTO/SFT rows:  mtpo pairs config.yaml"),
    "iterate": ("mtpo.agent.iterate", "online iterative M-DPO/M-KTO loop:   mtpo iterate config.yaml"),
    "demo": ("mtpo.demo", "the paper in miniature on CPU:       mtpo demo [--output_dir DIR] [--seed N]"),
}


def usage() -> str:
    lines = ["usage: mtpo <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `mtpo <command> --help` for the command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("--version", "-V"):
        from mtpo import __version__

        print(f"mtpo {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"mtpo: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[argv[0]][0].partition(":")  # "module" (its `cli`) or "module:function"
    return int(getattr(importlib.import_module(module_name), function or "cli")(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
