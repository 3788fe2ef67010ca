"""Pretraining samplers: per-rank micro-batches, resuming, shuffling; blending indices."""

import itertools

import numpy as np
import pytest
import torch

from megatron.data.blendable_dataset import build_blending_indices
from megatron.data.data_samplers import (
    MegatronPretrainingRandomSampler,
    MegatronPretrainingSampler,
    build_pretraining_data_loader,
)


def _sequential(total, consumed, mbs, dp, drop_last=True):
    return [list(MegatronPretrainingSampler(total, consumed, mbs, rank, dp, drop_last))
            for rank in range(dp)]


def test_sequential_sampler_slices_global_batches():
    per_rank = _sequential(total=50, consumed=0, mbs=4, dp=3)
    assert per_rank[0][:2] == [[0, 1, 2, 3], [12, 13, 14, 15]]
    assert per_rank[1][0] == [4, 5, 6, 7] and per_rank[2][0] == [8, 9, 10, 11]
    assert all(len(batches) == 4 for batches in per_rank)  # 48 of 50 samples, last block dropped
    seen = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert seen == list(range(48))
    assert len(MegatronPretrainingSampler(50, 0, 4, 0, 3)) == 4
    # Without drop_last each rank gets its part of the last block (rank 0: 48, 49).
    tails = [batches[4:] for batches in _sequential(50, 0, 4, 3, drop_last=False)]
    assert tails == [[[48, 49]], [], []]


def test_sequential_sampler_resumes_from_consumed_samples():
    full = _sequential(total=100, consumed=0, mbs=2, dp=2)
    resumed = _sequential(total=100, consumed=24, mbs=2, dp=2)
    for rank in range(2):
        assert resumed[rank] == full[rank][6:]  # 24 samples = 6 steps of 2 x 2


def _random(total, consumed, mbs, dp, steps, seed=0):
    return [list(itertools.islice(MegatronPretrainingRandomSampler(
        total, consumed, mbs, rank, dp, seed=seed), steps)) for rank in range(dp)]


def test_random_sampler_epochs_are_permutations_of_disjoint_buckets():
    total, mbs, dp = 42, 4, 2  # 40 active samples, 5 micro-batches per rank per epoch
    per_rank = _random(total, 0, mbs, dp, steps=10)
    for rank, batches in enumerate(per_rank):
        first_epoch = sorted(i for b in batches[:5] for i in b)
        assert first_epoch == list(range(rank * 20, rank * 20 + 20))  # this rank's bucket
        second_epoch = [i for b in batches[5:] for i in b]
        assert sorted(second_epoch) == first_epoch
        assert second_epoch != [i for b in batches[:5] for i in b]  # reshuffled
    assert _random(total, 0, mbs, dp, 10) == per_rank  # deterministic
    assert _random(total, 0, mbs, dp, 10, seed=1) != per_rank


def test_random_sampler_resumes_mid_epoch_and_across_epochs():
    full = _random(42, 0, 4, 2, steps=12)
    for steps_done in (3, 5, 7):
        resumed = _random(42, steps_done * 8, 4, 2, steps=12 - steps_done)
        for rank in range(2):
            assert resumed[rank] == full[rank][steps_done:]


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="data_parallel_rank 2 is not in"):
        MegatronPretrainingSampler(10, 0, 2, 2, 2)
    with pytest.raises(ValueError, match="no sample left"):
        MegatronPretrainingSampler(10, 10, 2, 0, 1)
    with pytest.raises(ValueError, match="fewer than one global micro-batch"):
        MegatronPretrainingRandomSampler(3, 0, 2, 0, 2)
    with pytest.raises(ValueError, match="dataloader_type"):
        build_pretraining_data_loader(list(range(4)), 0, micro_batch_size=1,
                                      data_parallel_rank=0, data_parallel_size=1,
                                      dataloader_type="bogus")
    assert build_pretraining_data_loader(None, 0, micro_batch_size=1, data_parallel_rank=0,
                                         data_parallel_size=1) is None


class _Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, idx):
        return {"text": np.full(3, idx, dtype=np.int64), "is_random": np.int64(idx % 2)}


def test_data_loader_collates_numpy_samples():
    loader = build_pretraining_data_loader(_Toy(), 4, micro_batch_size=2, data_parallel_rank=1,
                                           data_parallel_size=2)
    batch = next(iter(loader))
    assert batch["text"].dtype == torch.int64 and batch["text"].shape == (2, 3)
    assert batch["text"][:, 0].tolist() == [6, 7] and batch["is_random"].tolist() == [0, 1]
    assert len(loader) == 4


def test_blending_indices_follow_weights_in_every_prefix():
    weights = [0.5, 0.3, 0.2]
    owner, sample = build_blending_indices(weights, 1000)
    for size in (10, 100, 1000):
        counts = np.bincount(owner[:size], minlength=3)
        assert np.abs(counts - np.array(weights) * size).max() <= 1.0
    for dataset in range(3):  # each dataset's samples are used in order, once
        used = sample[owner == dataset]
        assert used.tolist() == list(range(len(used)))
