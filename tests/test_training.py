"""pretrain_bert.py end to end on CPU/gloo: layouts agree, golden losses, resume, precision."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_distributed
from tests.training_utils import (
    ROOT,
    load_pretrain_bert,
    preprocess_sample_corpus,
    run_pretrain,
    tiny_argv,
)

GOLDEN = ROOT / "tests" / "assets" / "golden_losses_tiny.json"
TIMEOUT = 300


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return preprocess_sample_corpus(tmp_path_factory.mktemp("corpus"))


def _train_worker(rank, world_size, argv, out):
    result = run_pretrain(argv)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump({"losses": result.losses, "skipped": result.skipped_iterations,
                       "loss_scale": result.loss_scale, "grad_norms": result.grad_norms,
                       "iteration": result.iteration,
                       "checkpoint": result.checkpoint, "valid": result.valid_losses}, handle)


def train(tmp_path, world_size, argv, name="run"):
    out = str(tmp_path / f"{name}.json")
    run_distributed(_train_worker, world_size, argv, out, timeout=TIMEOUT)
    with open(out) as handle:
        return json.load(handle)


def _column(result, name="lm loss"):
    return torch.tensor([step[name] for step in result["losses"]], dtype=torch.float64)


LAYOUTS = [(1, 1), (2, 2), (2, 1), (4, 2)]  # (processes, tensor-parallel size)


def test_layouts_give_the_same_losses_and_match_the_golden_ones(tmp_path, data_prefix):
    runs = {}
    for world_size, tp in LAYOUTS:
        argv = tiny_argv(data_prefix, "--tensor-model-parallel-size", str(tp))
        runs[(world_size, tp)] = train(tmp_path, world_size, argv, f"w{world_size}tp{tp}")
    reference = runs[(1, 1)]
    assert len(reference["losses"]) == 20
    # Clipping (--clip-grad 1.0) is active in the first steps, so the global norm over shards
    # and replicas must be right for the losses to agree.
    assert max(reference["grad_norms"]) > 1.0
    for layout, result in runs.items():
        for name in ("lm loss", "sop loss"):
            torch.testing.assert_close(_column(result, name), _column(reference, name),
                                       rtol=1e-5, atol=0, msg=lambda m: f"{layout} {name}: {m}")
        torch.testing.assert_close(torch.tensor(result["grad_norms"]),
                                   torch.tensor(reference["grad_norms"]), rtol=1e-5, atol=0)

    if os.environ.get("MEGATRON_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({
            "command": "tests/training_utils.py tiny_argv(prefix) at TP=1, dropout off",
            "lm loss": _column(reference).tolist(),
            "sop loss": _column(reference, "sop loss").tolist()}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for name in ("lm loss", "sop loss"):
        # Same torch build, another CPU: kernels may sum in another order; 5e-4 relative is far
        # below what a change of model, data, schedule or optimizer does in 20 steps.
        torch.testing.assert_close(_column(reference, name),
                                   torch.tensor(golden[name], dtype=torch.float64),
                                   rtol=5e-4, atol=0)


def test_gradient_accumulation_equals_a_larger_micro_batch(tmp_path, data_prefix):
    whole = train(tmp_path, 1, tiny_argv(data_prefix, micro_batch_size=8), "whole")
    accumulated = train(tmp_path, 1, tiny_argv(data_prefix, micro_batch_size=2), "acc")
    # The loss is averaged per micro-batch (Megatron's definition), so only the gradient of the
    # first step is identical in expectation; losses track each other closely.
    torch.testing.assert_close(_column(accumulated)[:1], _column(whole)[:1], rtol=2e-2, atol=0)
    assert abs(_column(accumulated)[-1] - _column(whole)[-1]) < 0.2


def test_mlm_loss_goes_down_on_real_text(tmp_path, data_prefix):
    result = train(tmp_path, 1, tiny_argv(data_prefix, train_iters=200, dropout=True), "long")
    lm = _column(result)
    first, last = lm[:10].mean().item(), lm[-10:].mean().item()
    # ln(30522) = 10.3 at the start; 200 steps of the tiny model reach ~6.3 on Shakespeare.
    assert first > 9.5 and last < first - 3.0, (first, last)
    assert result["valid"] and result["valid"][-1][1]["lm loss"] < first - 2.0


@pytest.mark.parametrize("world_size, tp, precision", [(2, 2, []), (1, 1, ["--fp16"])])
def test_resume_is_bit_exact(tmp_path, data_prefix, world_size, tp, precision):
    common = ["--tensor-model-parallel-size", str(tp), *precision]
    if precision:
        common += ["--initial-loss-scale", str(2 ** 20), "--loss-scale-window", "3"]
    straight = train(tmp_path, world_size, tiny_argv(data_prefix, *common, train_iters=12,
                                                      dropout=True), "straight")
    save = str(tmp_path / "ckpt")
    first = train(tmp_path, world_size, tiny_argv(
        data_prefix, *common, "--save", save, "--exit-interval", "5", train_iters=12,
        dropout=True), "first")
    assert first["iteration"] == 5 and first["checkpoint"].endswith("iter_0000005")
    second = train(tmp_path, world_size, tiny_argv(
        data_prefix, *common, "--load", save, "--save", save, train_iters=12, dropout=True),
        "second")
    resumed = first["losses"] + second["losses"]
    assert resumed == straight["losses"]  # bit for bit, every loss
    assert second["loss_scale"] == straight["loss_scale"]
    assert second["skipped"] + first["skipped"] == straight["skipped"]


def test_fp16_loss_scaler_skips_overflowing_steps_then_trains(tmp_path, data_prefix):
    result = train(tmp_path, 1, tiny_argv(
        data_prefix, "--fp16", "--initial-loss-scale", str(2 ** 40), "--hysteresis", "1",
        "--loss-scale-window", "1000", train_iters=30), "fp16")
    # A scale of 2^40 overflows fp16 gradients: those steps are skipped (weights untouched) and
    # the scale halves each time, until the gradients fit; then training proceeds.
    assert 5 <= result["skipped"] < 30
    assert result["loss_scale"] == 2.0 ** (40 - result["skipped"])
    lm = _column(result)
    assert lm[-1] < lm[0] - 0.1


def test_bf16_trains_close_to_fp32(tmp_path, data_prefix):
    fp32 = train(tmp_path, 1, tiny_argv(data_prefix), "fp32")
    bf16 = train(tmp_path, 1, tiny_argv(data_prefix, "--bf16"), "bf16")
    torch.testing.assert_close(_column(bf16), _column(fp32), rtol=2e-2, atol=0)


def _nan_worker(rank, world_size, argv, out):
    module = load_pretrain_bert()
    original = module.loss_func
    calls = {"n": 0}

    def loss_func(*args):
        calls["n"] += 1
        loss, reported = original(*args)
        if calls["n"] == 5:  # first micro-batch of the third iteration (two per iteration)
            loss = loss * float("nan")
            reported = {name: value * float("nan") for name, value in reported.items()}
        return loss, reported

    module.loss_func = loss_func
    try:
        module.main(argv)
    except FloatingPointError as error:
        with open(out, "w") as handle:
            handle.write(str(error))


def test_nan_loss_stops_with_a_clear_error_before_saving(tmp_path, data_prefix):
    save = tmp_path / "ckpt"
    out = tmp_path / "error.txt"
    run_distributed(_nan_worker, 1, tiny_argv(data_prefix, "--save", str(save),
                                              "--save-interval", "1", "--eval-iters", "0"),
                    str(out), timeout=TIMEOUT)
    message = out.read_text()
    assert "lm loss is nan at iteration 3" in message
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert sorted(os.listdir(save)) == ["iter_0000001", "iter_0000002",
                                        "latest_checkpointed_iteration.txt"]


def test_load_of_an_empty_directory_starts_fresh(tmp_path, data_prefix):
    result = train(tmp_path, 1, tiny_argv(data_prefix, "--load", str(tmp_path / "nothing"),
                                          train_iters=2), "fresh")
    assert result["iteration"] == 2 and len(result["losses"]) == 2


def test_loading_another_tensor_parallel_size_names_the_resharding_tool(tmp_path, data_prefix):
    save = str(tmp_path / "tp2")
    train(tmp_path, 2, tiny_argv(data_prefix, "--tensor-model-parallel-size", "2", "--save",
                                 save, train_iters=2), "tp2")
    with pytest.raises(Exception) as error:
        train(tmp_path, 1, tiny_argv(data_prefix, "--load", save, train_iters=4), "tp1")
    text = str(error.value)
    assert "tensor-model-parallel size 2" in text and "uses 1" in text
    assert "tools/checkpoint_util.py --load-dir" in text
    assert "--target-tensor-parallel-size 1" in text


def test_demo_runs_under_torchrun_with_tensor_parallelism(tmp_path):
    env = dict(os.environ, MEGATRON_DEMO_DIR=str(tmp_path / "demo"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "pretrain_bert.py"), "--tensor-model-parallel-size", "2",
           "--train-iters", "40", "--log-interval", "10", "--eval-interval", "20"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path,
                            env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "tensor-model-parallel size 2, data-parallel size 1" in out
    assert len(re.findall(r"^ iteration +\d+/ +40 \|", out, re.M)) == 4, out
    assert out.count("demo: no --data-path given") == 1
    assert "validation loss at iteration 20" in out
    checkpoint = tmp_path / "demo" / "checkpoints"
    assert (checkpoint / "latest_checkpointed_iteration.txt").read_text() == "40"
    assert (checkpoint / "iter_0000040" / "mp_rank_01" / "model_optim_rng.pt").is_file()
    assert f"checkpoint saved in {checkpoint / 'iter_0000040'}" in out


def test_bad_flags_exit_with_a_message_naming_the_value(tmp_path):
    cmd = [sys.executable, str(ROOT / "pretrain_bert.py"), "--num-attention-heads", "3"]
    env = dict(os.environ, MEGATRON_DEMO_DIR=str(tmp_path / "demo"))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert result.returncode == 1
    assert "--hidden-size 128 is not divisible by --num-attention-heads 3" in result.stderr
    assert not (tmp_path / "demo").exists()  # nothing written


def test_tensorboard_scalars_and_the_missing_package_warning(monkeypatch, caplog):
    import argparse
    import logging
    import types

    from megatron.model import BertConfig, BertModel
    from megatron.training import training_log

    written = []

    class FakeWriter:
        def __init__(self, log_dir, max_queue):
            written.append(("init", log_dir, max_queue))

        def add_scalar(self, name, value, step):
            written.append((name, round(float(value), 6), step))

        def close(self):
            written.append(("close",))

    args = argparse.Namespace(
        tensorboard_dir="tb", tensorboard_queue_size=7, tensorboard_log_interval=1,
        num_layers=1, hidden_size=16, seq_length=8, global_batch_size=4, micro_batch_size=4,
        num_micro_batches=1, data_parallel_size=1, tensor_model_parallel_size=1, log_interval=2,
        train_iters=2)
    model = BertModel(BertConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                                 vocab_size=100, max_position_embeddings=8))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = training_log.TrainingLogger(args, model, torch.device("cpu"))
    for iteration in (1, 2):
        log.iteration(iteration, {"lm loss": torch.tensor(5.0 - iteration)}, updated=True,
                      grad_norm=1.5, learning_rate=1e-3, loss_scale=1.0,
                      consumed_samples=4 * iteration)
    log.validation("iteration 2", {"lm loss": 2.0}, 2)
    log.close()
    assert written[0] == ("init", "tb", 7) and written[-1] == ("close",)
    assert ("lm loss", 3.0, 2) in written and ("learning-rate", 0.001, 2) in written
    assert ("grad-norm", 1.5, 1) in written and ("lm loss validation", 2.0, 2) in written
    assert ("lm loss validation ppl", round(math.exp(2.0), 6), 2) in written
    assert any(name == "samples-per-second" for name, *_ in written)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    with caplog.at_level(logging.WARNING):
        log = training_log.TrainingLogger(args, model, torch.device("cpu"))
    assert log.writer is None and "tensorboard is not installed" in caplog.text
