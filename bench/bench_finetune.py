"""Finetuning and evaluation speed of ``tasks/main.py`` against Hugging Face; prints JSON.

For SST-2 (``MegatronBertForSequenceClassification``) and RACE (``MegatronBertForMultipleChoice``)
the script times, alternating round by round so that drift on the machine affects all alike:

- **ours**: the real finetuning loop, ``tasks.main.main(argv)`` in this process (TP=1, 2
  threads) or in two processes pinned to one core each (TP=2, gloo), from random
  initialisation: batching, the forward and loss, ``MegatronOptimizer`` (fused AdamW, gradient
  clipping), the schedule and logging. ``megatron.training.training.train_step`` is wrapped to
  note when iterations start: after ``warmup`` iterations the window of ``iters`` iterations is
  timed (``--exit-interval`` stops the run one iteration later). Then an ``--epochs 0`` run of
  the same command times the evaluation over the dev sets through ``tasks.eval_utils.predict``.
- **hf**: the Hugging Face model of the same shape on the same micro-batches (the loop's epoch-0
  order) padded to the sequence length, as Hugging Face's ``run_glue.py`` pads by default
  (``pad_to_max_length``); one step = forward with labels, backward, ``clip_grad_norm_(1.0)`` and
  ``torch.optim.AdamW(fused=True)``, as ``Trainer`` does; evaluation = ``no_grad`` forward over
  the same dev batches.
- **hf_dynamic_padding**: the same, on batches cut after their longest sample, as our loop cuts
  them (``TaskDataset.batch``): the model against the model, with the padding saving on both.

Model: hidden 256 x 4 layers, 4 heads, vocabulary 30522, dropout 0.1, fp32 on the CPU. SST-2:
batch 32 x seq 64; RACE: batch 4 questions x 4 choices x seq 128 (2,048 tokens per step each).
Data: the repository's fixtures (``tests/assets``: real SST-2 snippets, RACE-layout passages),
repeated to fill the window. The texts matter: with dynamic padding a batch costs what its
longest text needs (SST-2 snippets are short; RACE passages fill the sequence).

Reported per task: median step ms and samples/s for each side and layout, eval samples/s, and
``ours_tpN_over_hf[_dynamic_padding][_eval]`` = median over rounds of the per-round ratio of step
(evaluation) times; the target is ``ours_tp1_over_hf`` <= 0.9.

Usage: ``python bench/bench_finetune.py [--tasks sst2,race] [--rounds 3]``.
"""

import argparse
import contextlib
import datetime
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron.tokenizer import build_tokenizer  # noqa: E402
from megatron.training import training  # noqa: E402
from megatron.training.utils import configure_console  # noqa: E402
from tasks import eval_utils  # noqa: E402
from tasks.finetune_utils import epoch_micro_batches  # noqa: E402

logger = logging.getLogger("bench_finetune")

GLUE = ROOT / "tests" / "assets" / "glue"
RACE = ROOT / "tests" / "assets" / "race"
VOCAB_FILE = ROOT / "data" / "bert-large-uncased-vocab.txt"
SHAPE = dict(layers=4, hidden=256, heads=4, vocab=30522, positions=512)
TASKS = {
    "sst2": dict(task="SST-2", batch=32, seq=64, repeat=4),
    "race": dict(task="RACE", batch=4, seq=128, repeat=4),
}
TARGET = 0.9
SEED = 1234


def task_data(name: str, directory: str):
    """``(train paths, valid paths)``: the fixtures, repeated ``repeat`` times."""
    spec = TASKS[name]
    if spec["task"] == "RACE":
        return [str(RACE / "train")] * spec["repeat"], [str(RACE / "dev")] * spec["repeat"]
    paths = []
    for split in ("train", "dev"):
        lines = (GLUE / "SST-2" / f"{split}.tsv").read_text().split("\n")
        rows = [line for line in lines[1:] if line] * spec["repeat"]
        path = os.path.join(directory, f"{split}.tsv")
        Path(path).write_text("\n".join([lines[0], *rows]) + "\n")
        paths.append([path])
    return paths[0], paths[1]


def loop_argv(name: str, train, valid, tp: int, warmup: int, iters: int):
    spec = TASKS[name]
    return ["--task", spec["task"], "--train-data", *train, "--valid-data", *valid,
            "--num-layers", str(SHAPE["layers"]), "--hidden-size", str(SHAPE["hidden"]),
            "--num-attention-heads", str(SHAPE["heads"]),
            "--max-position-embeddings", str(SHAPE["positions"]),
            "--vocab-file", str(VOCAB_FILE), "--tokenizer-type", "BertWordPieceLowerCase",
            "--seq-length", str(spec["seq"]), "--micro-batch-size", str(spec["batch"]),
            "--epochs", "1", "--exit-interval", str(warmup + iters + 1), "--lr", "1e-4",
            "--lr-warmup-fraction", "0.01", "--log-interval", str(iters),
            "--eval-interval", "1000000000", "--tensor-model-parallel-size", str(tp),
            "--distributed-backend", "gloo", "--seed", str(SEED)]


