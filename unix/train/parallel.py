"""Distributed set-up: one function starts torch.distributed from torchrun's environment; then
either FSDP2 shards the model (`parallel: fsdp`, the default), or every rank keeps a full replica
and the gradients are averaged in one all-reduce a step (`parallel: replicate`, for small models
on CPUs, where FSDP2's per-layer collectives cost more than they save). A single process needs
none of it and runs the same code, except in bf16: then FSDP2 wraps the model on a process group
of one, only for its mixed precision (bf16 compute, fp32 master weights and gradients), so one
GPU computes exactly as many do."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> Dist:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(int(os.environ.get("RANK", "0")), world, local, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(x: float, d: Dist) -> float:
    """Sum a number over ranks (token counts for loss normalisation, logged metrics)."""
    if d.world == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def all_gather_objects(obj, d: Dist) -> list:
    """Every rank's `obj`, by rank (small picklable state: data positions, RNG)."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model, d: Dist, mode: str, bf16: bool) -> None:
    """Shard (FSDP2), replicate, or on one process leave the model as it is; bf16 always goes
    through FSDP2's MixedPrecisionPolicy, on one process too."""
    if d.world > 1 and mode == "replicate":
        replicate_model(model, d)
    elif d.world > 1 or bf16:
        if not dist.is_initialized():
            # FSDP2 needs a process group even for one rank; an in-process store needs no torchrun.
            dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        shard_model(model, d, bf16)


def shard_model(model, d: Dist, bf16: bool) -> None:
    """FSDP2: every decoder layer and ViT block its own unit, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Our layers return reshaped views of fresh tensors and nothing modifies them in place, so
    # FSDP2's warning about in-place ops on views does not apply.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in list(model.decoder.layers) + list(model.vision.blocks):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def replicate_model(model, d: Dist) -> None:
    """Every rank starts from rank 0's weights and buffers (they are equal already when all ranks
    seed and load alike; this makes it certain)."""
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, 0)


def average_gradients(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Mean of each gradient over ranks, in one all-reduce of a flat buffer. A parameter that got
    no gradient on this rank counts as zero, so every rank reduces the same layout."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= d.world
    for g, mean in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(mean)
