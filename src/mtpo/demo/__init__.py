"""`mtpo demo`: the paper in miniature on a laptop CPU (docs/demo.md).

SFT model → K iterations of online M-DPO (sample with the Python sandbox → grade → pairs → `mtpo dpo`)
→ held-out accuracy after each, plus DPO without masking and M-KTO on the same samples; prints the
table and writes results.md / results.json / plots. Pieces: `task` (the synthetic problems),
`tokenizer` (the local BPE + Gemma template), `make_model` (the shipped SFT model), `pipeline` (the
run), `report` (table, files, plots).
"""

from __future__ import annotations

import os


def cli(argv: list[str]) -> int:
    # Busy-waiting OpenMP threads thrash when the 2 cores are shared with the sandbox processes (and
    # anyone else): measured 5x slower steps. Only effective before torch is first imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mtpo.demo.pipeline import cli as run_cli

    return run_cli(argv)
