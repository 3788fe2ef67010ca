"""Batch samplers that cut global batches into per-data-parallel-rank micro-batches.

A global step consumes ``micro_batch_size * data_parallel_size`` samples (per micro-batch);
data-parallel rank ``r`` gets slice ``r`` of each such block, so the ranks read disjoint samples
and together read each sample once. Both samplers resume from ``consumed_samples`` (the number of
samples all ranks together have consumed, as saved in a checkpoint), with no sample repeated or
skipped.
"""

import logging
from typing import Iterator, List, Optional

import torch

__all__ = ["MegatronPretrainingSampler", "MegatronPretrainingRandomSampler",
           "build_pretraining_data_loader"]

logger = logging.getLogger(__name__)


def _check(total_samples: int, consumed_samples: int, micro_batch_size: int,
           data_parallel_rank: int, data_parallel_size: int) -> None:
    if total_samples <= 0:
        raise ValueError(f"no sample to consume: total_samples is {total_samples}")
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    if data_parallel_size <= 0:
        raise ValueError(f"data_parallel_size must be positive, got {data_parallel_size}")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data_parallel_rank {data_parallel_rank} is not in "
                         f"[0, {data_parallel_size})")
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")


class MegatronPretrainingSampler:
    """Samples in order, from ``consumed_samples`` to ``total_samples``.

    Args:
        total_samples: dataset length.
        consumed_samples: samples already consumed by all ranks (resume point).
        micro_batch_size: samples per rank per micro-batch.
        data_parallel_rank: this rank's index in its data-parallel group.
        data_parallel_size: data-parallel group size.
        drop_last: drop a last incomplete block (else each rank gets its part of it).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        _check(total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
               data_parallel_size)
        if consumed_samples >= total_samples:
            raise ValueError(f"no sample left: consumed_samples {consumed_samples} >= "
                             f"total_samples {total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.micro_batch_times_data_parallel_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[List[int]]:
        block_size = self.micro_batch_times_data_parallel_size
        for start in range(self.consumed_samples, self.total_samples, block_size):
            end = min(start + block_size, self.total_samples)
            if end - start < block_size and self.drop_last:
                return
            first = start + self.data_parallel_rank * self.micro_batch_size
            batch = list(range(first, min(first + self.micro_batch_size, end)))
            if not batch:  # this rank has nothing in the incomplete last block
                return
            yield batch


class MegatronPretrainingRandomSampler:
    """Shuffled samples, a new order each epoch; each rank draws from its own bucket.

    The dataset's first ``total_samples - total_samples % (micro_batch_size * dp)`` samples are
    cut into ``dp`` contiguous buckets; in epoch ``e`` rank ``r`` reads its bucket in the order
    ``randperm(bucket, seed + e)``. Epochs follow one another without end; the caller stops.

    Args:
        total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
            data_parallel_size: as for :class:`MegatronPretrainingSampler`.
        seed: base seed of the per-epoch permutations.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, seed: int = 0):
        _check(total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
               data_parallel_size)
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.active_total_samples = (total_samples - total_samples
                                     % self.micro_batch_times_data_parallel_size)
        if self.active_total_samples == 0:
            raise ValueError(f"{total_samples} samples are fewer than one global micro-batch "
                             f"({self.micro_batch_times_data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.seed = seed

    def __len__(self) -> int:
        return self.active_total_samples // self.micro_batch_times_data_parallel_size

    def __iter__(self) -> Iterator[List[int]]:
        bucket_size = self.active_total_samples // self.data_parallel_size
        bucket_start = self.data_parallel_rank * bucket_size
        while True:
            epoch, in_epoch = divmod(self.consumed_samples, self.active_total_samples)
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(bucket_size, generator=generator).tolist()
            for offset in range(in_epoch // self.data_parallel_size, bucket_size,
                                self.micro_batch_size):
                batch = [bucket_start + i for i in order[offset:offset + self.micro_batch_size]]
                self.consumed_samples += self.micro_batch_times_data_parallel_size
                yield batch


def build_pretraining_data_loader(dataset, consumed_samples: int, *, micro_batch_size: int,
                                  data_parallel_rank: int, data_parallel_size: int,
                                  dataloader_type: str = "single", num_workers: int = 0,
                                  seed: int = 0, drop_last: bool = True
                                  ) -> Optional[torch.utils.data.DataLoader]:
    """A DataLoader over ``dataset`` with one of the samplers above (``None`` for no dataset).

    Args:
        dataset: the dataset (``None`` gives ``None``).
        consumed_samples: resume point (samples consumed by all data-parallel ranks together).
        micro_batch_size, data_parallel_rank, data_parallel_size: batch layout.
        dataloader_type: ``single`` (in order) or ``cyclic`` (shuffled, endless).
        num_workers: DataLoader worker processes.
        seed: seed of the ``cyclic`` shuffle.
        drop_last: drop an incomplete last block (``single``).

    Raises:
        ValueError: for an unknown ``dataloader_type``.
    """
    if dataset is None:
        return None
    if dataloader_type == "single":
        sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                             data_parallel_rank, data_parallel_size, drop_last)
    elif dataloader_type == "cyclic":
        sampler = MegatronPretrainingRandomSampler(len(dataset), consumed_samples,
                                                   micro_batch_size, data_parallel_rank,
                                                   data_parallel_size, seed=seed)
    else:
        raise ValueError(f"dataloader_type {dataloader_type!r} is not 'single' or 'cyclic'")
    # A generator of its own: creating an iterator then draws no number from torch's global
    # generator, so resuming from a checkpoint replays dropout exactly.
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=num_workers > 0,
                                       generator=torch.Generator().manual_seed(seed))
