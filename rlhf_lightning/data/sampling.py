"""A training-data order that a resumed run continues exactly.

Lightning restores a model, its optimisers and the loop counters from a checkpoint, but a plain
shuffled ``DataLoader`` starts its epoch again from a fresh permutation: after a crash, PPO would
see other prompts than the uninterrupted run, and SFT or the reward model would see some records
twice and others never. :class:`ResumableSampler` makes the order a pure function of
``(seed, epoch)`` and can start an epoch part-way, at the first record not yet consumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffled by ``seed + epoch``, split over ``num_replicas`` ranks, resumable mid-epoch.

    A :class:`DistributedSampler` subclass, so Lightning keeps it under DDP instead of wrapping
    it; with one process it is a seeded shuffle. :meth:`resume` makes the next iteration over
    ``epoch`` skip its first ``consumed`` indices (this rank's), once.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._resume_at: tuple[int, int] | None = None

    def resume(self, epoch: int, consumed: int) -> None:
        """Start ``epoch`` after its first ``consumed`` indices (used once, by the next ``iter``)."""
        self._resume_at = (epoch, consumed)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            indices = indices[self._resume_at[1] :]
        self._resume_at = None
        return iter(indices)


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator: without one, every ``iter(loader)`` draws a seed from the
    global torch RNG, so a resumed run would sample differently from an uninterrupted one."""
    return torch.Generator().manual_seed(seed)
