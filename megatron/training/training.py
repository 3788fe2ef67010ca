"""The generic training loop: ``pretrain(...)`` as in Megatron-LM.

An entry script defines four things and hands them to :func:`pretrain`:

- ``model_provider()`` returning this rank's model shard;
- ``train_valid_test_datasets_provider(train_val_test_num_samples)`` returning three datasets
  (called on tensor-parallel rank 0 only; the batch getter broadcasts to the other ranks);
- ``forward_step_func(data_iterator, model)`` returning ``(output, loss_func)``, where
  ``loss_func(output)`` returns ``(loss, {name: averaged scalar})``;
- the validated arguments (:func:`megatron.training.arguments.parse_args`).

Nothing here reads global state: the arguments travel as a parameter.
"""

import argparse
import contextlib
import dataclasses
import logging
import math
import signal
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.data.data_samplers import build_pretraining_data_loader
from megatron.training.checkpointing import load_checkpoint, save_checkpoint
from megatron.training.grad_scaler import build_grad_scaler
from megatron.training.initialize import initialize_megatron
from megatron.training.optimizer import MegatronOptimizer
from megatron.training.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.training.signals import DistributedSignalHandler
from megatron.training.training_log import TrainingLogger
from megatron.training.utils import average_losses_across_data_parallel_group, print_rank_0

__all__ = ["TrainingResult", "check_loss_scale_collapse", "evaluate", "exit_reason",
           "get_optimizer_param_scheduler", "pretrain", "setup_model_and_optimizer",
           "train_step"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingResult:
    """What :func:`pretrain` did (for scripts and tests).

    Attributes:
        iteration: the last iteration trained.
        losses: per iteration, the losses averaged over micro-batches and data-parallel ranks.
        grad_norms: per iteration, the global gradient norm before clipping (``nan`` if skipped).
        skipped_iterations: iterations whose update was skipped (fp16 overflow).
        valid_losses: ``(iteration, {name: loss})`` of each validation.
        checkpoint: directory of the last checkpoint saved, if any.
        loss_scale: the loss scale at the end (1.0 without fp16).
        exit_reason: why training stopped before ``--train-iters`` (``None`` if it did not).
    """

    iteration: int = 0
    losses: List[Dict[str, float]] = dataclasses.field(default_factory=list)
    grad_norms: List[float] = dataclasses.field(default_factory=list)
    skipped_iterations: int = 0
    valid_losses: List[tuple] = dataclasses.field(default_factory=list)
    checkpoint: Optional[str] = None
    loss_scale: float = 1.0
    exit_reason: Optional[str] = None


def get_optimizer_param_scheduler(optimizer, args: argparse.Namespace) -> OptimizerParamScheduler:
    """The learning-rate and weight-decay schedule, counted in samples as in Megatron-LM."""
    gbs = args.global_batch_size
    if args.train_samples is None:
        decay_steps = (args.lr_decay_iters or args.train_iters) * gbs
        warmup_steps = args.lr_warmup_iters * gbs
    else:
        decay_steps = args.lr_decay_samples or args.train_samples
        warmup_steps = args.lr_warmup_samples
    if args.lr_warmup_fraction is not None:
        warmup_steps = int(args.lr_warmup_fraction * decay_steps)
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler)


def setup_model_and_optimizer(model_provider: Callable, args: argparse.Namespace,
                              device: torch.device):
    """``(model, optimizer, scheduler)`` on ``device``."""
    model = model_provider().to(device)
    scaler = build_grad_scaler(fp16=args.fp16, loss_scale=args.loss_scale,
                               initial_loss_scale=args.initial_loss_scale,
                               min_loss_scale=args.min_loss_scale,
                               loss_scale_window=args.loss_scale_window,
                               hysteresis=args.hysteresis)
    optimizer = MegatronOptimizer(model, lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                                  clip_grad=args.clip_grad, grad_scaler=scaler)
    return model, optimizer, get_optimizer_param_scheduler(optimizer, args)


