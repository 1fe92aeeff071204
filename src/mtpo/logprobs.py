"""Masked per-sequence log-probabilities: the one quantity every mtpo loss is built from.

    logps[b]  = Σ_{t : trainable[b, t]} log π(input_ids[b, t] | input_ids[b, <t])
    counts[b] = |{t : trainable[b, t]}|

How it avoids the B×T×V tensor
------------------------------
A naive implementation asks the model for full logits (B, T, V), upcasts them to float32 and takes a
log-softmax: at V = 256k, T = 4096, B = 2 that is 8 GiB per copy, and autograd keeps several copies.
Here the model is run with ``logits_to_keep=1`` (logits for the last position only, (B, 1, V)) and we
read the final, post-norm hidden states (B, T, H) instead. Only the N rows whose *next* token is
trainable are gathered, (N, H), and pushed through the LM head a chunk of rows at a time. By
default (``chunk_size=None``) a chunk is sized by its float32 logits, rows × V, not by a row count:
at most 2^25 logits (128 MiB) on CPU, 2^27 (512 MiB) on an accelerator — see ``chunk_rows`` for why.
A chunk's backward holds 2–3 such buffers, so a fixed row count would make memory grow with V. Each
chunk runs under ``torch.utils.checkpoint`` so autograd stores the chunk's (chunk, H) input, not its
(chunk, V) logits; backward recomputes them. Peak extra memory is O(chunk rows × V), whatever T is.

Per chunk the logits are upcast to float32 and given the same post-processing the model's own
forward applies: ``logit_scale`` (Cohere, multiply), ``logits_scaling`` (Granite, divide) and
``final_logit_softcapping`` (Gemma 2/3, ``cap * tanh(logits / cap)``). Because an unknown
architecture could post-process logits differently, the first call on each LM head compares our
recomputation with the model's own last-position logits and raises if they disagree.

Wrapped models and unused parameters
------------------------------------
``model(...)`` is called as given, so DDP / DeepSpeed / PEFT wrappers run their forward hooks. The
LM head is found on the unwrapped model and called as a *module* (ZeRO-3 gathers its weight through
module hooks; under FSDP, shard the LM head as its own unit so calling it unshards it). Every
parameter gets a gradient even when a micro-batch has no trainable token: the selection is then
empty, and autograd still sends (zero) gradients back through the empty chunk, the LM head and the
indexing into ``hidden``, so DDP without ``find_unused_parameters`` does not wait for a missing
gradient (tested with a real DDP wrapper). No ``0 * logits.sum()`` term is needed, and none is added.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["sequence_logps", "chunk_rows"]

# Logits (rows × V) of one chunk's float32 buffer. The default budget depends on the device (see
# `chunk_rows`); an explicit chunk_size is still capped at _MAX_CHUNK_ELEMENTS.
_MAX_CHUNK_ELEMENTS = 2**27  # 512 MiB
AUTO_CHUNK_ELEMENTS = {"cpu": 2**25, "accelerator": 2**27}  # 128 MiB on CPU, 512 MiB on GPU
# LM heads whose post-processing (norm, scaling, soft-capping) has been checked against the model.
_VERIFIED_HEADS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    trainable: Tensor,
    *,
    chunk_size: int | None = None,
    position_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum of log π over the trainable tokens of each row.

    Args:
        model: a causal LM, possibly wrapped (DDP, DeepSpeed engine, PEFT, ``torch.compile``).
        input_ids: (B, T) token ids.
        attention_mask: (B, T) bool or 0/1 — real tokens; the model attends to all of them.
        trainable: (B, T) bool — True on tokens the policy generated (the loss targets). The first
            real token of a row is never a target (nothing real predicts it) and is ignored there.
            A trainable padding token is an error.
        chunk_size: rows of the LM head computed at once; bounds the (chunk, V) float32 buffer.
            ``None`` (default): sized by the device and vocabulary (``chunk_rows``). An explicit
            value is capped so that rows × V ≤ 2^27.
        position_ids: (B, T); default ``cumsum(attention_mask) - 1`` so left padding does not shift
            positions. Pass your own for packed sequences.

    Returns:
        ``(logps, counts)``: (B,) float32 sums and (B,) long numbers of target tokens. A row with no
        target token gets logps 0 and count 0; what to do with it is the caller's decision.
    """
    targets = _target_mask(input_ids, attention_mask, trainable, chunk_size)  # (B, T) bool
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=position_ids,
        output_hidden_states=[-1],  # keep only the last (post-norm) hidden state
        logits_to_keep=1,
        use_cache=False,
    )
    hidden = out.hidden_states[-1]  # (B, T, H)
    base = _unwrap(model)
    lm_head = base.get_output_embeddings()
    hidden = _head_input(lm_head, hidden)
    postprocess = _logit_postprocess(base.config)
    _verify_head_once(lm_head, postprocess, hidden, out.logits)

    # hidden[b, p] predicts input_ids[b, p + 1]: select the rows whose next token is a target.
    predicts_target = targets[:, 1:]  # (B, T-1) bool, aligned with hidden[:, :-1]
    rows = hidden[:, :-1][predicts_target]  # (N, H)
    labels = input_ids[:, 1:][predicts_target]  # (N,)
    row_of = predicts_target.nonzero()[:, 0]  # (N,) batch index of each selected row

    chunk = chunk_rows(chunk_size, out.logits.shape[-1], hidden.device)  # rows per LM-head call
    token_logps = torch.cat(
        [
            _checkpointed(_chunk_logps, lm_head, postprocess, h, y)
            for h, y in zip(rows.split(chunk), labels.split(chunk))
        ]
    )  # (N,) float32
    batch = input_ids.shape[0]
    logps = torch.zeros(batch, dtype=torch.float32, device=hidden.device).index_add(0, row_of, token_logps)
    counts = targets.sum(-1)  # (B,) long
    return logps, counts


