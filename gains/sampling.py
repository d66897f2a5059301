"""The training data stream: an endless, seeded, resumable order of samples shared by all ranks.

One global stream of per-epoch permutations; rank r of W takes every W-th position, and each sample's
augmentation is seeded by its position in that stream (not by rank or worker). So 1 process with batch 2
sees exactly what 2 processes with batch 1 see, and a resumed run continues the stream where it stopped.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import collate
from .rng import preserved_rng_state

def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a tuple of ints (numpy's SeedSequence hashing)."""
    words = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


_PERMUTATION, _SAMPLE = 0, 1  # purpose tags so permutation and augmentation seeds never coincide


class TrainingSampler(Sampler):
    """Infinite shuffled stream of (dataset index, global position) for one rank.

    The global stream is the concatenation of permutations of range(size), epoch e seeded by (seed, e).
    Rank r of W yields global positions start + r, start + r + W, ...; `start` (= completed iterations x
    global batch) makes a resumed run continue exactly where the interrupted one stopped.
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if size <= 0:
            raise ValueError("the training set is empty")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(_PERMUTATION, self.seed, epoch))
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position, epoch, perm = self.start + self.rank, -1, []
        while True:
            e, offset = divmod(position, self.size)
            if e != epoch:
                epoch, perm = e, self._permutation(e)
            yield perm[offset], position
            position += self.world_size


class SeededSamples(Dataset):
    """Wraps a data set so item (index, position) is loaded with all generators seeded by (seed, position).

    The augmentation (Python `random` in the transforms, or torch/numpy) then depends only on the sample's
    place in the global stream. The caller's generator states are restored afterwards, so loading in the
    main process (num_workers=0) does not shift the model's random stream.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, position = key
        s = derive_seed(_SAMPLE, self.seed, position)
        with preserved_rng_state():
            torch.default_generator.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            return self.dataset[index]


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id (base_seed from the loader's generator, seeded
    # with seed + rank); give numpy and random matching, distinct seeds too.
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def build_train_loader(dataset: Dataset, *, images_per_rank: int, seed: int, rank: int, world_size: int,
                       start_iter: int, num_workers: int, collate_fn: Callable = collate,
                       pin_memory: bool = False) -> DataLoader:
    """Endless DataLoader of (list of images, list of targets), `images_per_rank` per batch, starting at
    iteration `start_iter` of the global stream (see TrainingSampler).

    With workers, they are persistent: kept alive by the loader, not restarted by a new `iter(loader)`
    (training takes one endless iterator; a resume builds a new loader, and each sample's augmentation
    depends only on its stream position, so neither changes what is loaded). pin_memory: page-locked
    batches (CUDA), so the non_blocking copies to the GPU are asynchronous."""
    sampler = TrainingSampler(len(dataset), seed=seed, rank=rank, world_size=world_size,
                              start=start_iter * images_per_rank * world_size)
    generator = torch.Generator().manual_seed(seed + rank)  # worker base seeds; never the global RNG
    return DataLoader(SeededSamples(dataset, seed), batch_size=images_per_rank, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate_fn, worker_init_fn=_seed_worker,
                      generator=generator, pin_memory=pin_memory, persistent_workers=num_workers > 0)
