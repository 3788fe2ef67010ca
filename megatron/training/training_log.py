"""Megatron-style iteration lines, validation lines and TensorBoard scalars (rank 0 only)."""

import argparse
import logging
import math
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.training.utils import num_floating_point_operations, print_rank_0

__all__ = ["TrainingLogger", "count_parameters"]

logger = logging.getLogger(__name__)


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the whole model: every shard once, every replicated parameter once."""
    local = sum(p.numel() for p in model.parameters()
                if mpu.param_is_not_tensor_parallel_duplicate(p))
    device = next(model.parameters()).device
    total = torch.tensor([local], dtype=torch.float64, device=device)
    if mpu.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=mpu.get_tensor_model_parallel_group())
    return int(total.item())


def _tensorboard_writer(args: argparse.Namespace):
    if not args.tensorboard_dir or (dist.is_initialized() and dist.get_rank() != 0):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("--tensorboard-dir given but tensorboard is not installed "
                       "(pip install tensorboard); not writing TensorBoard scalars")
        return None
    return SummaryWriter(log_dir=args.tensorboard_dir, max_queue=args.tensorboard_queue_size)


class TrainingLogger:
    """Accumulates per-iteration figures and writes them every ``--log-interval`` iterations."""

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module,
                 device: torch.device) -> None:
        self.args = args
        self.device = device
        self.num_parameters = count_parameters(model)
        self.flops_per_iteration = num_floating_point_operations(
            num_parameters=self.num_parameters, num_layers=args.num_layers,
            hidden_size=args.hidden_size, seq_length=args.seq_length,
            batch_size=args.global_batch_size)
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.writer = _tensorboard_writer(args)
        self.skipped = self.nans = 0
        self.sums: Dict[str, float] = {}
        self.counted = 0
        self.last_time = time.perf_counter()
        print_rank_0(f"model: {self.num_parameters:,} parameters; {self.world_size} processes, "
                     f"tensor-model-parallel size {args.tensor_model_parallel_size}, "
                     f"data-parallel size {args.data_parallel_size}; "
                     f"{args.num_micro_batches} micro-batch(es) of {args.micro_batch_size} per "
                     f"data-parallel rank per iteration")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def iteration(self, iteration: int, losses: Dict[str, torch.Tensor], *, updated: bool,
                  grad_norm: float, learning_rate: float, loss_scale: float,
                  consumed_samples: int) -> None:
        """Record one iteration; write the line when ``iteration`` is a log-interval multiple."""
        args = self.args
        values = {name: float(value) for name, value in losses.items()}
        if not updated:
            self.skipped += 1
            self.nans += any(math.isnan(v) for v in values.values())
        else:
            for name, value in values.items():
                self.sums[name] = self.sums.get(name, 0.0) + value
            self.counted += 1
        if self.writer is not None and iteration % args.tensorboard_log_interval == 0:
            self._scalars(iteration, values, learning_rate, loss_scale, grad_norm, updated)
        if iteration % args.log_interval:
            return
        self._sync()
        now = time.perf_counter()
        elapsed = (now - self.last_time) / args.log_interval
        self.last_time = now
        samples_per_second = args.global_batch_size / elapsed
        tflops = self.flops_per_iteration / (elapsed * self.world_size * 1e12)
        parts = [f" iteration {iteration:8d}/{args.train_iters:8d}",
                 f"consumed samples: {consumed_samples:12d}",
                 f"elapsed time per iteration (ms): {elapsed * 1000.0:.1f}",
                 f"learning rate: {learning_rate:.3E}",
                 f"global batch size: {args.global_batch_size:5d}"]
        for name, total in self.sums.items():
            parts.append(f"{name}: {total / max(self.counted, 1):.6E}")
        parts += [f"loss scale: {loss_scale:.1f}",
                  f"grad norm: {grad_norm:.3f}" if updated else "grad norm: skipped",
                  f"number of skipped iterations: {self.skipped:3d}",
                  f"number of nan iterations: {self.nans:3d}",
                  f"samples per second: {samples_per_second:.2f}",
                  f"TFLOP/s per process: {tflops:.3f}"]
        print_rank_0(" | ".join(parts) + " |")
        if self.writer is not None:
            self.writer.add_scalar("samples-per-second", samples_per_second, iteration)
        self.sums, self.counted, self.skipped, self.nans = {}, 0, 0, 0

    def _scalars(self, iteration, values, learning_rate, loss_scale, grad_norm, updated) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, iteration)
        self.writer.add_scalar("learning-rate", learning_rate, iteration)
        self.writer.add_scalar("loss-scale", loss_scale, iteration)
        if updated:
            self.writer.add_scalar("grad-norm", grad_norm, iteration)

    def validation(self, where: str, losses: Dict[str, float], iteration: int) -> None:
        """Write a validation line: each loss and, for the LM loss, its perplexity."""
        parts = []
        for name, value in losses.items():
            parts.append(f"{name} value: {value:.6E}")
            if "lm loss" in name:
                parts.append(f"{name} PPL: {math.exp(min(20.0, value)):.6E}")
                if self.writer is not None:
                    self.writer.add_scalar(f"{name} validation ppl", math.exp(min(20.0, value)),
                                           iteration)
            if self.writer is not None:
                self.writer.add_scalar(f"{name} validation", value, iteration)
        line = f" validation loss at {where} | " + " | ".join(parts)
        print_rank_0("-" * len(line) + "\n" + line + "\n" + "-" * len(line))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @property
    def last_log_time(self) -> Optional[float]:
        return self.last_time
