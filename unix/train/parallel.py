"""Distributed set-up: one function starts torch.distributed from torchrun's environment, one
shards the model with FSDP2. A single process needs neither and runs the same code."""

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
