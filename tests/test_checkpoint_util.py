"""Resharding checkpoints: the split table, round trips, optimizer state, resumed training.

Checkpoints come from the real save path (``save_checkpoint`` on a tiny model after a few AdamW
steps); shards of other TP sizes are cut independently of the tool, with ``megatron.mpu``'s
split and each parameter's ``partition_dim`` / ``partition_stride`` attributes.
"""

import argparse
import os

import pytest
import torch

from megatron import mpu
from megatron.checkpoint import (
    CheckpointError,
    load_model_state_dict,
    merge_model_state_dicts,
    reshard_model_state_dicts,
    reshard_states,
)
from megatron.checkpoint.sharding import optimizer_param_names, shard_spec
from megatron.model import BertConfig, BertModel, Classification, MultipleChoice
from megatron.model.bert_model import flat_state_dict, nested_state_dict
from megatron.model.config import vocab_size_with_padding
from megatron.training.checkpointing import load_checkpoint, save_checkpoint, \
    verify_checkpoint_file
from megatron.training.grad_scaler import build_grad_scaler
from megatron.training.optimizer import MegatronOptimizer, get_param_groups
from megatron.training.optimizer_param_scheduler import OptimizerParamScheduler

VOCAB = 100  # real rows: padded to 128 at TP<=1, 256 at TP=2, 512 at TP=4, 1024 at TP=8
WORD = "language_model.embedding.word_embeddings.weight"


def tiny_config(tp=1, heads=8, **kw):
    values = dict(num_layers=2, hidden_size=64, num_attention_heads=heads, vocab_size=VOCAB,
                  max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0,
                  tensor_model_parallel_size=tp)
    values.update(kw)
    return BertConfig(**values)


def tiny_args(config, **kw):
    values = dict(num_layers=config.num_layers, hidden_size=config.hidden_size,
                  num_attention_heads=config.num_attention_heads,
                  ffn_hidden_size=config.ffn_hidden_size,
                  max_position_embeddings=config.max_position_embeddings,
                  tensor_model_parallel_size=config.tensor_model_parallel_size,
                  make_vocab_size_divisible_by=128, padded_vocab_size=config.padded_vocab_size,
                  seed=1234)
    values.update(kw)
    return argparse.Namespace(**values)


def trained(config, steps=2, seed=0):
    """A model, optimizer and scheduler after ``steps`` AdamW steps."""
    torch.manual_seed(seed)
    mpu.model_parallel_manual_seed(seed)
    model = BertModel(config)
    optimizer = MegatronOptimizer(model, lr=1e-2)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-2, min_lr=0.0, lr_warmup_steps=1, lr_decay_steps=10,
        lr_decay_style="linear", start_wd=0.01, end_wd=0.01, wd_incr_steps=10)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 8))
        optimizer.zero_grad()
        lm, binary = model(ids, torch.ones(2, 8), lm_labels=ids, loss_mask=torch.ones(2, 8))
        (lm.mean() + binary.float().pow(2).mean()).backward()
        optimizer.step()
        scheduler.step(increment=1)
    return model, optimizer, scheduler


def save_tp1(path, config=None, steps=2, **args_kw):
    config = config or tiny_config()
    model, optimizer, scheduler = trained(config, steps)
    save_checkpoint(steps, model, optimizer, scheduler, save_dir=str(path),
                    args=tiny_args(config, **args_kw))
    return model


def independent_split(model, tp, padded_rows):
    """Every rank's flat state dict at ``tp``, cut with mpu's split and the param attributes."""
    shards = [{} for _ in range(tp)]
    for name, param in model.named_parameters():
        tensor = param.detach()
        if name in (WORD, "lm_head.bias"):
            tensor = torch.cat([tensor[:VOCAB], tensor.new_zeros(
                (padded_rows - VOCAB,) + tuple(tensor.shape[1:]))])
        for rank in range(tp):
            if param.tensor_model_parallel:
                shards[rank][name] = mpu.utils.split_tensor_along_dim_with_stride(
                    tensor, param.partition_dim, tp, rank, param.partition_stride)
            else:
                shards[rank][name] = tensor.clone()
    return shards


