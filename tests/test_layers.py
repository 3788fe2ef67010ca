"""Tensor-parallel layers against single-process torch references, with collectives counted.

Every check runs at world sizes 1, 2 and 4 with tensor_model_parallel_size = world size. The
reference is plain ``F.linear`` / ``F.embedding`` / ``F.cross_entropy`` on the full master weight,
computed in the same process.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron import mpu
from tests.distributed import count_collectives, run_distributed

WORLD_SIZES = (1, 2, 4)
SEED = 1234
TOL = dict(rtol=1e-5, atol=1e-5)
B, S, IN, OUT = 3, 5, 16, 24


def _randn(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def _shard(tensor, dim, rank, world_size):
    return tensor.chunk(world_size, dim=dim)[rank]


def _setup(rank, world_size):
    mpu.initialize_model_parallel(world_size)
    mpu.model_parallel_manual_seed(SEED)
    return mpu.get_tensor_model_parallel_rank()


def _fwd_bwd_counts(forward, loss_fn):
    with count_collectives() as fwd:
        output = forward()
    with count_collectives() as bwd:
        loss_fn(output).backward()
    return output, dict(fwd), dict(bwd)


def _expected(world_size, counts):
    return {} if world_size == 1 else counts


# ---------------------------------------------------------------------------- column-parallel


def _check_column(rank, world_size, gather_output):
    tp_rank = _setup(rank, world_size)
    layer = mpu.ColumnParallelLinear(IN, OUT, gather_output=gather_output,
                                     keep_master_weight_for_test=True)
    with torch.no_grad():
        layer.bias.copy_(_shard(_randn(OUT, seed=7), 0, tp_rank, world_size))
    x = _randn(B, S, IN, seed=1).requires_grad_()
    g = _randn(B, S, OUT, seed=2)
    g_local = g if gather_output else _shard(g, -1, tp_rank, world_size)

    out, fwd, bwd = _fwd_bwd_counts(lambda: layer(x), lambda o: (o[0] * g_local).sum())
    assert out[1] is None
    assert fwd == _expected(world_size, {"allgather": 1} if gather_output else {})
    assert bwd == _expected(world_size, {"allreduce": 1})

    ref_w = layer.master_weight.clone().requires_grad_()
    ref_b = _randn(OUT, seed=7).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    ref_out = F.linear(ref_x, ref_w, ref_b)
    (ref_out * g).sum().backward()

    expected_out = ref_out if gather_output else _shard(ref_out, -1, tp_rank, world_size)
    torch.testing.assert_close(out[0], expected_out, **TOL)
    torch.testing.assert_close(x.grad, ref_x.grad, **TOL)
    torch.testing.assert_close(layer.weight.grad, _shard(ref_w.grad, 0, tp_rank, world_size), **TOL)
    torch.testing.assert_close(layer.bias.grad, _shard(ref_b.grad, 0, tp_rank, world_size), **TOL)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("gather_output", [True, False])
def test_column_parallel_linear(world_size, gather_output):
    run_distributed(_check_column, world_size, gather_output)


# ------------------------------------------------------------------------------- row-parallel


def _check_row(rank, world_size, input_is_parallel):
    tp_rank = _setup(rank, world_size)
    layer = mpu.RowParallelLinear(IN, OUT, input_is_parallel=input_is_parallel,
                                  keep_master_weight_for_test=True)
    with torch.no_grad():
        layer.bias.copy_(_randn(OUT, seed=7))
    x_full = _randn(B, S, IN, seed=1)
    x = (_shard(x_full, -1, tp_rank, world_size) if input_is_parallel else x_full)
    x = x.clone().requires_grad_()
    g = _randn(B, S, OUT, seed=2)

    out, fwd, bwd = _fwd_bwd_counts(lambda: layer(x), lambda o: (o[0] * g).sum())
    assert out[1] is None
    assert fwd == _expected(world_size, {"allreduce": 1})
    assert bwd == _expected(world_size, {} if input_is_parallel else {"allgather": 1})

    ref_w = layer.master_weight.clone().requires_grad_()
    ref_b = _randn(OUT, seed=7).requires_grad_()
    ref_x = x_full.clone().requires_grad_()
    ref_out = F.linear(ref_x, ref_w, ref_b)
    (ref_out * g).sum().backward()

    torch.testing.assert_close(out[0], ref_out, **TOL)
    expected_x_grad = ref_x.grad
    if input_is_parallel:
        expected_x_grad = _shard(ref_x.grad, -1, tp_rank, world_size)
    torch.testing.assert_close(x.grad, expected_x_grad, **TOL)
    torch.testing.assert_close(layer.weight.grad, _shard(ref_w.grad, 1, tp_rank, world_size), **TOL)
    torch.testing.assert_close(layer.bias.grad, ref_b.grad, **TOL)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_linear(world_size, input_is_parallel):
    run_distributed(_check_row, world_size, input_is_parallel)


# --------------------------------------------------------------------------- the paper's MLP


def _check_mlp_block(rank, world_size):
    """Column (no gather) -> GeLU -> row (parallel input): one all-reduce each way."""
    tp_rank = _setup(rank, world_size)
    fc1 = mpu.ColumnParallelLinear(IN, 4 * IN, gather_output=False, skip_bias_add=True,
                                   keep_master_weight_for_test=True)
    fc2 = mpu.RowParallelLinear(4 * IN, IN, input_is_parallel=True,
                                keep_master_weight_for_test=True)
    x = _randn(B, S, IN, seed=1).requires_grad_()
    g = _randn(B, S, IN, seed=2)

    def forward():
        hidden, bias = fc1(x)
        return fc2(F.gelu(hidden + bias))[0]

    out, fwd, bwd = _fwd_bwd_counts(forward, lambda o: (o * g).sum())
    assert fwd == _expected(world_size, {"allreduce": 1})
    assert bwd == _expected(world_size, {"allreduce": 1})

    w1 = fc1.master_weight.clone().requires_grad_()
    w2 = fc2.master_weight.clone().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    ref_out = F.linear(F.gelu(F.linear(ref_x, w1)), w2)
    (ref_out * g).sum().backward()
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(x.grad, ref_x.grad, **TOL)
    torch.testing.assert_close(fc1.weight.grad, _shard(w1.grad, 0, tp_rank, world_size), **TOL)
    torch.testing.assert_close(fc2.weight.grad, _shard(w2.grad, 1, tp_rank, world_size), **TOL)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_mlp_block_communicates_once_each_way(world_size):
    run_distributed(_check_mlp_block, world_size)


# ----------------------------------------------------------------------- vocabulary-parallel


VOCAB = 24  # 24, 12 or 6 rows per rank
# First, second and last id of every 6-row shard: covers every shard boundary at TP 1, 2 and 4.
BOUNDARY_IDS = [0, 1, 5, 6, 7, 11, 12, 13, 17, 18, 19, 23]


def _check_embedding(rank, world_size):
    tp_rank = _setup(rank, world_size)
    emb = mpu.VocabParallelEmbedding(VOCAB, IN, keep_master_weight_for_test=True)
    random_ids = torch.randint(0, VOCAB, (18,), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([torch.tensor(BOUNDARY_IDS), random_ids]).view(6, 5)
    g = _randn(*ids.shape, IN, seed=2)

    out, fwd, bwd = _fwd_bwd_counts(lambda: emb(ids), lambda o: (o * g).sum())
    assert fwd == _expected(world_size, {"allreduce": 1})
    assert bwd == {}

    ref_w = emb.master_weight.clone().requires_grad_()
    ref_out = F.embedding(ids, ref_w)
    (ref_out * g).sum().backward()
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(emb.weight.grad, _shard(ref_w.grad, 0, tp_rank, world_size), **TOL)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_vocab_parallel_embedding(world_size):
    run_distributed(_check_embedding, world_size)


def _check_cross_entropy(rank, world_size, label_smoothing):
    tp_rank = _setup(rank, world_size)
    logits = _randn(B, 8, VOCAB, seed=1) * 3
    boundary = torch.tensor(BOUNDARY_IDS)
    target = torch.cat([boundary, torch.randint(0, VOCAB, (B * 8 - len(boundary),),
                                                generator=torch.Generator().manual_seed(5))])
    target = target.view(B, 8)
    g = _randn(B, 8, seed=2)
    local = _shard(logits, -1, tp_rank, world_size).clone().requires_grad_()

    loss, fwd, bwd = _fwd_bwd_counts(
        lambda: mpu.vocab_parallel_cross_entropy(local, target, label_smoothing),
        lambda o: (o * g).sum(),
    )
    assert fwd == _expected(world_size, {"allreduce": 2})
    assert bwd == {}

    ref_logits = logits.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref_logits.view(-1, VOCAB), target.view(-1), reduction="none",
                               label_smoothing=label_smoothing).view(B, 8)
    (ref_loss * g).sum().backward()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(local.grad, _shard(ref_logits.grad, -1, tp_rank, world_size), **TOL)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_vocab_parallel_cross_entropy(world_size, label_smoothing):
    run_distributed(_check_cross_entropy, world_size, label_smoothing)


# --------------------------------------------------------------------------- initialisation


def _check_identical_initialisation(rank, world_size):
    """Gathered shards at TP=p equal, bit for bit, the TP=1 layers built in the same process."""
    _setup(rank, world_size)
    singles = [dist.new_group([r]) for r in range(world_size)]

    def build(group):
        mpu.model_parallel_manual_seed(SEED)
        kwargs = dict(process_group=group)
        return [
            mpu.ColumnParallelLinear(IN, 3 * OUT, stride=3, **kwargs).weight,
            mpu.RowParallelLinear(OUT, IN, **kwargs).weight,
            mpu.VocabParallelEmbedding(VOCAB, IN, **kwargs).weight,
        ]

    sharded = build(None)
    reference = build(singles[rank])
    for shard, full in zip(sharded, reference):
        parts = [torch.empty_like(shard) for _ in range(world_size)]
        dist.all_gather(parts, shard.detach())
        dim, stride = shard.partition_dim, shard.partition_stride
        # With stride s, piece k of the full weight (of p*s pieces) is piece k // p of rank k % p.
        chunks = [part.chunk(stride, dim=dim) for part in parts]
        gathered = torch.cat(
            [chunks[k % world_size][k // world_size] for k in range(world_size * stride)], dim=dim
        )
        assert torch.equal(gathered, full.detach())
        assert shard.tensor_model_parallel


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_initialisation_is_identical_at_every_tp_size(world_size):
    run_distributed(_check_identical_initialisation, world_size)


def test_parameters_carry_partition_attributes():
    column = mpu.ColumnParallelLinear(4, 8, stride=2)
    row = mpu.RowParallelLinear(8, 4)
    emb = mpu.VocabParallelEmbedding(16, 4)
    attrs = lambda p: (p.tensor_model_parallel, p.partition_dim, p.partition_stride)  # noqa: E731
    assert attrs(column.weight) == (True, 0, 2) and attrs(column.bias) == (True, 0, 2)
    assert attrs(row.weight) == (True, 1, 1) and attrs(row.bias) == (False, -1, 1)
    assert attrs(emb.weight) == (True, 0, 1)


# ------------------------------------------------------------------ no process group at all


def test_layers_without_any_process_group_are_plain_torch_layers():
    torch.manual_seed(0)
    column = mpu.ColumnParallelLinear(IN, OUT)
    torch.manual_seed(0)
    expected_weight = torch.nn.init.xavier_normal_(torch.empty(OUT, IN))
    assert torch.equal(column.weight.detach(), expected_weight)
    x = _randn(2, IN, seed=1)
    out, bias = column(x)
    assert bias is None
    torch.testing.assert_close(out, F.linear(x, column.weight, column.bias), rtol=0, atol=0)

    row = mpu.RowParallelLinear(OUT, IN, skip_bias_add=True)
    out, bias = row(_randn(2, OUT, seed=2))
    assert bias is row.bias
    torch.testing.assert_close(out, F.linear(_randn(2, OUT, seed=2), row.weight), rtol=0, atol=0)

    emb = mpu.VocabParallelEmbedding(VOCAB, IN)
    ids = torch.arange(VOCAB)
    assert torch.equal(emb(ids), F.embedding(ids, emb.weight))

    logits, target = _randn(4, VOCAB, seed=3), torch.tensor([0, 5, 23, 11])
    torch.testing.assert_close(mpu.vocab_parallel_cross_entropy(logits, target),
                               F.cross_entropy(logits, target, reduction="none"), **TOL)
    for region in (mpu.copy_to_tensor_model_parallel_region,
                   mpu.reduce_from_tensor_model_parallel_region,
                   mpu.scatter_to_tensor_model_parallel_region,
                   mpu.gather_from_tensor_model_parallel_region):
        assert region(x) is x


# ----------------------------------------------------------------------------- bad settings


def _check_bad_sizes(rank, world_size):
    _setup(rank, world_size)
    with pytest.raises(ValueError,
                       match="output_size / tensor_model_parallel_size: 6 is not divisible by 4"):
        mpu.ColumnParallelLinear(8, 6)
    with pytest.raises(ValueError,
                       match="input_size / tensor_model_parallel_size: 10 is not divisible by 4"):
        mpu.RowParallelLinear(10, 8)
    with pytest.raises(ValueError, match="vocabulary size / tensor_model_parallel_size: "
                                         "30522 is not divisible by 4"):
        mpu.VocabParallelEmbedding(30522, 8)


def test_sizes_that_do_not_split_are_rejected_with_their_values():
    run_distributed(_check_bad_sizes, 4)


def test_cross_entropy_rejects_bad_arguments():
    logits, target = torch.zeros(2, 3, 8), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        mpu.vocab_parallel_cross_entropy(logits, target, 1.5)
    with pytest.raises(ValueError,
                       match=r"logits shape \(2, 3, 8\) does not match target shape \(3,\)"):
        mpu.vocab_parallel_cross_entropy(logits, target[0])
