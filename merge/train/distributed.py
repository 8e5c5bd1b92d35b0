"""A population across processes: torch.distributed, launched with ``torchrun``.

PAPA's members train independently between the moments they meet (a pull toward the average every k
steps, a mix every few epochs), so a population splits naturally over processes: each rank trains a
contiguous block of members in lockstep, and the population average is one all-reduce of the ranks'
partial sums. gloo carries it on CPUs, NCCL on GPUs (one GPU per rank, ``cuda:LOCAL_RANK``). Members
keep their global index, seed and recipe, so a distributed run trains the same members as a single
process, up to the order in which the float sums are reduced.

The reference code (SamsungSAILMontreal/PAPA, ``--world_size``) instead gathers every network on GPU 0
with ``gather_object`` at each mix and scatters them back, and does not support PAPA's gradual pull
across processes at all ("not worthwhile ... given the frequent and painfully slow scatter/gather");
an all-reduce of flat buffers makes the gradual pull cheap enough to distribute.

Launch (two processes on one machine; each trains half of the members)::

    torchrun --standalone --nproc-per-node 2 --no-python papa-merge train --method papa ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from merge.errors import InvalidArgumentError

__all__ = ["PopulationGroup", "DistributedGroup", "member_blocks", "population_group", "launched_world_size",
           "rank_device"]


def member_blocks(size: int, world: int) -> list[list[int]]:
    """Which members each rank trains: contiguous blocks, as even as possible, the larger ones first.

    Example:
        >>> member_blocks(5, 2)
        [[0, 1, 2], [3, 4]]
    """
    if world < 1 or size < world:
        raise InvalidArgumentError(f"cannot spread {size} members over {world} processes: every process needs at "
                                   f"least one member; launch at most {size} processes", option="members")
    base, extra = divmod(size, world)
    blocks, start = [], 0
    for r in range(world):
        n = base + (1 if r < extra else 0)
        blocks.append(list(range(start, start + n)))
        start += n
    return blocks


@dataclass
class PopulationGroup:
    """The members this process trains, and how it meets the other processes of the population.

    A single process holds every member and meets no one: the reductions are local.

    Attributes:
        size: members in the whole population (K).
        indices: global indices of the members this process trains, in order.
        rank, world: this process and how many there are.
    """

    size: int
    indices: list[int] = field(default_factory=list)
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not self.indices:
            self.indices = list(range(self.size))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes what belongs to the whole population (its average, the report)."""
        return self.rank == 0

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum each tensor over the processes, in place (a single process: nothing to do)."""

    def all_gather_rows(self, local: Tensor) -> Tensor:
        """``[len(indices), ...]`` rows of this process -> ``[size, ...]`` rows of every member, in member order."""
        if local.shape[0] != self.size:
            raise InvalidArgumentError(f"expected one row per member ({self.size}), got {local.shape[0]}")
        return local

    def barrier(self) -> None:
        """Wait for every process (a single process: return)."""


class DistributedGroup(PopulationGroup):
    """A population split over the processes of the default ``torch.distributed`` group."""

    def __init__(self, size: int) -> None:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        super().__init__(size=size, indices=member_blocks(size, world)[rank], rank=rank, world=world)
        self._blocks = member_blocks(size, world)

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        if not tensors:
            return
        # One flat buffer per call: a collective per tensor would cost a round trip per layer.
        flat = _flatten_dense_tensors(list(tensors))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, list(tensors))):
            t.copy_(reduced)

    def all_gather_rows(self, local: Tensor) -> Tensor:
        import torch.distributed as dist

        if local.shape[0] != len(self.indices):
            raise InvalidArgumentError(f"expected one row per local member ({len(self.indices)}), got {local.shape[0]}")
        # all_gather needs equal shapes: pad every block to the largest, then drop the padding.
        most = max(len(b) for b in self._blocks)
        padded = local.new_zeros((most, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[: len(b)] for p, b in zip(parts, self._blocks)])

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def launched_world_size() -> int:
    """How many processes ``torchrun`` (or any launcher setting ``WORLD_SIZE``) started; 1 when run alone."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def rank_device(device: str | torch.device) -> torch.device:
    """The device of this rank: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under a launcher (one GPU per rank)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and launched_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


@contextmanager
def population_group(size: int, *, device: str | torch.device = "cpu") -> Iterator[PopulationGroup]:
    """The population's group: distributed when launched by ``torchrun`` with several processes, else local.

    Joins the default process group if one is already set up (and leaves it up); otherwise, under a
    launcher, sets it up from the environment (``env://``) with NCCL for CUDA devices and gloo
    otherwise, and tears it down on exit.

    Args:
        size: members in the population.
        device: where this process's members train (:func:`rank_device`).

    Yields:
        A :class:`PopulationGroup` (one process) or :class:`DistributedGroup`.

    Raises:
        InvalidArgumentError: more processes than members.
    """
    import torch.distributed as dist

    ours = False
    if dist.is_available() and not dist.is_initialized() and launched_world_size() > 1:
        dev = rank_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        ours = True
    try:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            yield DistributedGroup(size)
        else:
            yield PopulationGroup(size)
    finally:
        if ours:
            dist.destroy_process_group()
