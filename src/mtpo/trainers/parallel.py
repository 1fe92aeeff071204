"""Multi-process details the trainers share: the frozen reference model under DeepSpeed / FSDP2, and
the duplicated rows accelerate appends to the last evaluation batch.

Reference model (see docs/distributed.md)
-----------------------------------------
* DDP / one process: the reference is replicated on every device (no wrapper: it has no gradients).
  It runs inside `accelerator.autocast()`, like the policy, so mixed precision matches.
* DeepSpeed: the reference gets its own *inference* engine (`deepspeed.initialize` without an
  optimizer). Under ZeRO-3 its weights stay partitioned and are gathered layer by layer by
  DeepSpeed's module hooks during each forward — never gathered whole. ZeRO-1/2 only partition
  optimizer state, which a frozen model has none of, so the reference is a stage-0 replica.
* FSDP2: the reference is sharded with accelerate's own `fsdp2_prepare_model` (same wrap policy,
  mixed-precision policy and RAM-efficient loading as the policy) and resharded after each use.
* FSDP1 is refused: calling the LM head outside the root forward (`mtpo.logprobs`) is only
  verified for FSDP2.

Padding rows of the last evaluation batch
-----------------------------------------
With N processes, accelerate gives every process a full last batch by repeating examples from the
start of the dataset (`even_batches`), and `gather_for_metrics` drops them again by position: of
the last global batch, laid out process by process, only the first `remainder` rows are real.
`real_rows` applies the same rule, so evaluation metrics are over each example exactly once.
"""

from __future__ import annotations

import copy
import os

import torch


def uses_deepspeed_or_fsdp(args) -> bool:
    """True when the run will be DeepSpeed or FSDP, known before the Trainer (and its Accelerator) exists."""
    env = os.environ
    return bool(getattr(args, "deepspeed", None) or getattr(args, "fsdp", None)
                or env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
                or env.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


def check_supported(accelerator) -> None:
    """Refuse combinations whose correctness mtpo cannot vouch for, before anything trains."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            "mtpo supports FSDP2 only (fsdp_version: 2, see configs/accelerate/fsdp2.yaml): its log-probs call the "
            "LM head outside the model's forward, which FSDP2 handles (the head is its own FSDP unit) and FSDP1 "
            "is not verified to.")


def prepare_reference(model: torch.nn.Module | None, accelerator, device) -> torch.nn.Module | None:
    """Freeze the reference model and place / shard it for inference under the active backend."""
    if model is None:
        return None
    model.eval().requires_grad_(False)
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        return _deepspeed_inference(model, accelerator)
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        check_supported(accelerator)
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model).eval()
    return model.to(device)


def reshard(model: torch.nn.Module) -> None:
    """FSDP2: free the unsharded weights a no-grad forward leaves behind (units with
    reshard_after_forward=False, e.g. accelerate's [norm, LM head] unit). No-op for other models."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _deepspeed_inference(model: torch.nn.Module, accelerator):
    """`deepspeed.initialize` for a frozen model: the training config without optimizer, scheduler
    or optimizer offload; stage 3 stays stage 3 (partitioned weights), stages 1–2 become stage 0."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) == 3:
        hidden = _hidden_size(model)
        if hidden:  # what transformers fills in for "auto" at deepspeed_init (which the reference never sees)
            zero.update(reduce_bucket_size=hidden * hidden, stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                        stage3_param_persistence_threshold=10 * hidden)
    else:
        zero["stage"] = 0
    _drop_auto(config)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _drop_auto(config: dict) -> None:
    """Remove values still "auto" (left for transformers' deepspeed_init to fill): DeepSpeed's defaults apply."""
    for key in [k for k, v in config.items() if v == "auto"]:
        del config[key]
    for value in config.values():
        if isinstance(value, dict):
            _drop_auto(value)


def _hidden_size(model) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = getattr(text, "hidden_sizes", None)
    return max(sizes) if sizes else getattr(text, "hidden_size", None)


# ------------------------------------------------------------------------------ evaluation padding


def real_rows(accelerator, n: int) -> int:
    """How many of this process's `n` examples in the current batch are real (not even_batches padding)."""
    state = accelerator.gradient_state
    if accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
        return n
    start = accelerator.process_index * n  # the last global batch is laid out process by process
    return max(0, min(n, state.remainder - start))


def batch_examples(inputs: dict) -> int:
    """Examples in a collated batch: `idx` is one per example; else the trajectories (SFT): the rows of
    input_ids, or the owners of its sequences when trajectories are per turn."""
    if "idx" in inputs:
        return int(inputs["idx"].shape[0])
    owner = inputs.get("seq_owner")
    return int(owner.max()) + 1 if owner is not None else int(inputs["input_ids"].shape[0])


def first_examples(inputs: dict, n: int, keep: int) -> dict:
    """The first `keep` of `n` examples of a batch. Tensors hold k stacked blocks of n rows (DPO's
    [chosen; rejected], KTO's [completions; KL pairs]); each block keeps its first `keep` rows. With
    `seq_owner` (per-turn trajectories) the sequence tensors keep the sequences of the kept rows."""
    out = {}
    owner = inputs.get("seq_owner")  # per-turn trajectories: sequence rows follow their owner's fate
    if owner is not None:
        keep_seq = (owner % n) < keep
        out["seq_owner"] = ((owner // n) * keep + owner % n)[keep_seq]
        out.update({k: inputs[k][keep_seq] for k in ("input_ids", "attention_mask", "trainable") if k in inputs})
    for key, value in inputs.items():
        if key in out:
            continue
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] % n == 0:
            blocks = value.shape[0] // n
            value = value.reshape(blocks, n, *value.shape[1:])[:, :keep].reshape(blocks * keep, *value.shape[1:])
        out[key] = value
    return out
