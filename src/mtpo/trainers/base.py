"""The one `transformers.Trainer` subclass the DPO, KTO and SFT trainers share.

What lives here is glue, not math: metric bookkeeping (global across processes), reference
log-probs (frozen model, adapter-disabled PEFT model, or precomputed), and an evaluation step that
reuses `compute_loss`. The losses themselves are pure functions in `mtpo.losses`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from mtpo.logprobs import sequence_logps


class MTPOTrainer(Trainer):
    def __init__(self, *args, ref_model=None, data_report: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # Our losses are already means over the batch: let Trainer divide by the number of
        # accumulation steps itself (it would not if it thought the model normalised the loss).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
                self.ref_model = ref_model.to(self.args.device)
        self.data_report = data_report or {}
        self._metric_sums: dict[str, dict[str, list[float]]] = {"train": defaultdict(lambda: [0.0, 0.0]),
                                                                 "eval": defaultdict(lambda: [0.0, 0.0])}
        self.add_callback(MetricsFileCallback())

    # ------------------------------------------------------------------ log-probs
    def policy_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["trainable"],
                              chunk_size=self.args.logprob_chunk_size)

    @torch.no_grad()
    def reference_logps(self, model, inputs) -> torch.Tensor:
        """Reference log-probs of every row: precomputed, a frozen model, or the adapter turned off."""
        if "ref_logps" in inputs:
            return inputs["ref_logps"]
        if self.ref_model is not None:
            return self.policy_logps(self.ref_model, inputs)[0]
        unwrapped = self.accelerator.unwrap_model(model)
        if hasattr(unwrapped, "disable_adapter"):
            with unwrapped.disable_adapter():
                return self.policy_logps(model, inputs)[0]
        raise RuntimeError("no reference: give ref_model, use PEFT, or precompute reference log-probs")

    @torch.no_grad()
    def precompute_reference(self, dataset, layout) -> None:
        """Compute reference log-probs once for every example of `dataset`. Each process computes its
        shard; results are gathered and written back by position, so all processes hold them all.
        `layout` says how a batch's log-probs map to examples (`width`, `per_example`, `store`)."""
        if dataset is None or len(dataset) == 0:
            return
        loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                            collate_fn=self.data_collator)
        loader = self.accelerator.prepare(loader)
        results = torch.full((len(dataset), layout.width), float("nan"))
        with eval_mode(self.model):
            for batch in tqdm(loader, desc="reference log-probs", disable=not self.is_world_process_zero()):
                if self.ref_model is None and not hasattr(self.accelerator.unwrap_model(self.model), "disable_adapter"):
                    logps = self.policy_logps(self.model, batch)[0]  # the initial policy is the reference
                else:
                    logps = self.reference_logps(self.model, batch)
                idx, values = self.accelerator.gather_for_metrics((batch["idx"], layout.per_example(logps.float())))
                results[idx.cpu()] = values.cpu()
        if torch.isnan(results).any():
            raise RuntimeError("reference log-probs missing for some examples (distributed gather misaligned)")
        for example in dataset.items:
            layout.store(example, results[example.position])

    # ------------------------------------------------------------------ metrics
    def store_metrics(self, metrics: dict[str, torch.Tensor], mode: str) -> None:
        """Accumulate per-row values; the mean logged later is over every row on every process."""
        if not metrics:
            return
        names = list(metrics)
        sums = torch.stack([metrics[n].detach().float().sum() for n in names])
        counts = torch.tensor([float(metrics[n].numel()) for n in names], device=sums.device)
        totals = self.accelerator.reduce(torch.stack([sums, counts.to(sums.device)]), reduction="sum")
        for name, (s, c) in zip(names, totals.T.tolist()):
            acc = self._metric_sums[mode][name]
            acc[0] += s
            acc[1] += c

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, (s, c) in self._metric_sums[mode].items():
            if c:
                logs[prefix + name] = s / c
        self._metric_sums[mode].clear()
        if mode == "train" and self.data_report:
            logs["data/rows_skipped"] = self.data_report.get("skipped", 0)
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, mode="eval")
        return loss.detach(), None, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, mode=None):
        mode = mode or ("train" if model.training else "eval")
        loss, metrics = self.loss_and_metrics(model, inputs)
        self.store_metrics(metrics, mode)
        return (loss, metrics) if return_outputs else loss

    def loss_and_metrics(self, model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class MetricsFileCallback(TrainerCallback):
    """Appends every log record to `<output_dir>/metrics.jsonl` (main process only)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout makes policy and reference disagree on identical weights; preference losses want it off."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@contextlib.contextmanager
def eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