class LoopClock:
    """Times the loop's iterations ``first .. first + count - 1`` and its evaluations."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count
        self.calls, self.marks = 0, []
        self.eval_seconds, self.eval_samples = 0.0, 0

    def _step(self, *args, **kwargs):
        self.calls += 1
        if self.calls in (self.first, self.first + self.count):
            self.marks.append(time.perf_counter())
        return self.original_step(*args, **kwargs)

    def _predict(self, model, dataset, **kwargs):
        start = time.perf_counter()
        outputs = self.original_predict(model, dataset, **kwargs)
        self.eval_seconds += time.perf_counter() - start
        self.eval_samples += len(dataset)
        return outputs

    @contextlib.contextmanager
    def active(self):
        self.original_step, self.original_predict = training.train_step, eval_utils.predict
        training.train_step, eval_utils.predict = self._step, self._predict
        try:
            yield self
        finally:
            training.train_step, eval_utils.predict = self.original_step, self.original_predict

    def result(self) -> dict:
        if len(self.marks) != 2:
            raise RuntimeError(f"the loop ran {self.calls} iterations; the clock needs "
                               f"{self.first + self.count}")
        return {"step_s": (self.marks[1] - self.marks[0]) / self.count,
                "eval_s": self.eval_seconds, "eval_samples": self.eval_samples}


def run_loop(argv, warmup: int, iters: int) -> dict:
    """Time the training window of ``argv``, then its evaluation in an ``--epochs 0`` run.

    ``--exit-interval`` ends the training run without its final evaluation, so the evaluation is
    timed in a second run that only evaluates (same model shape, same dev sets).
    """
    from tasks.main import main

    clock = LoopClock(warmup + 1, iters)
    with clock.active():
        main(argv)
        eval_argv = list(argv)
        eval_argv[eval_argv.index("--epochs") + 1] = "0"
        main(eval_argv)
    return clock.result()


def _tp2_worker(rank: int, port: int, argv, warmup: int, iters: int, out: str) -> None:
    os.sched_setaffinity(0, {rank % os.cpu_count()})
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    logging.basicConfig(level=logging.WARNING)
    configure_console(sys.stderr)
    import torch.distributed as dist

    from megatron import mpu

    result = run_loop(argv, warmup, iters)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()  # neither rank leaves while the other still talks to it
    mpu.destroy_model_parallel()
    dist.destroy_process_group()


def run_loop_tp2(argv, warmup: int, iters: int, directory: str) -> dict:
    """The loop at TP=2: two processes, one core and one thread each."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    port = store.port
    del store  # only to find a free port
    out = os.path.join(directory, "tp2.json")
    mp.start_processes(_tp2_worker, args=(port, argv, warmup, iters, out), nprocs=2,
                       start_method="spawn")
    return json.loads(Path(out).read_text())


