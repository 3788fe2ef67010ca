"""Reliability of pretrain_bert.py under kills, signals, dead or stuck ranks and NaNs.

Each rank is its own process started with torchrun's environment variables, as a scheduler
(Slurm's srun, torchrun's agent) starts them, running ``tests/fault_injection.py``.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron.training import checkpointing
from tests.training_utils import ROOT, preprocess_sample_corpus, tiny_argv

INJECT = ROOT / "tests" / "fault_injection.py"
TIMEOUT = 180


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return preprocess_sample_corpus(tmp_path_factory.mktemp("corpus"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Job:
    """``world_size`` rank processes of ``tests/fault_injection.py``, logs under ``directory``."""

    def __init__(self, directory: Path, world_size: int, argv, name: str = "job", **fault):
        self.directory, self.name = directory, name
        port = _free_port()
        self.result = directory / f"{name}-result.json"
        self.procs, self.logs = [], []
        for rank in range(world_size):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                       OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FAULT_RESULT=str(self.result),
                       **{f"FAULT_{key.upper()}": str(value) for key, value in fault.items()})
            log = directory / f"{name}-rank{rank}.log"
            self.logs.append(log)
            with open(log, "w") as handle:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(INJECT), *argv], env=env, stdout=handle,
                    stderr=subprocess.STDOUT, cwd=directory))

    def wait(self, timeout: float = TIMEOUT):
        """Exit codes of every rank (killing them all if they run past ``timeout``)."""
        deadline = time.monotonic() + timeout
        try:
            return [proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                    for proc in self.procs]
        finally:
            self.kill()

    def kill(self, sig=signal.SIGKILL) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    def log(self, rank: int = 0) -> str:
        return self.logs[rank].read_text()

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(0):
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                raise AssertionError(f"{text!r} never appeared:\n{self.log(0)[-3000:]}")
            time.sleep(0.05)

    def output(self) -> dict:
        return json.loads(self.result.read_text())


def _tp2(data_prefix, *extra, **kwargs):
    return tiny_argv(data_prefix, "--tensor-model-parallel-size", "2", "--log-interval", "1",
                     *extra, **kwargs)


def _check_every_shard_loads(save: Path) -> int:
    iteration, release, directory = checkpointing.find_checkpoint(str(save))
    for rank in range(2):
        relative = f"mp_rank_{rank:02d}/model_optim_rng.pt"
        assert checkpointing.verify_checkpoint_file(directory, relative)
        state = torch.load(os.path.join(directory, relative), map_location="cpu",
                           weights_only=False)
        assert state["iteration"] == iteration and "optimizer" in state
    return iteration


def test_kill_9_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path, data_prefix):
    save = tmp_path / "ckpt"
    moments = random.Random(1234)
    seen = set()
    for trial in range(4):
        job = Job(tmp_path, 2, _tp2(data_prefix, "--save", str(save), "--save-interval", "1",
                                    "--eval-iters", "0", train_iters=400), f"trial{trial}")
        # Up to the first save (so there is always something to check), then a random moment:
        # mid-iteration, mid-save or between the renames of a save.
        job.wait_for("saved checkpoint at iteration")
        time.sleep(moments.uniform(0.0, 1.5))
        job.kill()  # the whole job at once, as a node failure
        job.wait()
        seen.add(_check_every_shard_loads(save))
        leftovers = [name for name in os.listdir(save) if name.endswith(".tmp")]
        assert len(leftovers) <= 1  # at most the staging directory of the interrupted save
    assert len(seen) >= 2, f"the kills all landed at iteration {seen}"
    # Resuming works, from the checkpoint the tracker names. A kill between a save's directory
    # rename and its tracker update leaves one complete iteration newer than the tracker; the
    # resumed run saves that iteration again, over it.
    last = int((save / "latest_checkpointed_iteration.txt").read_text())
    newest = max(checkpointing.list_checkpoints(str(save)))
    assert newest in (last, last + 1), (last, newest)
    job = Job(tmp_path, 2, _tp2(data_prefix, "--load", str(save), "--save", str(save),
                                "--save-interval", "1", "--eval-iters", "0",
                                "--use-checkpoint-opt_param-scheduler", train_iters=last + 2),
              "resume")
    assert job.wait() == [0, 0], job.log(0)[-3000:]
    assert job.output()["iteration"] == last + 2
    assert f"resuming from {save} at iteration {last}" in job.log(0)
    assert _check_every_shard_loads(save) == last + 2
    assert checkpointing.list_checkpoints(str(save))[-2:] == [last + 1, last + 2]


def test_sigterm_saves_the_current_iteration_exits_0_and_resumes_exactly(tmp_path, data_prefix):
    save = tmp_path / "ckpt"
    common = ("--exit-signal-handler", "--eval-iters", "0")
    # One schedule for all three runs (400 iterations); the straight and resumed ones stop at 40.
    straight = Job(tmp_path, 2, _tp2(data_prefix, *common, "--exit-interval", "40",
                                     train_iters=400, dropout=True), "straight")
    assert straight.wait() == [0, 0], straight.log(0)[-3000:]
    job = Job(tmp_path, 2, _tp2(data_prefix, *common, "--save", str(save), train_iters=400,
                                dropout=True), "signalled")
    job.wait_for(" iteration        4/")
    job.kill(signal.SIGTERM)  # every rank, as Slurm does before it kills a job
    assert job.wait() == [0, 0], job.log(0)[-3000:]
    first = job.output()
    stopped = first["iteration"]
    assert first["exit_reason"] == "signal SIGTERM" and 4 <= stopped < 40
    assert first["checkpoint"].endswith(f"iter_{stopped:07d}")
    assert int((save / "latest_checkpointed_iteration.txt").read_text()) == stopped
    resumed = Job(tmp_path, 2, _tp2(data_prefix, *common, "--load", str(save), "--exit-interval",
                                    "40", train_iters=400, dropout=True), "resumed")
    assert resumed.wait() == [0, 0], resumed.log(0)[-3000:]
    assert first["losses"] + resumed.output()["losses"] == straight.output()["losses"]


@pytest.mark.parametrize("kind", ["sigkill", "hang"])
def test_a_dead_or_stuck_rank_makes_the_others_exit_within_the_timeout(tmp_path, data_prefix,
                                                                        kind):
    timeout_minutes = 0.1  # 6 s
    job = Job(tmp_path, 2, _tp2(data_prefix, "--distributed-timeout-minutes",
                                str(timeout_minutes), train_iters=50),
              kind, kind=kind, rank=1, iteration=3)
    job.wait_for(" iteration        2/")
    start = time.monotonic()
    code = job.procs[0].wait(timeout=timeout_minutes * 60 + 60)
    elapsed = time.monotonic() - start
    print(f"{kind}: rank 0 exited {elapsed:.1f} s after iteration 2 was logged")  # -s shows it
    job.kill()
    out = job.log(0)
    assert code == 1, out[-3000:]
    assert elapsed < timeout_minutes * 60 + 30, elapsed
    assert "pretrain_bert.py: error: rank 1 vanished or stopped responding; rank 0 of 2 stops" \
        in out, out[-3000:]
    assert "Traceback" not in out


def test_nan_gradient_stops_with_the_iteration_named_and_nothing_saved_after(tmp_path,
                                                                           data_prefix):
    save = tmp_path / "ckpt"
    job = Job(tmp_path, 2, _tp2(data_prefix, "--save", str(save), "--save-interval", "1",
                                "--eval-iters", "0"), "nan", kind="nan_grad", iteration=4)
    assert job.wait() == [1, 1]
    out = job.log(0)
    assert "pretrain_bert.py: error: gradient norm is nan: the gradients are not finite; " \
        "stopping before the weights are updated (iteration 4)" in out, out[-3000:]
    assert "Traceback" not in out
    assert checkpointing.list_checkpoints(str(save)) == [1, 2, 3]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"


def test_sustained_fp16_overflow_stops_with_the_loss_scale_message(tmp_path, data_prefix):
    save = tmp_path / "ckpt"
    job = Job(tmp_path, 1, tiny_argv(data_prefix, "--fp16", "--save", str(save),
                                     "--save-interval", "2", "--eval-iters", "0",
                                     "--max-consecutive-skipped-iterations", "6",
                                     "--initial-loss-scale", "65536", "--log-interval", "1"),
              "overflow", kind="overflow", iteration=3)
    assert job.wait() == [1]
    out = job.log(0)
    assert "pretrain_bert.py: error: loss-scale collapse: 6 iterations in a row (up to " \
        "iteration 8) had inf/NaN gradients and were skipped; the loss scale is now 2048" \
        in out, out[-3000:]
    assert "Traceback" not in out
    # Hysteresis 2: the first overflow keeps 65536, then each halves it (2048 after the 6th).
    # Skipped iterations 3..7 were saved at 4 and 6 (they changed nothing); 8 was not.
    assert checkpointing.list_checkpoints(str(save)) == [2, 4, 6]


def _build_mapping(args):
    prefix, cache_dir, seed = args
    from megatron.data.indexed_dataset import make_dataset
    from megatron.data.samples_mapping import get_samples_mapping

    indexed = make_dataset(prefix, "mmap", skip_warmup=True)
    mapping = get_samples_mapping(indexed, prefix, None, 20000, 61, 0.1, seed, "train", True,
                                  cache_dir=cache_dir)
    return bytes(memoryview(mapping.tobytes()))


def test_jobs_building_the_same_cache_at_once_do_not_corrupt_it(tmp_path, data_prefix):
    import multiprocessing

    import numpy as np

    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        pool.map(_build_mapping, [(data_prefix, "", 7)] * 4)  # imports done, no cache written
        for round_ in range(3):  # three fresh races of four builders
            cache = tmp_path / f"cache{round_}"
            cache.mkdir()
            built = pool.map(_build_mapping, [(data_prefix, str(cache), 7 + round_)] * 4,
                             chunksize=1)
            assert len(set(built)) == 1
            files = os.listdir(cache)
            assert len(files) == 1 and files[0].endswith(".npy"), files  # no temporary left
            assert np.load(cache / files[0]).tobytes() == built[0]
