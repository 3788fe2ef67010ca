"""Forward+backward time of tensor-parallel transformer blocks: TP=1, ours at TP=2, PyTorch's TP=2.

Usage::

    python bench/bench_mpu.py [--rounds 8] [--iters 6] [--warmup 2]

Two blocks, hidden 1024, 16 heads, batch 8 x seq 128 = 1024 tokens, fp32:

* MLP: column-parallel ``h -> 4h`` (bias returned and added just before the exact (erf) GeLU
  the model uses), row-parallel ``4h -> h``.
* attention: fused column-parallel QKV ``h -> 3h`` with the per-head layout ``[heads, 3, d]``
  along the output dimension (a rank owns whole heads), ``scaled_dot_product_attention`` over
  this rank's heads, row-parallel output projection ``h -> h``.

Three configurations, each in freshly started processes, alternated in rounds so that drift on a
shared machine affects them alike (times are medians over rounds of per-round medians, ratios
medians over rounds of the per-round ratios):

* ``tp1``: one process, 2 threads, allowed on the first two cores.
* ``tp2``: ``megatron.mpu`` at tensor-parallel size 2, two gloo processes of 1 thread each, each
  pinned to its own core.
* ``torch_tp2``: the same blocks as plain ``nn.Linear`` modules parallelised by
  ``torch.distributed.tensor.parallel`` (``ColwiseParallel`` / ``RowwiseParallel``), same
  processes, threads and pinning as ``tp2``.

Every configuration starts from the same dense weights and is checked once against the dense
block computed in the same process. All-reduced bytes are counted with a dispatch mode (which sees
``torch.distributed.all_reduce`` and DTensor's functional collectives alike) over one extra,
untimed step. Prints one JSON object on stdout; progress goes to stderr.
"""

import argparse
import copy
import datetime
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from megatron import mpu  # noqa: E402

logger = logging.getLogger("bench_mpu")

HIDDEN, HEADS, BATCH, SEQ = 1024, 16, 8, 128
SEED = 1234
BLOCKS = ("mlp", "attention")
CONFIGS = ("tp1", "tp2", "torch_tp2")
TP2_OVER_TP1_MAX = 1.10
CHECK_ATOL = 1e-4
LAUNCH_TIMEOUT_S = 300.0


# ---------------------------------------------------------------------------- blocks


