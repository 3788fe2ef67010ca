"""Process-group layout, getters and their errors."""

import pytest
import torch.distributed as dist

from megatron import mpu
from tests.distributed import run_distributed


def test_layout_of_16_ranks_with_tp4_matches_the_docstring():
    tp_groups, dp_groups = mpu.tensor_and_data_parallel_ranks(16, 4)
    assert tp_groups == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15))
    assert dp_groups == ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15))
    doc = mpu.initialize_model_parallel.__doc__
    assert "[g0, g1, g2, g3]" in doc and "[g0, g4, g8, g12]" in doc


@pytest.mark.parametrize("world_size, tp", [(6, 4), (4, 3), (2, 0)])
def test_layout_rejects_sizes_that_do_not_divide(world_size, tp):
    with pytest.raises(ValueError, match=str(tp)):
        mpu.tensor_and_data_parallel_ranks(world_size, tp)


def test_single_process_without_initialisation():
    assert not mpu.model_parallel_is_initialized()
    assert mpu.get_tensor_model_parallel_world_size() == 1
    assert mpu.get_tensor_model_parallel_rank() == 0
    assert mpu.get_tensor_model_parallel_src_rank() == 0
    assert mpu.get_data_parallel_world_size() == 1
    assert mpu.get_data_parallel_rank() == 0
    with pytest.raises(RuntimeError, match="not initialized"):
        mpu.get_tensor_model_parallel_group()
    with pytest.raises(RuntimeError, match="not initialized"):
        mpu.get_data_parallel_group()
    with pytest.raises(RuntimeError, match="init_process_group"):
        mpu.initialize_model_parallel(1)


def _check_layout_tp2_dp2(rank, world_size):
    state = mpu.initialize_model_parallel(2)
    assert state.tensor_model_parallel_size == 2 and state.data_parallel_size == 2
    assert mpu.get_tensor_model_parallel_world_size() == 2
    assert mpu.get_data_parallel_world_size() == 2
    assert mpu.get_tensor_model_parallel_rank() == rank % 2
    assert mpu.get_data_parallel_rank() == rank // 2
    assert mpu.get_tensor_model_parallel_src_rank() == rank - rank % 2
    assert mpu.get_tensor_model_parallel_ranks() == ((0, 1) if rank < 2 else (2, 3))
    assert dist.get_world_size(mpu.get_tensor_model_parallel_group()) == 2
    assert dist.get_world_size(mpu.get_data_parallel_group()) == 2
    # The groups really connect the ranks the layout says they do.
    import torch

    value = torch.tensor([float(rank)])
    dist.all_reduce(value, group=mpu.get_tensor_model_parallel_group())
    assert value.item() == (1.0 if rank < 2 else 5.0)
    value = torch.tensor([float(rank)])
    dist.all_reduce(value, group=mpu.get_data_parallel_group())
    assert value.item() == (2.0 if rank % 2 == 0 else 4.0)

    with pytest.raises(RuntimeError, match="already initialized with tensor_model_parallel_size=2"):
        mpu.initialize_model_parallel(4)
    mpu.destroy_model_parallel()
    assert not mpu.model_parallel_is_initialized()
    with pytest.raises(ValueError,
                       match="world size 4 is not divisible by tensor_model_parallel_size 3"):
        mpu.initialize_model_parallel(3)
    state = mpu.initialize_model_parallel(4)
    assert state.data_parallel_size == 1 and mpu.get_tensor_model_parallel_rank() == rank


def test_layout_tp2_dp2_on_four_ranks():
    run_distributed(_check_layout_tp2_dp2, 4)


def _check_uninitialised_state_is_an_error(rank, world_size):
    for getter in (mpu.get_tensor_model_parallel_world_size, mpu.get_tensor_model_parallel_rank,
                   mpu.get_data_parallel_rank):
        with pytest.raises(RuntimeError, match="2 processes but model parallel groups"):
            getter()
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        mpu.ColumnParallelLinear(4, 4)


def test_uninitialised_state_with_several_processes_is_an_error():
    run_distributed(_check_uninitialised_state_is_an_error, 2)
