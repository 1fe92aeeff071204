"""`python -m mtpo ...` (what `torchrun` and `accelerate launch -m mtpo` run)."""

from mtpo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
