"""The demo's results: rows per method and iteration, the printed table, results.{json,md}, plots.

A row (results.json `rows`):
  method             sft | dpo_no_mask | m_dpo | m_kto (| raft with --raft)
  iteration          0 for the SFT model, k for the model trained in iteration k
  heldout_accuracy   greedy pass@1 on the held-out problems (one sample each, Python tool, graded)
  sampling_accuracy  share of correct trajectories among the samples this row's model was trained on
                     (sft: the SFT model's own samples, i.e. iteration 1's)
  pairs              preference pairs trained on (m_kto: labelled trajectories; raft: correct ones)
  train_loss         the last logged training loss
  reward_accuracy    the last logged share of pairs whose chosen reward beats the rejected (DPO only)
  heldout_by_kind    held-out accuracy per problem kind
Timings live under `seconds` only, so two runs with one seed give equal rows.
"""

from __future__ import annotations

import json
import os

from mtpo.agent import pairs as P

METHODS = {"sft": "SFT", "dpo_no_mask": "DPO without masking", "m_dpo": "M-DPO", "m_kto": "M-KTO",
           "raft": "RAFT (SFT on correct samples)"}


def _accuracy(evaluated: dict | None) -> float | None:
    """pass@1 from what `mtpo eval` reported (None when the stage did not run)."""
    if not evaluated:
        return None
    for key in ("pass@1", "accuracy"):
        if key in evaluated:
            return round(float(evaluated[key]), 4)
    raise KeyError(f"no pass@1 in the evaluation results {sorted(evaluated)}")


def _round(value):
    return None if value is None else round(float(value), 4)


def by_kind(eval_dir: str) -> dict[str, float]:
    """Held-out pass@1 per problem kind (`mtpo eval` groups by the prompts' `type`)."""
    path = os.path.join(eval_dir, "results.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        groups = json.load(f).get("by_subject", {})
    return {kind: round(g["pass@1"], 4) for kind, g in groups.items()}


def collect(config, lines: dict[str, list[dict]]) -> dict:
    """Rows from each method's `mtpo iterate` lines (method → iterations.jsonl lines)."""
    rows = []
    for method, its in lines.items():
        for line in its:
            k = line["iteration"]
            eval_dir = os.path.join(config.output_dir, method, f"iter_{k}", "eval")
            if k == 0:  # the starting (SFT) model; its samples are iteration 1's
                first = next(x for x in its if x["iteration"] == 1)
                row = {"method": "sft", "iteration": 0, "heldout_accuracy": _accuracy(line.get("eval")),
                       "sampling_accuracy": _round(first["sampling_accuracy"]), "pairs": None, "train_loss": None,
                       "reward_accuracy": None, "model": config.model}
            else:
                row = {"method": method, "iteration": k, "heldout_accuracy": _accuracy(line.get("eval")),
                       "sampling_accuracy": _round(line["sampling_accuracy"]),
                       "pairs": line["pairs"] if method in ("m_dpo", "dpo_no_mask") else line.get("train_rows"),
                       "train_loss": _round(line.get("train_loss")),
                       "reward_accuracy": _round(line.get("reward_accuracy")), "model": line["model"]}
            row["heldout_by_kind"] = by_kind(eval_dir)
            rows.append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (order[r["method"]], r["iteration"]))
    return {"rows": rows}


def format_table(rows: list[dict], markdown: bool = False) -> str:
    head = ["method", "iteration", "held-out accuracy", "sampling accuracy", "pairs", "train loss", "reward acc."]

    def cell(v, pct=False):
        if v is None:
            return "–"
        return f"{100 * v:.1f} %" if pct else (f"{v:.4f}" if isinstance(v, float) else str(v))

    body = [[METHODS[r["method"]], str(r["iteration"]), cell(r["heldout_accuracy"], True),
             cell(r["sampling_accuracy"], True), cell(r["pairs"]), cell(r["train_loss"]),
             cell(r["reward_accuracy"], True)] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    def fmt(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head), "-" * len(fmt(head))] + [fmt(b) for b in body])


def format_kinds(rows: list[dict]) -> str:
    """Markdown: held-out accuracy per problem kind, one line per row."""
    kinds = sorted({k for r in rows for k in r.get("heldout_by_kind", {})})
    lines = ["| method | iteration | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for r in rows:
        got = r.get("heldout_by_kind", {})
        lines.append(f"| {METHODS[r['method']]} | {r['iteration']} | "
                     + " | ".join(f"{100 * got[k]:.0f} %" if k in got else "–" for k in kinds) + " |")
    return "\n".join(lines)


def write_all(output_dir: str, results: dict, options: dict) -> None:
    P.atomic_write_text(os.path.join(output_dir, "results.json"),
                        json.dumps({**results, "options": options}, indent=2) + "\n")
    md = ["# mtpo demo results", "", format_table(results["rows"], markdown=True), "",
          "Held-out accuracy: greedy, one sample per held-out problem, with the Python tool, graded by "
          "`mtpo.agent.grade`. Sampling accuracy: share correct among the samples the model was trained on "
          "(SFT: its own samples). The three loops start from the same SFT model and the same iteration-1 "
          "samples, and differ only in the loss (KTO) or the mask (tool outputs trained).", "",
          "Held-out accuracy per problem kind:", "", format_kinds(results["rows"]), "",
          f"Run time: {results['seconds']['total']:.0f} s. Options: `{json.dumps(options)}`", "",
          "![held-out accuracy](accuracy.png)", "", "![training curves](training.png)", ""]
    P.atomic_write_text(os.path.join(output_dir, "results.md"), "\n".join(md))
    plot_accuracy(results["rows"], os.path.join(output_dir, "accuracy.png"))
    plot_training(results["rows"], os.path.join(output_dir, "training.png"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(rows: list[dict], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    sft = next(r for r in rows if r["method"] == "sft")
    for method, marker in (("m_dpo", "o-"), ("dpo_no_mask", "s--"), ("m_kto", "^--"), ("raft", "x:")):
        pts = [sft] + [r for r in rows if r["method"] == method]
        if len(pts) > 1:
            ax.plot([r["iteration"] for r in pts], [100 * (r["heldout_accuracy"] or 0) for r in pts], marker,
                    label=METHODS[method])
    ax.axhline(100 * (sft["heldout_accuracy"] or 0), color="grey", lw=0.8, ls=":", label="SFT")
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_xticks(sorted({r["iteration"] for r in rows}))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def training_curve(model_dir: str) -> list[dict]:
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if "loss" in r]


def plot_training(rows: list[dict], path: str) -> None:
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        if r["method"] == "sft":
            continue
        curve = training_curve(r["model"])
        label = f"{METHODS[r['method']]} it{r['iteration']}"
        if curve:
            loss_ax.plot([c["step"] for c in curve], [float(c["loss"]) for c in curve], label=label)
            acc = [(c["step"], float(c["rewards/accuracies"])) for c in curve if "rewards/accuracies" in c]
            if acc:
                acc_ax.plot(*zip(*acc), label=label)
    loss_ax.set(xlabel="step", ylabel="training loss", title="loss")
    acc_ax.set(xlabel="step", ylabel="reward accuracy", title="DPO reward accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
