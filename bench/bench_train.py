"""Steady-state speed of ``pretrain_bert.py``'s training loop vs the bare step; prints JSON.

For each configuration the script runs the real training loop, ``pretrain_bert.main(argv)`` in
this process on the tokenized Shakespeare sample of ``data/`` (real MLM masking), and the bare
training step of ``bench/bench_model.py`` (forward, backward, ``torch.optim.AdamW(fused=True)``)
for the same model, alternating the two round by round so that drift on the machine affects
both alike. The difference is the cost of the training loop itself: data loading and
collation, loss averaging, the finiteness check, gradient clipping, the loss scaler, the learning-
rate scheduler and logging. The target is an overhead under 5% on the CPU configurations.

- ``tiny``: bench_model's ``small`` shape, hidden 256 x 4 layers, 4 heads; ``base``: BERT-base,
  hidden 768 x 12 layers, 12 heads. Both batch 8 x seq 128, vocabulary 30522, dropout 0.1,
  sentence-order head, fp32 on the CPU (``--threads`` threads).
- ``345m`` (``--gpu``, CUDA only): BERT-345M, hidden 1024 x 24 layers, 16 heads, batch 8 x
  seq 512, bf16; reports tokens/s and MFU against the GPU's dense bf16 peak (``--peak-tflops``,
  else a table of known GPUs) and the bf16 matmul peak measured in the same run. Its bare step
  updates bf16 parameters in place while the loop keeps fp32 master weights, so its overhead
  includes the master-weight traffic; it is reported but not part of the CPU target.

Loop timing: ``megatron.training.training.train_step`` (looked up by ``_train`` once per
iteration) is wrapped to note when iterations start. After ``warmup`` iterations, the window
from the start of one iteration to the start of the iteration ``iters`` later holds everything
the loop does for those iterations, logging included (``iters`` is a multiple of
``--log-interval``, so every window has the same number of log lines). One extra iteration closes
the window; evaluation is off and nothing is saved. Each round runs a fresh ``main()`` (the model
is rebuilt; start-up and warm-up are outside the window).

Bare timing: the same micro-batches the loop's window consumed (captured from the first loop
run; every run reads the same samples in the same order), already on the device, through
bench_model's step, ``iters`` steps per round after warm-up.

Reported per configuration: median ms/iteration, samples/s and tokens/s over rounds for both,
``overhead`` = median over rounds of loop/bare - 1, and ``meets_target`` (overhead < 0.05).

Usage: ``python bench/bench_train.py [--configs tiny,base] [--rounds N] [--iters N] [--gpu]``.
"""

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:  # megatron, when run as ``python bench/bench_train.py``
    sys.path.insert(0, str(ROOT))

from megatron import mpu  # noqa: E402
from megatron.training import training  # noqa: E402
from megatron.training.utils import configure_console  # noqa: E402

logger = logging.getLogger("bench_train")