def build_hf(name: str):
    """``(model, train step, eval step)`` of the Hugging Face model for the task."""
    import transformers

    config = transformers.MegatronBertConfig(
        vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"],
        num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
        intermediate_size=4 * SHAPE["hidden"], max_position_embeddings=SHAPE["positions"],
        num_labels=2)
    torch.manual_seed(SEED)
    kind = (transformers.MegatronBertForMultipleChoice if TASKS[name]["task"] == "RACE"
            else transformers.MegatronBertForSequenceClassification)
    model = kind(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

    def inputs(batch):
        return dict(input_ids=batch["text"], attention_mask=batch["padding_mask"],
                    token_type_ids=batch["types"])

    def step(batch):
        loss = model(**inputs(batch), labels=batch["label"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    @torch.no_grad()
    def evaluate(batch):
        model.eval()
        try:
            return model(**inputs(batch)).logits
        finally:
            model.train()

    return model, step, evaluate


def hf_batches(name: str, train, valid, warmup: int, iters: int, trim: bool):
    """The loop's first ``warmup + iters`` micro-batches and the dev batches.

    ``trim``: cut each batch after its longest sample, as the loop does; else padded to the
    sequence length, as Hugging Face's ``run_glue.py`` does by default (``pad_to_max_length``).
    """
    from tasks.main import _task_module

    spec = TASKS[name]
    module = _task_module(spec["task"])
    tokenizer = build_tokenizer("BertWordPieceLowerCase", vocab_file=str(VOCAB_FILE))
    train_set = module.build_dataset(spec["task"], train, tokenizer, spec["seq"])
    device = torch.device("cpu")
    order = epoch_micro_batches(len(train_set), epoch=0, seed=SEED,
                                global_batch_size=spec["batch"], micro_batch_size=spec["batch"],
                                data_parallel_rank=0, data_parallel_size=1)
    batches = [train_set.batch(next(order), device, trim) for _ in range(warmup + iters)]
    dev = [module.build_dataset(spec["task"], [path], tokenizer, spec["seq"]) for path in valid]
    dev_batches = [d.batch(list(range(start, min(start + spec["batch"], len(d)))), device, trim)
                   for d in dev for start in range(0, len(d), spec["batch"])]
    return batches, dev_batches, sum(len(d) for d in dev)


def time_hf(step, evaluate, batches, dev_batches, warmup: int) -> dict:
    for batch in batches[:warmup]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    step_s = (time.perf_counter() - start) / (len(batches) - warmup)
    start = time.perf_counter()
    for batch in dev_batches:
        evaluate(batch)
    return {"step_s": step_s, "eval_s": time.perf_counter() - start}


def summarize(runs, batch: int, eval_samples: int) -> dict:
    step = statistics.median(run["step_s"] for run in runs)
    evaluation = statistics.median(run["eval_s"] for run in runs)
    return {"step_ms": round(step * 1e3, 1), "train_samples_per_s": round(batch / step, 1),
            "eval_samples_per_s": round(eval_samples / evaluation, 1),
            "rounds_step_ms": [round(run["step_s"] * 1e3, 1) for run in runs]}


def bench_task(name: str, rounds: int, warmup: int, iters: int, threads: int) -> dict:
    spec = TASKS[name]
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        train, valid = task_data(name, tmp)
        argvs = {tp: loop_argv(name, train, valid, tp, warmup, iters) for tp in (1, 2)}
        data = {trim: hf_batches(name, train, valid, warmup, iters, trim)
                for trim in (False, True)}
        eval_samples = data[False][2]
        _, hf_step, hf_eval = build_hf(name)
        runs = {"ours_tp1": [], "ours_tp2": [], "hf": [], "hf_dynamic_padding": []}
        for r in range(rounds):
            order = ("ours_tp1", "hf", "hf_dynamic_padding", "ours_tp2")
            for kind in order if r % 2 == 0 else order[::-1]:
                torch.set_num_threads(threads)
                if kind.startswith("hf"):
                    batches, dev_batches, _ = data[kind == "hf_dynamic_padding"]
                    runs[kind].append(time_hf(hf_step, hf_eval, batches, dev_batches, warmup))
                elif kind == "ours_tp1":
                    runs[kind].append(run_loop(argvs[1], warmup, iters))
                else:
                    runs[kind].append(run_loop_tp2(argvs[2], warmup, iters, tmp))
            logger.info("%s round %d: %s", name, r, {k: round(v[-1]["step_s"] * 1e3, 1)
                                                     for k, v in runs.items()})
    result = {"task": spec["task"], "batch": spec["batch"], "seq_length": spec["seq"],
              "tokens_per_step": spec["batch"] * spec["seq"] * (4 if name == "race" else 1),
              "eval_samples": eval_samples}
    for kind, values in runs.items():
        result[kind] = summarize(values, spec["batch"], eval_samples)
    for tp in (1, 2):
        for reference in ("hf", "hf_dynamic_padding"):
            pairs = list(zip(runs[f"ours_tp{tp}"], runs[reference]))
            result[f"ours_tp{tp}_over_{reference}"] = round(statistics.median(
                o["step_s"] / h["step_s"] for o, h in pairs), 3)
            result[f"ours_tp{tp}_over_{reference}_eval"] = round(statistics.median(
                o["eval_s"] / h["eval_s"] for o, h in pairs), 3)
    result["meets_target"] = result["ours_tp1_over_hf"] <= TARGET
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="sst2,race", help="comma-separated: sst2, race")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    names = [name for name in args.tasks.split(",") if name]
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        parser.error(f"unknown --tasks {unknown}; choose from {sorted(TASKS)}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    configure_console(sys.stderr)  # the loop's lines; stdout carries only the JSON
    torch.set_num_threads(args.threads)
    out = {"torch": torch.__version__, "threads": args.threads, "shape": SHAPE,
           "rounds": args.rounds, "warmup_iterations": args.warmup,
           "timed_iterations": args.iters, "target_ours_over_hf": TARGET}
    for name in names:
        out[name] = bench_task(name, args.rounds, args.warmup, args.iters, args.threads)
    out["target_met"] = all(out[name]["meets_target"] for name in names)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