def _check_finite(losses: Dict[str, torch.Tensor], iteration: Optional[int]) -> None:
    for name, value in losses.items():
        if not math.isfinite(float(value)):
            where = "" if iteration is None else f" at iteration {iteration}"
            raise FloatingPointError(
                f"{name} is {float(value)}{where}: training diverged. Stopping before the "
                "weights are updated or anything is saved; lower --lr, lengthen the warm-up, or "
                "clip gradients harder.")


def train_step(forward_step_func: Callable, data_iterator, model: torch.nn.Module,
               optimizer: MegatronOptimizer, opt_param_scheduler, *, num_micro_batches: int,
               global_batch_size: int, iteration: Optional[int] = None,
               check_for_nan: bool = True):
    """One optimizer step over ``num_micro_batches`` micro-batches.

    A non-finite loss or gradient stops training with :class:`FloatingPointError` naming the
    iteration, before the update (``check_for_nan``; with it off, the iteration is skipped
    instead). With fp16 loss scaling an overflowing step is skipped and the scale backs off.

    Returns:
        ``(losses, updated, grad_norm)``: losses averaged over micro-batches and data-parallel
        ranks (tensors), whether the weights were updated, and the gradient norm.
    """
    optimizer.zero_grad()
    totals: Dict[str, torch.Tensor] = {}
    for _ in range(num_micro_batches):
        output, loss_func = forward_step_func(data_iterator, model)
        loss, reported = loss_func(output)
        optimizer.scale_loss(loss / num_micro_batches).backward()
        for name, value in reported.items():
            totals[name] = totals.get(name, 0.0) + value.detach().float() / num_micro_batches
    losses = average_losses_across_data_parallel_group(totals)
    if optimizer.grad_scaler is None and check_for_nan:
        _check_finite(losses, iteration)
    try:
        updated, grad_norm = optimizer.step(skip_if_not_finite=not check_for_nan)
    except FloatingPointError as error:
        where = "" if iteration is None else f" (iteration {iteration})"
        raise FloatingPointError(f"{error}{where}") from None
    if updated:
        opt_param_scheduler.step(increment=global_batch_size)
    return losses, updated, grad_norm


@torch.no_grad()
def evaluate(forward_step_func: Callable, data_iterator, model: torch.nn.Module,
             eval_iters: int) -> Dict[str, float]:
    """Losses averaged over ``eval_iters`` micro-batches (and data-parallel ranks)."""
    model.eval()
    totals: Dict[str, torch.Tensor] = {}
    try:
        for _ in range(eval_iters):
            output, loss_func = forward_step_func(data_iterator, model)
            _, reported = loss_func(output)
            for name, value in reported.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / eval_iters
    finally:
        model.train()
    return {name: float(value) for name, value
            in average_losses_across_data_parallel_group(totals).items()}


def _build_iterators(provider: Callable, args: argparse.Namespace, consumed: int,
                     device: torch.device):
    """Train, valid and test iterators, and which of the three exist.

    Only tensor-parallel rank 0 builds datasets and iterators (the others get ``None`` and
    receive each batch from it); it tells the others which splits exist.
    """
    gbs = args.global_batch_size
    evaluations = args.train_iters // args.eval_interval + 1
    num_samples = [args.train_iters * gbs, evaluations * args.eval_iters * gbs,
                   args.eval_iters * gbs]
    datasets = (None, None, None)
    if mpu.get_tensor_model_parallel_rank() == 0:
        if dist.get_rank() != 0:
            dist.barrier()  # rank 0 builds (and caches) the sample indices first
        datasets = provider(num_samples)
        if dist.get_rank() == 0:
            dist.barrier()
    else:
        dist.barrier()
    loaders = [
        build_pretraining_data_loader(
            dataset, consumed if index == 0 else 0, micro_batch_size=args.micro_batch_size,
            data_parallel_rank=mpu.get_data_parallel_rank(),
            data_parallel_size=mpu.get_data_parallel_world_size(),
            dataloader_type=args.dataloader_type, num_workers=args.num_workers, seed=args.seed)
        for index, dataset in enumerate(datasets)]
    exists = torch.tensor([float(loader is not None) for loader in loaders], device=device)
    if mpu.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(exists, mpu.get_tensor_model_parallel_src_rank(),
                       group=mpu.get_tensor_model_parallel_group())
    if not exists[0]:
        raise ValueError("the training split has no samples: check --split and --data-path")
    iterators = [iter(loader) if loader is not None else None for loader in loaders]
    return iterators, [bool(flag) for flag in exists]