CORPUS = ROOT / "data" / "shakespeare_tiny.jsonl"
VOCAB_FILE = ROOT / "data" / "bert-large-uncased-vocab.txt"
OVERHEAD_TARGET = 0.05


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One configuration: a bench_model shape and how to run and time it.

    Attributes:
        shape: key of ``bench_model.CONFIGS`` (layers, hidden, heads, seq, batch).
        device: ``cpu`` (gloo, fp32) or ``cuda`` (nccl, bf16).
        warmup: untimed iterations before the window, per round.
        iters: iterations in the timed window (a multiple of the log interval).
        rounds: alternating (loop, bare) rounds.
        num_workers: ``--num-workers`` values of the loop; the first is the one held to the
            target, the others are reported beside it.
    """

    shape: str
    device: str
    warmup: int
    iters: int
    rounds: int
    num_workers: Tuple[int, ...]


CONFIGS = {
    "tiny": BenchConfig("small", "cpu", warmup=3, iters=20, rounds=5, num_workers=(0, 2)),
    "base": BenchConfig("base", "cpu", warmup=2, iters=10, rounds=3, num_workers=(0,)),
    "345m": BenchConfig("345m", "cuda", warmup=5, iters=20, rounds=5, num_workers=(2, 0)),
}

# Dense bf16 tensor-core peaks (no sparsity), most specific name first.
NOMINAL_BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
                            ("H200", 989.4), ("A100", 312.0))


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tokenize_corpus(directory: str) -> str:
    """Tokenize the Shakespeare sample into ``directory``; return the ``--data-path`` prefix."""
    from megatron.data.preprocess import PreprocessConfig, preprocess

    prefix = os.path.join(directory, "shakespeare")
    preprocess(PreprocessConfig(input=str(CORPUS), output_prefix=prefix,
                                tokenizer_type="BertWordPieceLowerCase",
                                vocab_file=str(VOCAB_FILE), split_sentences=True))
    return prefix + "_text_sentence"


def loop_argv(shape: dict, config: BenchConfig, data_prefix: str, num_workers: int,
              log_interval: int) -> List[str]:
    """``pretrain_bert.py`` flags for the shape of bench_model's bare step."""
    argv = [
        "--num-layers", str(shape["layers"]), "--hidden-size", str(shape["hidden"]),
        "--num-attention-heads", str(shape["heads"]), "--seq-length", str(shape["seq"]),
        "--max-position-embeddings", str(max(512, shape["seq"])),  # as bench_model's model
        "--micro-batch-size", str(shape["batch"]), "--global-batch-size", str(shape["batch"]),
        "--train-iters", str(config.warmup + config.iters + 1),
        "--lr", "1e-4", "--min-lr", "1e-5", "--lr-warmup-iters", "1",
        "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
        "--data-path", data_prefix, "--split", "949,50,1", "--vocab-file", str(VOCAB_FILE),
        "--tokenizer-type", "BertWordPieceLowerCase", "--num-workers", str(num_workers),
        "--log-interval", str(log_interval), "--eval-interval", "1000000", "--eval-iters", "0",
        "--distributed-backend", "nccl" if config.device == "cuda" else "gloo", "--seed", "1234",
    ]
    return argv + (["--bf16"] if config.device == "cuda" else [])


class IterationClock:
    """Times iterations ``first .. first + count - 1`` of ``pretrain``'s loop from inside it.

    While active, ``megatron.training.training.train_step`` is wrapped: the wrapper notes the
    time (after a device sync) when iterations ``first`` and ``first + count`` start and does
    nothing else, so the loop between the marks runs exactly as in training.
    """

    def __init__(self, first: int, count: int, device: torch.device) -> None:
        self.first, self.count, self.device = first, count, device
        self.calls = 0
        self.marks: List[float] = []
        self._original = None

    def __enter__(self) -> "IterationClock":
        self._original = training.train_step
        training.train_step = self._timed
        return self

    def __exit__(self, *exc) -> None:
        training.train_step = self._original

    def _timed(self, *args, **kwargs):
        self.calls += 1
        if self.calls in (self.first, self.first + self.count):
            _sync(self.device)
            self.marks.append(time.perf_counter())
        return self._original(*args, **kwargs)

    def seconds_per_iteration(self) -> float:
        if len(self.marks) != 2:
            raise RuntimeError(f"the loop ran {self.calls} iterations; the clock needs "
                               f"{self.first + self.count}")
        return (self.marks[1] - self.marks[0]) / self.count


@contextlib.contextmanager
def capturing_batches(pretrain_bert, store: Optional[list], limit: int):
    """Keep the first ``limit`` micro-batches ``pretrain_bert.get_batch`` returns in ``store``."""
    if store is None:
        yield
        return
    original = pretrain_bert.get_batch

    def get_batch(data_iterator, device):
        batch = original(data_iterator, device)
        if len(store) < limit:
            store.append(batch)
        return batch

    pretrain_bert.get_batch = get_batch
    try:
        yield
    finally:
        pretrain_bert.get_batch = original


def time_loop(pretrain_bert, argv: List[str], config: BenchConfig, device: torch.device,
              capture: Optional[list] = None) -> float:
    """Seconds per iteration of ``pretrain_bert.main(argv)`` in its timed window."""
    clock = IterationClock(config.warmup + 1, config.iters, device)
    with clock, capturing_batches(pretrain_bert, capture, config.warmup + config.iters):
        result = pretrain_bert.main(argv)
    if result.iteration != config.warmup + config.iters + 1:
        raise RuntimeError(f"the loop stopped at iteration {result.iteration}")
    del result
    gc.collect()  # the model and optimizer of this run, before the next one is built
    return clock.seconds_per_iteration()