def read_rank(directory, iteration, rank, release=False):
    folder = "release" if release else f"iter_{iteration:07d}"
    return torch.load(os.path.join(directory, folder, f"mp_rank_{rank:02d}",
                                   "model_optim_rng.pt"), weights_only=False)


# ------------------------------------------------------------------------------- the table


@pytest.mark.parametrize("make", [lambda c: BertModel(c), lambda c: Classification(c, 3),
                                  lambda c: MultipleChoice(c)])
def test_split_table_matches_the_layers_attributes(make):
    model = make(tiny_config())
    for name, param in model.named_parameters():
        spec = shard_spec(name)
        if param.tensor_model_parallel:
            assert spec is not None, name
            assert (spec.dim, spec.stride) == (param.partition_dim, param.partition_stride), name
        else:
            assert spec is None, name


def test_optimizer_order_is_get_param_groups_order():
    model = BertModel(tiny_config())
    names = {id(p): n for n, p in model.named_parameters()}
    expected = [[names[id(p)] for p in group["params"]] for group in get_param_groups(model)]
    assert optimizer_param_names(model.state_dict()) == expected


# ------------------------------------------------------------------- load_model_state_dict


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_load_model_state_dict_reshards_a_tp1_checkpoint(tmp_path, tp):
    model = save_tp1(tmp_path)
    padded = vocab_size_with_padding(VOCAB, 128, tp)
    expected = independent_split(model, tp, padded)
    for rank in range(tp):
        state, args, iteration = load_model_state_dict(
            str(tmp_path), tensor_model_parallel_size=tp, tensor_model_parallel_rank=rank)
        assert iteration == 2
        assert args.tensor_model_parallel_size == tp and args.padded_vocab_size == padded
        assert list(state) == list(expected[rank])
        for name, tensor in expected[rank].items():
            assert torch.equal(state[name], tensor), name
    assert padded == tiny_config(tp).padded_vocab_size


