"""The one `transformers.Trainer` subclass the DPO, KTO and SFT trainers share.

What lives here is glue, not math: metric bookkeeping (global across processes), reference
log-probs (frozen model, adapter-disabled PEFT model, or precomputed), and an evaluation step that
reuses `compute_loss`. The losses themselves are pure functions in `mtpo.losses`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections import defaultdict

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from mtpo.collate import sum_by_owner
from mtpo.logprobs import sequence_logps
from mtpo.trainers import parallel


class MTPOTrainer(Trainer):
    # A logged metric whose global value *is* the evaluation loss, reported as eval_loss instead of
    # Trainer's average of per-batch losses — which, for a per-token mean (SFT), depends on how the
    # examples fall into batches and so on the number of processes.
    eval_loss_metric: str | None = None

    def __init__(self, *args, ref_model=None, data_report: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # Our losses are already means over the batch: let Trainer divide by the number of
        # accumulation steps itself (it would not if it thought the model normalised the loss).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        parallel.check_supported(self.accelerator)
        # Replicated (DDP), a DeepSpeed inference engine (ZeRO-3: partitioned) or FSDP2-sharded.
        self.ref_model = parallel.prepare_reference(ref_model, self.accelerator, self.args.device)
        # True while this process evaluates a batch made only of accelerate's padding duplicates
        # (the last eval batch with several processes): it still runs, for the collectives, but its
        # metrics weigh 0 and batch-level statistics (KTO's z0) must leave its rows out.
        self.padding_batch = False
        self.data_report = data_report or {}
        self._metric_sums: dict[str, dict[str, list[float]]] = {"train": defaultdict(lambda: [0.0, 0.0]),
                                                                 "eval": defaultdict(lambda: [0.0, 0.0])}
        self.add_callback(MetricsFileCallback())

    def _issue_warnings_after_load(self, load_result) -> None:
        """Resuming: tied weights (lm_head = embed_tokens) are saved once, so the other name is
        "missing" but loaded through the tie — not worth transformers' alarming warning."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        missing = set(load_result.missing_keys)
        loaded = {p.data_ptr() for name, p in params.items() if name not in missing}
        really = [k for k in load_result.missing_keys if k not in params or params[k].data_ptr() not in loaded]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=really))

    # ------------------------------------------------------------------ log-probs
    def policy_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        # accelerate's mixed precision autocasts the model's forward only and returns its outputs in
        # float32; the LM head runs after it, so it needs the same autocast (else a bf16 head meets
        # float32 hidden states, or the head runs in float32 unlike the model's own).
        with self.accelerator.autocast():
            logps, counts = sequence_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["trainable"],
                                           chunk_size=self.args.logprob_chunk_size)
        # per-turn trajectories (several sequences each): one value per trajectory = the sum over its sequences
        owner = inputs.get("seq_owner")
        return sum_by_owner(logps, owner), sum_by_owner(counts, owner)

    @torch.no_grad()
    def reference_logps(self, model, inputs) -> torch.Tensor:
        """Reference log-probs of every row: precomputed, a frozen model, or the adapter turned off."""
        if "ref_logps" in inputs:
            return inputs["ref_logps"]
        if self.ref_model is not None:
            logps = self.policy_logps(self.ref_model, inputs)[0]
            parallel.reshard(self.ref_model)  # FSDP2: free the gathered weights until the next use
            return logps
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
        if self.ref_model is None and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            # Before train() the policy is not wrapped yet: on CPU (ZeRO-1/2, FSDP) or partitioned
            # (ZeRO-3). `setup.load_models` loads a separate reference for this case.
            raise RuntimeError("precomputing reference log-probs under DeepSpeed/FSDP needs a reference model "
                               "(ref_model=...), prepared for inference by MTPOTrainer")
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

    def precompute_references(self, layout) -> None:
        """`precompute_reference` for the train and eval sets, then free the reference model."""
        self.precompute_reference(self.train_dataset, layout)
        self.precompute_reference(self.eval_dataset, layout)
        self.ref_model = None  # no reference model in memory while training

    # ------------------------------------------------------------------ metrics
    def store_metrics(self, metrics: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]], mode: str) -> None:
        """Accumulate per-row values; the mean logged later is over every row on every process.

        A value is a tensor of per-row values (logged: their mean) or a pair (numerators,
        denominators) of per-row tensors (logged: Σ numerators / Σ denominators, e.g. a per-token
        mean). Sums and counts are all-reduced, so the logged value is the global one.
        """
        if not metrics:
            return
        names = list(metrics)
        parts = [metrics[n] if isinstance(metrics[n], tuple) else (metrics[n], None) for n in names]
        sums = torch.stack([num.detach().float().sum() for num, _ in parts])
        counts = torch.stack([den.detach().float().sum().to(sums.device) if den is not None
                              else torch.tensor(float(num.numel()), device=sums.device) for num, den in parts])
        weight = 0.0 if self.padding_batch else 1.0
        totals = self.accelerator.reduce(torch.stack([sums, counts]) * weight, reduction="sum")
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
        if mode == "eval" and self.eval_loss_metric and f"eval_{self.eval_loss_metric}" in logs:
            logs["eval_loss"] = logs[f"eval_{self.eval_loss_metric}"]
        if mode == "train" and self.data_report:
            logs["data/rows_skipped"] = self.data_report.get("skipped", 0)
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        # Drop accelerate's padding duplicates (last batch, several processes) so every example counts
        # once; a process with nothing but duplicates still runs (collectives) with weight 0. Its loss
        # is then dropped by Trainer's gather_for_metrics, which cuts the same rows by position.
        n = parallel.batch_examples(inputs)
        keep = parallel.real_rows(self.accelerator, n)
        if 0 < keep < n:
            inputs = parallel.first_examples(inputs, n, keep)
        self.padding_batch = keep == 0
        try:
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, mode="eval")
        finally:
            self.padding_batch = False
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


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM during `train()`: finish the step, save a checkpoint, stop (see mtpo.runs).

    The handler only sets a flag; the flag is read at the end of each step and, with several
    processes, max-reduced, so that every process saves and stops at the same step. A second signal
    while stopping gets the default behaviour (SIGINT: KeyboardInterrupt).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.checkpoint: str | None = None

    @contextlib.contextmanager
    def catching(self):
        def handler(signum, frame):
            self.signum = signum
            for s in self.SIGNALS:  # a second Ctrl-C stops at once
                signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)

        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {s: signal.signal(s, handler) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _agreed_signal(self, args) -> int:
        import torch.distributed as dist

        signum = self.signum or 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([signum], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._agreed_signal(args)
        if signum:
            self.signum = signum
            control.should_save = control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.signum:
            self.checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout makes policy and reference disagree on identical weights; preference losses want it off.

    Two kinds exist in transformers models: `nn.Dropout` modules (residual, embedding, LoRA dropout)
    and a plain float the attention function reads in training mode (`self.attention_dropout` of
    Llama, Qwen, Mistral, Gemma, Phi-3 ...), which no `nn.Dropout` check sees."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)


@contextlib.contextmanager
def eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
