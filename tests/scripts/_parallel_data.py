"""Data for the parallel-strategy runs: contract batches with a fixed prefix (every sample has the same number of
target tokens, so the mean of per-rank token-mean losses equals the token mean over the global batch)."""

from __future__ import annotations

import torch
from _fakes import ContractBatches, collate
from torch.utils.data import DataLoader, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

BATCH = 4


class FixedPrefix(ContractBatches):
    def __getitem__(self, i: int) -> dict:
        row = super().__getitem__(i)
        row["labels"][:2] = -100
        row["labels"][2:] = row["input_ids"][2:]
        row["prefix_len"] = torch.tensor(2)
        return row


class Interleaved(Sampler):
    """Sample order of a `world`-rank DistributedSampler(shuffle=False) seen by one process: rank 0's batch, rank 1's
    batch, ... (for world=1 the identity order)."""

    def __init__(self, size: int, world: int, batch: int) -> None:
        self.order = []
        for start in range(0, size, world * batch):
            for rank in range(world):
                self.order += list(range(start + rank, min(size, start + world * batch), world))

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def rank_loader(rank: int, world: int, batch: int = BATCH, size: int = 64) -> DataLoader:
    """What rank `rank` of `world` reads (samples rank, rank + world, ...), as DistributedSampler(shuffle=False);
    resumable (Lightning saves its position), so a resumed run continues with the next batch."""
    return StatefulDataLoader(FixedPrefix(size), batch_size=batch, sampler=list(range(rank, size, world)),
                              collate_fn=collate)


def interleaved_loader(world: int, batch: int = BATCH, size: int = 64) -> DataLoader:
    data = FixedPrefix(size)
    return DataLoader(data, batch_size=batch, sampler=Interleaved(size, world, batch), collate_fn=collate)