def core_attention(qkv: torch.Tensor) -> torch.Tensor:
    """``[b, s, n*3*d]`` in the per-head layout -> ``[b, s, n*d]``, for however many heads n."""
    b, s, _ = qkv.shape
    q, k, v = qkv.view(b, s, -1, 3, HIDDEN // HEADS).permute(3, 0, 2, 1, 4)  # 3 x [b, n, s, d]
    context = F.scaled_dot_product_attention(q, k, v)  # [b, n, s, d]
    return context.transpose(1, 2).reshape(b, s, -1)  # [b, s, n*d]


class DenseMLP(nn.Module):
    """The MLP block as plain ``nn.Linear`` layers (reference, and input to PyTorch's TP)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.fc2 = nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DenseAttention(nn.Module):
    """The attention block as plain ``nn.Linear`` layers; ``qkv`` rows are ``[heads, 3, d]``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under PyTorch's TP, qkv returns this rank's local [b, s, 3h/p]: heads/p whole heads.
        return self.proj(core_attention(self.qkv(x)))


class ParallelMLP(nn.Module):
    """The MLP block from ``megatron.mpu`` layers: one all-reduce forward, one backward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = mpu.ColumnParallelLinear(HIDDEN, 4 * HIDDEN, gather_output=False,
                                            skip_bias_add=True, perform_initialization=False)
        self.fc2 = mpu.RowParallelLinear(4 * HIDDEN, HIDDEN, input_is_parallel=True,
                                         perform_initialization=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, bias = self.fc1(x)  # [b, s, 4h/p]
        return self.fc2(F.gelu(h + bias))[0]  # [b, s, h]


class ParallelAttention(nn.Module):
    """The attention block from ``megatron.mpu`` layers; this rank computes heads/p heads."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = mpu.ColumnParallelLinear(HIDDEN, 3 * HIDDEN, gather_output=False,
                                            perform_initialization=False)
        self.proj = mpu.RowParallelLinear(HIDDEN, HIDDEN, input_is_parallel=True,
                                          perform_initialization=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(core_attention(self.qkv(x)[0]))[0]  # [b, s, h]


DENSE = {"mlp": DenseMLP, "attention": DenseAttention}
PARALLEL = {"mlp": ParallelMLP, "attention": ParallelAttention}
TORCH_PLAN = {"mlp": {"fc1": "colwise", "fc2": "rowwise"},
              "attention": {"qkv": "colwise", "proj": "rowwise"}}


def load_shards(parallel: nn.Module, dense: nn.Module, rank: int, world_size: int) -> None:
    """Copy this rank's shards of ``dense``'s weights into the matching mpu layers."""
    for name, layer in parallel.named_children():
        weight, bias = getattr(dense, name).weight, getattr(dense, name).bias
        with torch.no_grad():
            if isinstance(layer, mpu.ColumnParallelLinear):
                layer.weight.copy_(weight.chunk(world_size, 0)[rank])
                layer.bias.copy_(bias.chunk(world_size, 0)[rank])
            else:
                layer.weight.copy_(weight.chunk(world_size, 1)[rank])
                layer.bias.copy_(bias)


def build(block: str, config: str, dense: nn.Module, rank: int, world_size: int) -> nn.Module:
    if config == "torch_tp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        plan = {name: styles[style]() for name, style in TORCH_PLAN[block].items()}
        return parallelize_module(dense, init_device_mesh("cpu", (world_size,)), plan)
    model = PARALLEL[block]()
    load_shards(model, dense, rank, world_size)
    return model


# ---------------------------------------------------------------------------- measurement


class CollectiveBytes(TorchDispatchMode):
    """Count collectives and the bytes of the tensors they are given, c10d and functional alike."""

    ALL_REDUCE = ("allreduce_", "all_reduce")
    COLLECTIVES = ALL_REDUCE + ("allgather_", "_allgather_base_", "all_gather_into_tensor",
                                "reduce_scatter_tensor", "_reduce_scatter_base_", "broadcast_")

    def __init__(self) -> None:
        super().__init__()
        self.allreduce_bytes = self.allreduce_calls = self.other_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor lower to plain collectives, then see those
        name = getattr(getattr(func, "_overloadpacket", None), "__name__", "")
        if name in self.ALL_REDUCE:
            tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            self.allreduce_calls += 1
            self.allreduce_bytes += sum(t.numel() * t.element_size() for t in tensors)
        elif name in self.COLLECTIVES:
            self.other_calls += 1
        return func(*args, **(kwargs or {}))


def timed_steps(
    step: Callable[[], None], iters: int, warmup: int, distributed: bool
) -> List[float]:
    """Milliseconds per step; with several ranks, each step starts after a barrier and counts as
    long as its slowest rank took."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    if distributed:
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times = slowest.tolist()
    return times


def bench_block(block: str, config: str, rank: int, world_size: int, opts: dict) -> dict:
    torch.manual_seed(SEED)  # the same dense weights, input and output gradient everywhere
    dense = DENSE[block]()
    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)  # as if from a previous layer
    grad_out = torch.randn(BATCH, SEQ, HIDDEN)
    result: Dict[str, object] = {}
    if opts["check"]:
        reference = copy.deepcopy(dense)
        ref_out = reference(x)
        (ref_out * grad_out).sum().backward()
        ref_out, ref_grad, x.grad = ref_out.detach(), x.grad, None
    model = build(block, config, dense, rank, world_size)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        x.grad = None
        out = model(x)
        (out * grad_out).sum().backward()
        return out

    if opts["check"]:
        out = step().detach()
        result["max_abs_diff_vs_dense"] = max((out - ref_out).abs().max().item(),
                                              (x.grad - ref_grad).abs().max().item())
    with CollectiveBytes() as forward:
        out = model(x)
    with CollectiveBytes() as backward:
        (out * grad_out).sum().backward()
    result["allreduce_bytes"] = {"forward": forward.allreduce_bytes,
                                 "backward": backward.allreduce_bytes}
    result["allreduce_calls"] = {"forward": forward.allreduce_calls,
                                 "backward": backward.allreduce_calls}
    result["other_collectives"] = forward.other_calls + backward.other_calls
    result["times_ms"] = timed_steps(step, opts["iters"], opts["warmup"], world_size > 1)
    return result


def pin_to(cores: set) -> None:
    """Restrict every thread of this process (and the threads it starts later) to ``cores``."""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), cores)


def worker(rank: int, world_size: int, port: int, config: str, cores: list, opts: dict) -> None:
    pin_to(set(cores) if world_size == 1 else {cores[rank]})
    torch.set_num_threads(len(cores) if world_size == 1 else 1)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=120))
    if world_size > 1:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        if config == "tp2":
            mpu.initialize_model_parallel(world_size)
    try:
        results = {block: bench_block(block, config, rank, world_size, opts) for block in BLOCKS}
        if rank == 0:
            store.set("result", json.dumps(results))
        if world_size > 1:
            dist.barrier()
    finally:
        mpu.destroy_model_parallel()
        if world_size > 1:
            dist.destroy_process_group()


def launch(config: str, cores: list, opts: dict) -> dict:
    """Run ``config`` in fresh processes and return rank 0's results."""
    world_size = 1 if config == "tp1" else 2
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    context = mp.start_processes(worker, args=(world_size, store.port, config, cores, opts),
                                 nprocs=world_size, join=False, start_method="forkserver")
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while not context.join(timeout=0.2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{config} did not finish in {LAUNCH_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return json.loads(store.get("result"))


# ---------------------------------------------------------------------------- report


def summarise(block: str, rounds: Dict[str, List[dict]]) -> dict:
    """Times: median over rounds of each round's median. Ratios: median over rounds of the ratio
    within a round, whose runs are seconds apart, so that slow drift of the machine cancels."""
    per_round = {c: [statistics.median(r[block]["times_ms"]) for r in rounds[c]] for c in CONFIGS}

    def ratio(a: str, b: str) -> float:
        pairs = zip(per_round[a], per_round[b], strict=True)
        return round(statistics.median(x / y for x, y in pairs), 3)

    paper = BATCH * SEQ * HIDDEN * 4  # one all-reduce of the [b, s, h] fp32 activation
    ours, theirs = rounds["tp2"][0][block], rounds["torch_tp2"][0][block]
    return {
        **{f"{c}_ms": round(statistics.median(per_round[c]), 1) for c in CONFIGS},
        "tp2_over_tp1": ratio("tp2", "tp1"),
        "torch_tp2_over_tp1": ratio("torch_tp2", "tp1"),
        "ours_over_torch": ratio("tp2", "torch_tp2"),
        "per_round_ms": {c: [round(t, 1) for t in v] for c, v in per_round.items()},
        "allreduce_bytes": {
            "forward": ours["allreduce_bytes"]["forward"],
            "backward": ours["allreduce_bytes"]["backward"],
            "paper_forward": paper,
            "paper_backward": paper,
            "match": ours["allreduce_bytes"] == {"forward": paper, "backward": paper},
            "allreduce_calls": ours["allreduce_calls"],
            "other_collectives": ours["other_collectives"],
            "torch_tp2": dict(theirs["allreduce_bytes"], calls=theirs["allreduce_calls"],
                              other_collectives=theirs["other_collectives"]),
        },
        "max_abs_diff_vs_dense": {
            c: rounds[c][0][block]["max_abs_diff_vs_dense"] for c in CONFIGS},
    }


def idle_percent(seconds: float = 1.0) -> float:
    """Share of the machine's CPU time spent idle over ``seconds`` (other load skews timings)."""

    def sample():
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        return fields[3] + fields[4], sum(fields)

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return round(100.0 * (idle1 - idle0) / max(total1 - total0, 1), 1)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return next(names)
    except (OSError, StopIteration):
        return "unknown"


def run_rounds(cores: List[int], args: argparse.Namespace) -> Dict[str, List[dict]]:
    """Every configuration once per round; round 0 also checks each against the dense block."""
    rounds: Dict[str, List[dict]] = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        for config in CONFIGS:
            opts = {"iters": args.iters, "warmup": args.warmup, "check": r == 0}
            result = launch(config, cores, opts)
            rounds[config].append(result)
            logger.info("round %d %-9s %s", r, config, "  ".join(
                f"{b} {statistics.median(result[b]['times_ms']):.1f} ms" for b in BLOCKS))
            for block in BLOCKS if r == 0 else ():
                diff = result[block]["max_abs_diff_vs_dense"]
                if diff > CHECK_ATOL:
                    sys.exit(f"{config} {block} differs from the dense block by {diff:g}")
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="alternations of the configurations")
    parser.add_argument("--iters", type=int, default=6, help="timed steps per configuration, round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")

    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        sys.exit(f"bench_mpu needs 2 cores; this process may use {sorted(os.sched_getaffinity(0))}")
    mp.set_forkserver_preload(["torch", "torch.distributed.tensor.parallel", "megatron.mpu"])
    idle_before = idle_percent()
    if idle_before < 90.0:
        logger.warning("the machine is only %.0f%% idle: timings will suffer", idle_before)
    start = time.monotonic()
    rounds = run_rounds(cores, args)
    wall_s = time.monotonic() - start
    report = {b: summarise(b, rounds) for b in BLOCKS}
    met = {b: {"tp2_over_tp1": report[b]["tp2_over_tp1"] <= TP2_OVER_TP1_MAX,
               "faster_than_torch_tp": report[b]["ours_over_torch"] < 1.0} for b in BLOCKS}
    met["all"] = all(all(m.values()) for m in met.values())
    print(json.dumps({
        "config": {"hidden": HIDDEN, "heads": HEADS, "batch": BATCH, "seq": SEQ,
                   "tokens": BATCH * SEQ, "dtype": "float32", "rounds": args.rounds,
                   "iters": args.iters, "warmup": args.warmup, "cores": cores,
                   "tp1": "1 process, 2 threads, both cores",
                   "tp2": "2 gloo processes, 1 thread each, one core each"},
        **report,
        "targets": {"tp2_over_tp1_max": TP2_OVER_TP1_MAX, "met": met},
        "torch_version": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "machine_idle_before_pct": idle_before,
        "wall_s": round(wall_s, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