def test_load_model_state_dict_merges_a_tp4_checkpoint_and_reads_release(tmp_path):
    model = save_tp1(tmp_path / "tp1")
    shards = independent_split(model, 4, 512)
    saved = read_rank(tmp_path / "tp1", 2, 0)
    args = argparse.Namespace(**dict(vars(saved["args"]), tensor_model_parallel_size=4))
    states = [dict(saved, args=args, model=nested_state_dict(shard)) for shard in shards]
    release = tmp_path / "tp4"
    for rank, state in enumerate(states):
        os.makedirs(release / "release" / f"mp_rank_{rank:02d}")
        torch.save(state, release / "release" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt")
    (release / "latest_checkpointed_iteration.txt").write_text("release")
    state, args, iteration = load_model_state_dict(
        str(release), tensor_model_parallel_size=1, tensor_model_parallel_rank=0)
    assert iteration == 0 and args.padded_vocab_size == 128
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    # The padding rows the TP=4 checkpoint carried (all zero) are dropped again.
    assert state[WORD].shape[0] == 128


def test_load_model_state_dict_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_state_dict(str(tmp_path / "none"), tensor_model_parallel_size=1,
                              tensor_model_parallel_rank=0)
    save_tp1(tmp_path)
    with pytest.raises(CheckpointError, match="rank 2 is outside 0..1"):
        load_model_state_dict(str(tmp_path), tensor_model_parallel_size=2,
                              tensor_model_parallel_rank=2)
    with pytest.raises(CheckpointError, match="num_attention_heads 8 is not divisible by .* 16"):
        load_model_state_dict(str(tmp_path), tensor_model_parallel_size=16,
                              tensor_model_parallel_rank=0)
    with pytest.raises(CheckpointError, match="iteration 5"):
        load_model_state_dict(str(tmp_path), tensor_model_parallel_size=1,
                              tensor_model_parallel_rank=0, iteration=5)


def _tp2_model_matches_tp1(rank, world_size, load_dir, expected_path):
    mpu.initialize_model_parallel(tensor_model_parallel_size=world_size)
    state, args, _ = load_model_state_dict(load_dir, tensor_model_parallel_size=world_size,
                                           tensor_model_parallel_rank=rank, vocab_size=VOCAB)
    model = BertModel(tiny_config(world_size))
    model.load_state_dict(state)
    model.eval()
    ids, types = torch.load(expected_path)["inputs"]
    with torch.no_grad():
        logits, binary = model(ids, torch.ones_like(ids), types)
    full = mpu.gather_from_tensor_model_parallel_region(logits)[..., :VOCAB]  # [b, s, V]
    expected = torch.load(expected_path)
    torch.testing.assert_close(full, expected["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(binary, expected["binary"], rtol=0, atol=1e-5)


def test_a_tp2_model_loads_a_tp1_checkpoint_and_computes_the_same(tmp_path):
    from tests.distributed import run_distributed

    model = save_tp1(tmp_path / "ckpt")
    model.eval()
    torch.manual_seed(3)
    ids, types = torch.randint(0, VOCAB, (2, 8)), torch.randint(0, 2, (2, 8))
    with torch.no_grad():
        logits, binary = model(ids, torch.ones_like(ids), types)
    torch.save({"inputs": (ids, types), "logits": logits[..., :VOCAB], "binary": binary},
               tmp_path / "expected.pt")
    run_distributed(_tp2_model_matches_tp1, 2, str(tmp_path / "ckpt"),
                    str(tmp_path / "expected.pt"))


# ------------------------------------------------------------------------------ round trips


def assert_same(a, b, path="state"):
    """Equal nested structures; tensors bit for bit (dtype included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, argparse.Namespace):
        assert vars(a) == vars(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def run_tool(*argv):
    from tools import checkpoint_util

    return checkpoint_util.main([str(a) for a in argv])


PRECISIONS = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}


def save_precision(path, precision):
    """A TP=1 checkpoint after two steps; half precision has fp32 masters, fp16 a loss scaler."""
    config = tiny_config(**PRECISIONS[precision])
    model, optimizer, scheduler = trained(config, steps=0)
    if precision == "fp16":
        optimizer.grad_scaler = build_grad_scaler(fp16=True, loss_scale=None,
                                                  initial_loss_scale=2.0 ** 8, min_loss_scale=1.0,
                                                  loss_scale_window=10, hysteresis=2)
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (2, 8))
        optimizer.zero_grad()
        lm, _ = model(ids, torch.ones(2, 8), lm_labels=ids, loss_mask=torch.ones(2, 8))
        optimizer.scale_loss(lm.float().mean()).backward()
        optimizer.step()
        scheduler.step(increment=1)
    save_checkpoint(2, model, optimizer, scheduler, save_dir=str(path),
                    args=tiny_args(config, fp16=config.fp16, bf16=config.bf16))
    return model


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
def test_round_trip_1_2_4_1_is_bit_exact_through_the_tool(tmp_path, precision):
    save_precision(tmp_path / "tp1", precision)
    for source, target, size in (("tp1", "tp2", 2), ("tp2", "tp4", 4), ("tp4", "back", 1)):
        run_tool("--load-dir", tmp_path / source, "--save-dir", tmp_path / target,
                 "--target-tensor-parallel-size", size, "--quiet")
    original, back = read_rank(tmp_path / "tp1", 2, 0), read_rank(tmp_path / "back", 2, 0)
    for key in ("model", "optimizer", "opt_param_scheduler", "iteration", "checkpoint_version"):
        assert_same(original[key], back[key], key)
    assert vars(back["args"]) == vars(original["args"])
    # The TP=2 checkpoint holds the independent split of weights, moments and fp32 masters.
    model = BertModel(tiny_config(**PRECISIONS[precision]))
    model.load_state_dict(flat_state_dict(original["model"]))
    shards = independent_split(model, 2, 256)
    wrapped = precision != "fp32"
    for rank in range(2):
        state = read_rank(tmp_path / "tp2", 2, rank)
        assert state["args"].tensor_model_parallel_size == 2
        assert state["args"].padded_vocab_size == 256
        assert_same(flat_state_dict(state["model"]), shards[rank])
        saved = state["optimizer"]["optimizer"] if wrapped else state["optimizer"]
        names = [n for group in optimizer_param_names(shards[rank]) for n in group]
        source = (original["optimizer"]["optimizer"] if wrapped else original["optimizer"])
        holder = BertModel(tiny_config())  # fp32 parameters carrying the TP=1 moments
        for pid, name in enumerate(names):
            if pid in source["state"]:  # parameters without gradients have no state yet
                holder.get_parameter(name).data = source["state"][pid]["exp_avg"]
        moments = independent_split(holder, 2, 256)
        assert list(saved["state"]) == list(source["state"])
        for pid in saved["state"]:
            assert torch.equal(saved["state"][pid]["exp_avg"], moments[rank][names[pid]])
        if wrapped:
            masters = [t for group in state["optimizer"]["fp32_from_fp16_params"] for t in group]
            assert [tuple(t.shape) for t in masters] == [tuple(shards[rank][n].shape)
                                                       for n in names]
    if precision == "fp16":
        assert_same(read_rank(tmp_path / "tp4", 2, 3)["optimizer"]["grad_scaler"],
                    original["optimizer"]["grad_scaler"])
    # What came back loads into the training loop's objects (optimizer format checked there).
    model, optimizer, scheduler = trained(tiny_config(**PRECISIONS[precision]), steps=0)
    if precision == "fp16":
        optimizer.grad_scaler = build_grad_scaler(fp16=True, loss_scale=None,
                                                  initial_loss_scale=1.0, min_loss_scale=1.0,
                                                  loss_scale_window=10, hysteresis=2)
    assert load_checkpoint(model, optimizer, scheduler, load_dir=str(tmp_path / "back"))[0] == 2
    assert_same(model.state_dict(), flat_state_dict(original["model"]))
    # The tool's shards carry integrity records, so --load verifies them like training's own.
    for rank in range(4):
        assert verify_checkpoint_file(str(tmp_path / "tp4" / "iter_0000002"),
                                      f"mp_rank_{rank:02d}/model_optim_rng.pt")


@pytest.mark.parametrize("no_optimizer", [False, True])
def test_round_trip_1_8_1_with_the_pure_functions(tmp_path, no_optimizer):
    save_tp1(tmp_path)
    original = read_rank(tmp_path, 2, 0)
    tp8 = reshard_states([original], 8, no_optimizer=no_optimizer)
    assert [s["model"]["lm_head"]["bias"].shape[0] for s in tp8] == [128] * 8  # 1024 rows / 8
    back = reshard_states(tp8, 1, no_optimizer=no_optimizer)[0]
    assert_same(original["model"], back["model"], "model")
    if no_optimizer:
        assert "optimizer" not in back and "opt_param_scheduler" not in back
    else:
        assert_same(original["optimizer"], back["optimizer"], "optimizer")
        assert_same(original["opt_param_scheduler"], back["opt_param_scheduler"])
    # The per-rank dropout streams are new and differ between ranks; the rest is kept.
    streams = [s["rng_state"][0]["rng_tracker_states"]["model-parallel-rng"][0] for s in tp8]
    assert len({bytes(s.numpy()) for s in streams}) == 8
    assert torch.equal(tp8[5]["rng_state"][0]["torch_rng_state"],
                       original["rng_state"][0]["torch_rng_state"])


def test_model_state_dict_helpers(tmp_path):
    model = BertModel(tiny_config())
    shards = independent_split(model, 4, 512)
    merged = merge_model_state_dicts(shards)
    assert merged[WORD].shape[0] == 512
    assert_same(merged, {k: v for k, v in independent_split(model, 1, 512)[0].items()})
    again = reshard_model_state_dicts(shards, 2, padded_vocab_size=256)
    assert_same(again, independent_split(model, 2, 256))


# --------------------------------------------------------------------- resumed training


def test_training_resumed_after_resharding_matches_training_without(tmp_path):
    from megatron.training import checkpointing
    from tests.test_training import _column, train
    from tests.training_utils import preprocess_sample_corpus, tiny_argv

    data = preprocess_sample_corpus(tmp_path)
    save = str(tmp_path / "tp1")
    straight = train(tmp_path, 1, tiny_argv(data, "--save", save, "--save-interval", "10"),
                     "tp1")  # 20 iterations, checkpoints at 10 and 20
    (tmp_path / "tp1" / "latest_checkpointed_iteration.txt").write_text("10")
    # What pretrain_bert.py --load says at another size is a command that works as printed.
    with pytest.raises(CheckpointError) as error:
        checkpointing._check_tensor_parallel_size(save, os.path.join(save, "iter_0000010"), 2)
    command = str(error.value).splitlines()[-1].split()
    assert command[:2] == ["python", "tools/checkpoint_util.py"]
    run_tool(*command[2:], "--quiet")
    resharded = command[command.index("--save-dir") + 1]
    assert resharded == save + "_tp2" and os.path.isdir(os.path.join(resharded, "iter_0000010"))

    resumed = train(tmp_path, 2, tiny_argv(data, "--tensor-model-parallel-size", "2", "--load",
                                           resharded), "tp2")
    assert len(resumed["losses"]) == 10
    for name in ("lm loss", "sop loss"):
        torch.testing.assert_close(_column(resumed, name), _column(straight, name)[10:],
                                   rtol=1e-5, atol=0, msg=lambda m: f"{name}: {m}")
    assert resumed["iteration"] == 20


# ------------------------------------------------------------------ the streaming writer


def test_streamed_files_load_like_torch_save_and_hold_one_tensor_at_a_time(tmp_path):
    import struct
    import weakref
    import zipfile

    from megatron.checkpoint.torch_stream import LazyTensor, save_streaming

    alive = []

    def make(i):
        def compute():
            # Every tensor computed before this one has been written and dropped.
            assert all(ref() is None for ref in alive), "an earlier tensor is still held"
            tensor = torch.full((1000, 3), float(i), dtype=torch.bfloat16 if i % 2 else
                                torch.float32)
            alive.append(weakref.ref(tensor))
            return tensor
        return LazyTensor((1000, 3), torch.bfloat16 if i % 2 else torch.float32, compute)

    state = {"args": argparse.Namespace(seed=1), "model": {f"w{i}": make(i) for i in range(4)},
             "rng": [(torch.arange(5, dtype=torch.uint8), None)], "step": torch.tensor(2.0),
             "t": torch.arange(6.0).view(2, 3).t()}
    with open(tmp_path / "s.pt", "wb") as handle:
        save_streaming(state, handle)
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "s.pt", weights_only=False, mmap=mmap)
        assert loaded["args"].seed == 1 and torch.equal(loaded["t"], state["t"])
        assert torch.equal(loaded["model"]["w3"], torch.full((1000, 3), 3.0,
                                                             dtype=torch.bfloat16))
        assert loaded["rng"][0][0].dtype == torch.uint8 and loaded["step"].item() == 2.0
    archive = zipfile.ZipFile(tmp_path / "s.pt")
    assert archive.testzip() is None  # CRCs are right
    raw = (tmp_path / "s.pt").read_bytes()
    for info in archive.infolist():  # every record's data 64-byte aligned, as torch writes
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:
                                                       info.header_offset + 30])
        assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    bad = LazyTensor((2,), torch.float32, lambda: torch.zeros(3))
    with open(tmp_path / "bad.pt", "wb") as handle, pytest.raises(ValueError, match="announced"):
        save_streaming({"x": bad}, handle)
