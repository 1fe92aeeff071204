"""FSDP2 worker for tests/test_distributed.py (2 processes, gloo, CPU): is `sequence_logps` — which calls
the LM head *outside* the model's forward — exact under FSDP2 as accelerate shards a model?

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT.json

The FSDP plugin is built from the environment, which the test fills from configs/accelerate/fsdp2.yaml
exactly as `accelerate launch` would. accelerate only enables FSDP on GPUs, so the plugin is driven
through accelerate's own `fsdp2_prepare_model` with a minimal accelerator stand-in. Each rank writes
OUT.json.rank<r>.json with:

    policy_logps_err   max |logps| difference, FSDP2 shard of the batch vs the full batch unsharded
    policy_grad_err    max |grad| difference of every parameter (full tensors) vs the unsharded model
    reference_err      FSDP2 reference (`mtpo.trainers.parallel.prepare_reference`, RAM-efficient
                       loading: rank 1's copy is garbage until rank 0's weights are broadcast) vs exact
    root_only_error    the message `sequence_logps` raises when the LM head is left in a root unit
                       that reshards after forward (must be mtpo's clear error, not a DTensor crash)
"""

from __future__ import annotations

import json
import os
import sys
import types

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
TINY = os.path.join(ROOT, "examples", "tiny-model")


def _accelerator(plugin, rank: int):
    """What `fsdp2_prepare_model` and `prepare_reference` read from an Accelerator."""
    state = types.SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=None)
    return types.SimpleNamespace(state=state, torch_device_mesh=None, device=torch.device("cpu"),
                                 mixed_precision="no", is_main_process=rank == 0, parallelism_config=None)


def _batch():
    g = torch.Generator().manual_seed(0)
    lengths = [24, 17, 21, 12]  # right padding, different per row
    ids = torch.randint(3, 1000, (4, 24), generator=g)
    attention = torch.zeros(4, 24, dtype=torch.bool)
    trainable = torch.zeros(4, 24, dtype=torch.bool)
    for i, n in enumerate(lengths):
        attention[i, :n] = True
        trainable[i, n // 2:n] = True
    return ids, attention, trainable


def _model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)


def main(out: str) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import fully_shard

    from mtpo.logprobs import sequence_logps
    from mtpo.trainers.parallel import prepare_reference, reshard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    torch.manual_seed(0)
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment (configs/accelerate/fsdp2.yaml)
    assert plugin.fsdp_version == 2
    accelerator = _accelerator(plugin, rank)
    ids, attention, trainable = _batch()
    weights = torch.tensor([1.0, -0.5, 0.25, 2.0])  # a loss that weighs rows differently
    mine = slice(2 * rank, 2 * rank + 2)
    result = {"rank": rank}

    # exact: the whole batch on an unsharded copy
    exact = _model()
    exact_logps, _ = sequence_logps(exact, ids, attention, trainable, chunk_size=5)
    (weights * exact_logps).sum().backward()

    # policy: sharded by accelerate's FSDP2 preparation, each rank its half of the batch
    policy = fsdp2_prepare_model(accelerator, _model())
    logps, _ = sequence_logps(policy, ids[mine], attention[mine], trainable[mine], chunk_size=5)
    result["policy_logps_err"] = (logps.detach() - exact_logps[mine].detach()).abs().max().item()
    (world * (weights[mine] * logps).sum()).backward()  # FSDP averages gradients over ranks
    errors = []
    for (name, p), (_, q) in zip(policy.named_parameters(), exact.named_parameters()):
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        errors.append((grad - q.grad).abs().max().item())
    result["policy_grad_err"] = max(errors)

    # reference: sharded for inference; rank 1 starts from garbage (RAM-efficient loading broadcasts rank 0's)
    ref = _model()
    if rank != 0 and plugin.cpu_ram_efficient_loading:
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_()
    ref = prepare_reference(ref, accelerator, torch.device("cpu"))
    with torch.no_grad():
        ref_logps, _ = sequence_logps(ref, ids[mine], attention[mine], trainable[mine], chunk_size=5)
    reshard(ref)
    with torch.no_grad():  # again, after resharding
        again, _ = sequence_logps(ref, ids[mine], attention[mine], trainable[mine], chunk_size=5)
    result["reference_err"] = max((ref_logps - exact_logps[mine].detach()).abs().max().item(),
                                  (again - exact_logps[mine].detach()).abs().max().item())

    # misuse: LM head left in a root unit that reshards after forward
    bad = _model()
    for layer in bad.model.layers:
        fully_shard(layer)
    fully_shard(bad, reshard_after_forward=True)
    try:
        sequence_logps(bad, ids[mine], attention[mine], trainable[mine], chunk_size=5)
        result["root_only_error"] = None
    except RuntimeError as e:
        result["root_only_error"] = str(e)

    with open(f"{out}.rank{rank}.json", "w", encoding="utf-8") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