def bare_batch(captured: tuple) -> Dict[str, torch.Tensor]:
    """A micro-batch of ``pretrain_bert.get_batch`` in bench_model's step's format."""
    tokens, types, sentence_order, loss_mask, labels, padding_mask = captured
    return dict(ids=tokens, attention_mask=padding_mask, tokentype=types, loss_mask=loss_mask,
                labels=labels, sop=sentence_order.view(-1))


def time_bare(step, warmup_batches: list, batches: list, device: torch.device) -> float:
    """Seconds per bench_model step over ``batches``, after a step on each warm-up batch."""
    for batch in warmup_batches:
        step(batch)
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        loss = step(batch)
    _sync(device)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the bare step's loss is {float(loss)}")
    return elapsed / len(batches)


def use_backend(backend: str) -> None:
    """Tear down a process group of another backend, so the next ``main()`` makes its own."""
    if dist.is_initialized() and dist.get_backend() != backend:
        mpu.destroy_model_parallel()
        dist.destroy_process_group()


def nominal_peak_flops(device: torch.device) -> Optional[float]:
    name = torch.cuda.get_device_name(device)
    for key, tflops in NOMINAL_BF16_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def summarize(seconds: List[float], shape: dict, flops: float,
              peaks: Dict[str, float]) -> dict:
    median = statistics.median(seconds)
    out = {"ms_per_iteration": round(median * 1e3, 2),
           "samples_per_s": round(shape["batch"] / median, 2),
           "tokens_per_s": round(shape["batch"] * shape["seq"] / median, 1),
           "model_tflops": round(flops / median / 1e12, 4),
           "rounds_ms": [round(s * 1e3, 2) for s in seconds]}
    for name, peak in peaks.items():
        out[name] = round(flops / median / peak, 4)
    return out


def compare(loop: List[float], bare: List[float]) -> dict:
    """Overhead of the loop over the bare step: the median of the per-round ratios, minus 1."""
    overhead = statistics.median(t / b for t, b in zip(loop, bare)) - 1.0
    return {"overhead": round(overhead, 4),
            "overhead_of_medians": round(statistics.median(loop) / statistics.median(bare) - 1, 4),
            "meets_target": overhead < OVERHEAD_TARGET}


