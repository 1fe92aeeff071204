"""`mtpo <command> ...` — parses, then calls library functions (everything it does is importable)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import textwrap
from typing import Callable

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


def format_options(name: str, config_cls: type, what: str) -> str:
    """`mtpo <name> --help`: every option of the command's config dataclass, with help and default."""
    lines = [f"usage: mtpo {name} [CONFIG.yaml] [--key=value ...]", "", what, "", "options:"]
    return "\n".join(lines + dataclass_options(config_cls))


def dataclass_options(config_cls: type) -> list[str]:
    """The `--help` entries of a config dataclass's fields, in order."""
    lines = []
    for f in dataclasses.fields(config_cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines += option_entry(f.name, f.metadata.get("help", ""),
                              "(required)" if default is dataclasses.MISSING else repr(default))
    return lines


def option_entry(key: str, help_: str, default: str) -> list[str]:
    """One `--help` entry: the option and its default, then its help text wrapped and indented."""
    return [f"  --{key}  (default: {default})"] + [f"      {line}" for line in textwrap.wrap(" ".join(help_.split()), 88)]


def run_config_command(name: str, config_cls: type, run: Callable, argv: list[str],
                       config_required: bool = False, log_level: int = logging.INFO) -> int:
    """`mtpo <name> [CONFIG.yaml] [--key=value ...]` for the config-driven agent commands: `--help`
    lists every option; a config or data error exits 2 with one line naming it; Ctrl-C / SIGTERM in
    a training stage exit 130 / 143 with one line (rerunning the command resumes)."""
    from mtpo.config import ConfigError, load_config
    from mtpo.data import DataError, RecordError
    from mtpo.runs import Interrupted

    what = (run.__doc__ or "").strip().split("\n")[0]
    if any(a in ("-h", "--help") for a in argv):
        print(format_options(name, config_cls, what))
        return 0
    parser = argparse.ArgumentParser(prog=f"mtpo {name}", add_help=False)
    parser.add_argument("config", nargs=None if config_required else "?")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    previous = _on_sigterm(_raise_terminated)  # SIGTERM ends like Ctrl-C: one line (training stages save first)
    try:
        run(load_config(config_cls, args.config, overrides))
    except (ConfigError, DataError, RecordError, OSError) as e:  # OSError: missing files, unknown Hub names
        print(f"mtpo {name}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # a training stage stopped by a signal after saving a checkpoint
        print(f"mtpo {name}: stopped by {e}; rerun the same command to resume", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        how = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(f"mtpo {name}: {how}; rerun the same command to continue where it stopped", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        _on_sigterm(previous)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers send before preemption), raised where Ctrl-C would be."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _on_sigterm(handler):
    """Install `handler` for SIGTERM and return the previous one (None outside the main thread)."""
    import signal

    try:
        return signal.signal(signal.SIGTERM, handler) if handler is not None else None
    except ValueError:  # not the main thread: leave signals alone
        return None


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
    try:
        return int(getattr(importlib.import_module(module_name), function or "cli")(argv[1:]) or 0)
    except BrokenPipeError:  # `mtpo dpo --help | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