def _save(args, iteration, model, optimizer, scheduler, result: TrainingResult) -> None:
    result.checkpoint = save_checkpoint(
        iteration, model, optimizer, scheduler, save_dir=args.save, args=args,
        no_save_optim=args.no_save_optim, no_save_rng=args.no_save_rng,
        keep_last_n=args.keep_last_n_checkpoints)
    print_rank_0(f"saved checkpoint at iteration {iteration} to {result.checkpoint}")


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` OR-ed over every rank (collective)."""
    value = torch.tensor([float(flag)], device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def exit_reason(args, iteration: int, start: float, signals: Optional[DistributedSignalHandler],
                device: torch.device) -> Optional[str]:
    """Why training stops after ``iteration`` (the same answer on every rank), or ``None``."""
    if args.exit_interval and iteration % args.exit_interval == 0:
        return f"--exit-interval {args.exit_interval}"
    if signals is not None and signals.stop_requested(device):
        return f"signal {signal.Signals(signals.sig).name}"
    if args.exit_duration_in_mins is not None and _any_rank(
            (time.time() - start) / 60.0 > args.exit_duration_in_mins, device):
        return f"--exit-duration-in-mins {args.exit_duration_in_mins}"
    return None


def check_loss_scale_collapse(args, skipped_in_a_row: int, iteration: int, optimizer) -> None:
    """Stop (:class:`FloatingPointError`) after too many fp16 overflows in a row."""
    limit = args.max_consecutive_skipped_iterations
    if optimizer.grad_scaler is not None and limit and skipped_in_a_row >= limit:
        raise FloatingPointError(
            f"loss-scale collapse: {skipped_in_a_row} iterations in a row (up to iteration "
            f"{iteration}) had inf/NaN gradients and were skipped; the loss scale is now "
            f"{optimizer.get_loss_scale():g} (--min-loss-scale {args.min_loss_scale:g}). The run "
            "has diverged or its gradients do not fit fp16: lower --lr, train with --bf16, or "
            "resume from an earlier checkpoint (--ckpt-step). Stopped without saving "
            f"(--max-consecutive-skipped-iterations {limit}).")


def _train(forward_step_func, iterators, has_valid: bool, model, optimizer, scheduler, args,
           iteration, result: TrainingResult, log: TrainingLogger, device: torch.device,
           signals: Optional[DistributedSignalHandler]) -> int:
    train_iterator, valid_iterator, _ = iterators
    start = time.time()
    skipped_in_a_row = 0
    while iteration < args.train_iters:
        losses, updated, grad_norm = train_step(
            forward_step_func, train_iterator, model, optimizer, scheduler,
            num_micro_batches=args.num_micro_batches, global_batch_size=args.global_batch_size,
            iteration=iteration + 1, check_for_nan=args.check_for_nan_in_loss_and_grad)
        iteration += 1
        args.consumed_train_samples += args.global_batch_size
        result.losses.append({name: float(value) for name, value in losses.items()})
        result.grad_norms.append(grad_norm)
        result.skipped_iterations += not updated
        skipped_in_a_row = 0 if updated else skipped_in_a_row + 1
        log.iteration(iteration, losses, updated=updated, grad_norm=grad_norm,
                      learning_rate=scheduler.get_lr(), loss_scale=optimizer.get_loss_scale(),
                      consumed_samples=args.consumed_train_samples)
        check_loss_scale_collapse(args, skipped_in_a_row, iteration, optimizer)
        if has_valid and args.eval_iters > 0 and iteration % args.eval_interval == 0:
            valid = evaluate(forward_step_func, valid_iterator, model, args.eval_iters)
            result.valid_losses.append((iteration, valid))
            log.validation(f"iteration {iteration}", valid, iteration)
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            _save(args, iteration, model, optimizer, scheduler, result)
        reason = exit_reason(args, iteration, start, signals, device)
        if reason is not None:
            if args.save and (result.checkpoint is None or
                              not result.checkpoint.endswith(f"iter_{iteration:07d}")):
                _save(args, iteration, model, optimizer, scheduler, result)
            result.exit_reason = reason
            print_rank_0(f"exiting at iteration {iteration} ({reason})")
            break
    return iteration


def pretrain(train_valid_test_datasets_provider: Callable, model_provider: Callable,
             forward_step_func: Callable, args: argparse.Namespace) -> TrainingResult:
    """Initialise, build the model, optimizer and data, load, train, evaluate and save.

    Args:
        train_valid_test_datasets_provider: ``f(train_val_test_num_samples)`` -> 3 datasets.
        model_provider: ``f()`` -> this rank's model shard.
        forward_step_func: ``f(data_iterator, model)`` -> ``(output, loss_func)``.
        args: validated arguments (:func:`megatron.training.arguments.parse_args`).

    Returns:
        A :class:`TrainingResult`.
    """
    device = initialize_megatron(
        tensor_model_parallel_size=args.tensor_model_parallel_size, seed=args.seed,
        distributed_backend=args.distributed_backend,
        distributed_timeout_minutes=args.distributed_timeout_minutes)
    model, optimizer, scheduler = setup_model_and_optimizer(model_provider, args, device)
    iteration = 0
    if args.load is not None:
        iteration, saved_args = load_checkpoint(
            model, optimizer, scheduler, load_dir=args.load, no_load_optim=args.no_load_optim,
            no_load_rng=args.no_load_rng, finetune=args.finetune, iteration=args.ckpt_step)
        if iteration > 0:
            print_rank_0(f"resuming from {args.load} at iteration {iteration}")
    args.consumed_train_samples = iteration * args.global_batch_size
    args.iteration = iteration
    iterators, exists = _build_iterators(train_valid_test_datasets_provider, args,
                                         args.consumed_train_samples, device)
    result = TrainingResult(iteration=iteration)
    log = TrainingLogger(args, model, device)
    signals = DistributedSignalHandler() if args.exit_signal_handler else None
    try:
        if iteration < args.train_iters:
            with signals if signals is not None else contextlib.nullcontext():
                iteration = _train(forward_step_func, iterators, exists[1], model, optimizer,
                                   scheduler, args, iteration, result, log, device, signals)
        result.iteration = args.iteration = iteration
        stopped_early = iteration < args.train_iters
        if args.save and not stopped_early and (
                result.checkpoint is None or not result.checkpoint.endswith(
                    f"iter_{iteration:07d}")):
            _save(args, iteration, model, optimizer, scheduler, result)
        if not stopped_early and args.eval_iters > 0:
            for name, iterator, present in (("valid", iterators[1], exists[1]),
                                            ("test", iterators[2], exists[2])):
                if not present:
                    continue
                losses = evaluate(forward_step_func, iterator, model, args.eval_iters)
                log.validation(f"the end of training for {name} data", losses, iteration)
                if name == "valid":
                    result.valid_losses.append((iteration, losses))
    finally:
        log.close()
    result.loss_scale = optimizer.get_loss_scale()
    return result