def chunk_rows(chunk_size: int | None, vocab_size: int, device: torch.device | str) -> int:
    """Rows of one LM-head chunk: `chunk_size` if given (capped at 2^27 logits), else by device.

    Why the default differs by device: a chunk's float32 logits, rows × V × 4 bytes, are what the
    log-prob step adds to memory (2–3 buffers live in backward), and rows only buy speed while the
    LM-head matmul is not yet compute-bound. A (rows, H) × (H, V) matmul does about `rows` FLOPs per
    byte of the weight it reads. On a GPU that must exceed the FLOP/byte ridge (H100/H200 bf16:
    ~1000 TFLOP/s ÷ 3.4–4.8 TB/s ≈ 200–300) with room to spare, so the budget is 2^27 logits:
    1046 rows at V = 128k, 524 at 256k, 4194 at 32k (the previous default's chunks where V ≥ 128k).
    A CPU's ridge is a few FLOP/byte, so far fewer rows lose little (measured: 256 vs 1024 rows at
    V = 128k, +6–16% step time on a tiny model whose step is almost all LM head) while memory drops
    a lot (0.5–0.75 GB less peak RSS): 2^25 logits, 261 rows at V = 128k, 1048 at 32k.
    docs/logprobs.md#chunk-size has the numbers.
    """
    if chunk_size is not None:
        return max(1, min(chunk_size, _MAX_CHUNK_ELEMENTS // vocab_size))
    kind = "cpu" if torch.device(device).type == "cpu" else "accelerator"
    return max(1, AUTO_CHUNK_ELEMENTS[kind] // vocab_size)


def _target_mask(input_ids: Tensor, attention_mask: Tensor, trainable: Tensor, chunk_size: int | None) -> Tensor:
    """Validate the inputs and return the (B, T) bool mask of target tokens.

    Excluded: each row's first real token (position 0, or the first after left padding).
    """
    if trainable.dtype != torch.bool:
        raise TypeError(f"trainable must be a bool mask, got {trainable.dtype}")
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape or input_ids.shape != trainable.shape:
        raise ValueError(
            "input_ids, attention_mask and trainable must all be (B, T); got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(trainable.shape)}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    real = attention_mask.bool()
    if (trainable & ~real).any():
        bad = (trainable & ~real).nonzero()[0].tolist()
        raise ValueError(f"trainable marks a padding token (attention_mask == 0) at (row, position) {bad}")
    targets = trainable.clone()
    targets[:, 0] = False  # nothing predicts the first token ...
    targets[:, 1:] &= real[:, :-1]  # ... nor the first real token of a left-padded row
    return targets


def _chunk_logps(lm_head: nn.Module, postprocess, hidden: Tensor, labels: Tensor) -> Tensor:
    """log π(label | row) for a chunk of rows: (n, H), (n,) -> (n,) float32."""
    logits = postprocess(lm_head(hidden).float())  # (n, V) float32, freed after this call
    return _TargetLogProb.apply(logits, labels)


class _TargetLogProb(torch.autograd.Function):
    """``logits[i, labels[i]] − logsumexp(logits[i])`` with a one-buffer backward.

    Plain autograd of gather + logsumexp allocates three or four (n, V) temporaries in backward;
    here the gradient ``g · (onehot − softmax)`` is built in a single buffer, in place.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
        ctx.save_for_backward(logits, labels, lse)
        return logits.gather(-1, labels[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad = (logits - lse[:, None]).exp_()  # softmax, (n, V): the only new buffer
        grad.mul_(-grad_out[:, None])
        grad.scatter_add_(-1, labels[:, None], grad_out[:, None])
        return grad, None


def _checkpointed(fn, *args) -> Tensor:
    """Run ``fn`` so that backward recomputes its activations instead of storing them."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


def _unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model under DDP / DeepSpeed (``.module``), PEFT and ``torch.compile``."""
    for _ in range(16):
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, DeepSpeedEngine
            model = model.module
        else:
            break
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (LM head); expected a causal LM")
    return model


def _head_input(lm_head: nn.Module, hidden: Tensor) -> Tensor:
    """The hidden states as the LM head can take them *outside* the model's forward.

    * accelerate's mixed precision returns the forward's outputs upcast to float32; a bf16/fp16 head
      called outside autocast needs them back in its dtype (exact: they were computed in it).
    * FSDP2: a head that is not an FSDP unit of its own gets its weight gathered by the root's
      forward only; if the root resharded after forward, the weight is a sharded DTensor here and
      the result would be wrong or a crash deep in DTensor — fail clearly instead.
    """
    weight = getattr(lm_head, "weight", None)
    if weight is None:
        return hidden
    if _is_dtensor(weight) and not _is_fsdp_unit(lm_head):
        raise RuntimeError(
            "sequence_logps: the LM head's weight is still sharded (DTensor) after the model's forward, and the head "
            "is not an FSDP unit of its own. Shard it as one (accelerate's FSDP2 preparation does: "
            "fully_shard([final_norm, lm_head])) or keep the root's reshard_after_forward=False.")
    low = (torch.float16, torch.bfloat16)
    if hidden.dtype == torch.float32 and weight.dtype in low and not torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(weight.dtype)
    return hidden


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _is_fsdp_unit(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _logit_postprocess(config):
    """The element-wise map the model applies after its LM head, read from its config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)  # Cohere: logits * scale
    divisor = getattr(text, "logits_scaling", None)  # Granite: logits / scaling
    cap = getattr(text, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(logits / cap)

    def postprocess(logits: Tensor) -> Tensor:
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    return postprocess


@torch.no_grad()
def _verify_head_once(lm_head: nn.Module, postprocess, hidden: Tensor, model_logits: Tensor) -> None:
    """Check, once per LM head, that our last-position logits equal the model's own.

    Catches an architecture whose ``hidden_states[-1]`` is not the LM head's input or whose logit
    post-processing we do not replicate; either would silently give wrong log-probs.
    """
    if lm_head in _VERIFIED_HEADS:
        return
    ours = postprocess(lm_head(hidden[:, -1]).float())  # (B, V)
    theirs = model_logits[:, -1].float()  # (B, V)
    device = hidden.device.type
    low_precision = hidden.dtype in (torch.float16, torch.bfloat16) or (
        torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in (torch.float16, torch.bfloat16))
    tol = (3e-2 if low_precision else 1e-4) * (1.0 + theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    if err > tol:
        raise RuntimeError(
            f"sequence_logps: recomputed logits differ from the model's by {err:.3g} (tolerance {tol:.3g}). "
            f"{type(lm_head).__name__} post-processing or hidden_states[-1] of this architecture is not "
            "what mtpo assumes (final norm applied; logit_scale / logits_scaling / final_logit_softcapping)."
        )
    _VERIFIED_HEADS.add(lm_head)