def bench_config(config: BenchConfig, bench_model, pretrain_bert, data_prefix: str,
                 log_interval: int, peaks: Dict[str, float]) -> dict:
    """Alternate loop runs and bare steps for ``config``; its JSON section."""
    shape = bench_model.CONFIGS[config.shape]
    device = torch.device(config.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    use_backend("nccl" if device.type == "cuda" else "gloo")
    argvs = {workers: loop_argv(shape, config, data_prefix, workers, log_interval)
             for workers in config.num_workers}
    captured: list = []  # the loop's micro-batches, filled by the first loop run
    loop_times: Dict[int, List[float]] = {workers: [] for workers in config.num_workers}
    bare_times: List[float] = []
    model = step = None
    for r in range(config.rounds):
        for kind in ("loop", "bare") if r % 2 == 0 else ("bare", "loop"):
            if kind == "loop":
                for workers, argv in argvs.items():
                    loop_times[workers].append(time_loop(pretrain_bert, argv, config, device,
                                                         None if captured else captured))
                continue
            batches = [bare_batch(b) for b in captured]
            warmup = batches[:config.warmup] if step is None else batches[:1]
            if step is None:
                model, step = bench_model.build_ours(shape, device, dtype)
            bare_times.append(time_bare(step, warmup, batches[config.warmup:], device))
        logger.info("%s round %d: loop %s ms, bare %.1f ms", config.shape, r,
                    ", ".join(f"{times[-1] * 1e3:.1f}" for times in loop_times.values()),
                    bare_times[-1] * 1e3)
    num_params = sum(p.numel() for p in model.parameters())
    del model, step
    gc.collect()
    flops = bench_model.model_flops_per_step(shape, num_params)
    window = captured[config.warmup:]
    primary = config.num_workers[0]
    result = {
        "shape": shape, "params": num_params, "model_flops_per_step": flops,
        "rounds": config.rounds, "warmup_iterations": config.warmup,
        "timed_iterations": config.iters,
        "loop_argv": " ".join(a if a != data_prefix else "<tokenized data/shakespeare_tiny>"
                              for a in argvs[primary]),
        "masked_positions_per_sample": round(statistics.mean(
            float(b[3].sum(1).float().mean()) for b in window), 2),
        "padding_fraction": round(statistics.mean(
            1.0 - float(b[5].float().mean()) for b in window), 4),
        "loop": dict(num_workers=primary,
                     **summarize(loop_times[primary], shape, flops, peaks)),
        "bare": summarize(bare_times, shape, flops, peaks),
        **compare(loop_times[primary], bare_times),
    }
    for workers in config.num_workers[1:]:
        result[f"loop_num_workers_{workers}"] = dict(
            **summarize(loop_times[workers], shape, flops, peaks),
            **compare(loop_times[workers], bare_times))
    return result


def device_peaks(bench_model, device: torch.device,
                 peak_tflops: Optional[float]) -> Tuple[dict, dict]:
    """``({fraction name: peak FLOP/s}, {JSON fields})`` for a CUDA device in bf16."""
    measured = bench_model.matmul_peak_flops(device, torch.bfloat16)
    nominal = peak_tflops * 1e12 if peak_tflops else nominal_peak_flops(device)
    peaks = {"fraction_of_matmul_peak": measured}
    info = {"gpu": torch.cuda.get_device_name(device),
            "bf16_matmul_peak_tflops": round(measured / 1e12, 1)}
    if nominal:
        peaks["mfu"] = nominal
        info["bf16_nominal_peak_tflops"] = round(nominal / 1e12, 1)
    return peaks, info


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,base",
                        help=f"comma-separated, of {sorted(CONFIGS)} (default: tiny,base)")
    parser.add_argument("--gpu", action="store_true", help="also time BERT-345M on CUDA, bf16")
    parser.add_argument("--rounds", type=int, default=None, help="override every config's")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed iterations per round (a multiple of --log-interval)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations per round")
    parser.add_argument("--num-workers", default=None,
                        help="comma-separated loop --num-workers values (first one is targeted)")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: known GPUs)")
    args = parser.parse_args(argv)
    names = [name for name in args.configs.split(",") if name]
    if args.gpu and "345m" not in names:
        names.append("345m")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {sorted(CONFIGS)}")
    if any(CONFIGS[n].device == "cuda" for n in names) and not torch.cuda.is_available():
        parser.error("345m needs CUDA, which is not available")
    overrides = {key: getattr(args, key) for key in ("rounds", "iters", "warmup")
                 if getattr(args, key) is not None}
    if args.num_workers is not None:
        overrides["num_workers"] = tuple(int(w) for w in args.num_workers.split(","))
    args.bench = {name: dataclasses.replace(CONFIGS[name], **overrides) for name in names}
    for name, config in args.bench.items():
        if config.iters <= 0 or config.iters % args.log_interval or config.rounds <= 0 \
                or config.warmup < 1:
            parser.error(f"{name}: --iters {config.iters} must be a positive multiple of "
                         f"--log-interval {args.log_interval}; --rounds {config.rounds} and "
                         f"--warmup {config.warmup} at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    configure_console(sys.stderr)  # the loop's iteration lines; stdout carries only the JSON
    torch.set_num_threads(args.threads)
    bench_model = _load_module("bench_model", BENCH_DIR / "bench_model.py")
    pretrain_bert = _load_module("pretrain_bert", ROOT / "pretrain_bert.py")
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "log_interval": args.log_interval, "overhead_target": OVERHEAD_TARGET}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        data_prefix = tokenize_corpus(tmp)
        for name, config in args.bench.items():
            peaks = {}
            if config.device == "cuda":
                peaks, info = device_peaks(bench_model, torch.device("cuda"), args.peak_tflops)
                out.update(info)
            logger.info("timing %s: %s", name, config)
            out[name] = dict(device=config.device, **bench_config(
                config, bench_model, pretrain_bert, data_prefix, args.log_interval, peaks))
    cpu = [name for name, config in args.bench.items() if config.device == "cpu"]
    if cpu:
        out["cpu_target_met"] = all(out[name]["meets_target"] for name in cpu)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
