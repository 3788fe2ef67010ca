"""The finetuning loop shared by the GLUE and RACE tasks (Megatron-LM's ``finetune``).

:func:`finetune` builds the task's model from the arguments, starts it from a pretrained
checkpoint (its language-model weights; the task head is new) or resumes a finetuning run from
``--load``, trains ``--epochs`` passes over the training set with the training package's
``train_step`` (AdamW, data-parallel averaging, clipping, loss scaling, schedule), evaluates every
validation set with the task's metrics every ``--eval-interval`` iterations and at the end of
each epoch, keeps the best model in ``SAVE/best``, and writes ``SAVE/finetune_summary.json``.

Data order: epoch ``e`` visits the training set in the order ``randperm(n, seed + e)``, cut into
global batches (the last incomplete batch is dropped); data-parallel rank ``r`` takes slice ``r``
of each global batch. The order does not depend on the parallel layout, and a resumed run
continues inside its epoch where it stopped.
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron import mpu
from megatron.checkpoint import load_model_state_dict
from megatron.training import training
from megatron.training.arguments import bert_config_from_args
from megatron.training.checkpointing import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from megatron.training.initialize import initialize_megatron
from megatron.training.signals import DistributedSignalHandler
from megatron.training.training_log import TrainingLogger
from megatron.training.utils import print_rank_0
from tasks.data_utils import TaskDataset
from tasks.eval_utils import evaluate_datasets, format_metrics, predict, write_atomically

__all__ = ["FinetuneResult", "FinetuneTask", "epoch_micro_batches", "finetune",
           "load_pretrained_checkpoint"]

logger = logging.getLogger(__name__)

SUMMARY_FILENAME = "finetune_summary.json"


@dataclasses.dataclass
class FinetuneTask:
    """What a task hands the generic loop.

    Attributes:
        name: the ``--task`` name.
        num_classes: outputs per sample (1 for regression; the choices for multiple choice).
        build_model: ``f(config)`` -> this rank's model; its forward takes
            ``(ids, padding_mask, types)`` and returns ``[b, num_classes]``.
        metrics: ``f(outputs, dataset)`` -> ``{metric: value}``.
        score: ``f(metrics)`` -> the number the best checkpoint maximises.
        regression: mean-squared-error loss on one output instead of cross-entropy.
        label_names: class names (stored in the checkpoint's args for exporters).
        prediction_filename: ``f(dataset)`` -> the name of its predictions file.
        format_predictions: ``f(outputs, dataset)`` -> the text of its predictions file.
        sequences_per_sample: sequences the model runs per sample (FLOP count).
    """

    name: str
    num_classes: int
    build_model: Callable
    metrics: Callable[[np.ndarray, TaskDataset], Dict[str, float]]
    score: Callable[[Dict[str, float]], float]
    regression: bool = False
    label_names: Optional[List[str]] = None
    prediction_filename: Optional[Callable[[TaskDataset], str]] = None
    format_predictions: Optional[Callable[[np.ndarray, TaskDataset], str]] = None
    sequences_per_sample: int = 1


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` did (for the entry script, tests and benchmarks)."""

    iteration: int = 0
    losses: List[float] = dataclasses.field(default_factory=list)
    evaluations: List[dict] = dataclasses.field(default_factory=list)
    best: Optional[dict] = None
    checkpoint: Optional[str] = None
    best_checkpoint: Optional[str] = None
    predictions: List[str] = dataclasses.field(default_factory=list)
    summary_path: Optional[str] = None
    stopped_early: bool = False


# ------------------------------------------------------------------------------------ data


def epoch_micro_batches(num_samples: int, *, epoch: int, seed: int, global_batch_size: int,
                        micro_batch_size: int, data_parallel_rank: int,
                        data_parallel_size: int, start_iteration: int = 0
                        ) -> Iterator[np.ndarray]:
    """This rank's micro-batches (sample indices) of ``epoch``, from ``start_iteration`` on.

    Raises:
        ValueError: when the global batch is not a multiple of micro batch x data-parallel size.
    """
    per_rank, rest = divmod(global_batch_size, data_parallel_size)
    if rest or per_rank % micro_batch_size:
        raise ValueError(f"global batch {global_batch_size} is not a multiple of micro batch "
                         f"{micro_batch_size} x data-parallel size {data_parallel_size}")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))
    order = order.numpy()
    for iteration in range(start_iteration, num_samples // global_batch_size):
        block = order[iteration * global_batch_size:(iteration + 1) * global_batch_size]
        mine = block[data_parallel_rank * per_rank:(data_parallel_rank + 1) * per_rank]
        for start in range(0, per_rank, micro_batch_size):
            yield mine[start:start + micro_batch_size]


def _batches(dataset: TaskDataset, indices: Iterator[np.ndarray], device: torch.device):
    for micro_batch in indices:
        yield dataset.batch(micro_batch, device)


def _loss_func(labels: torch.Tensor, regression: bool, logits: torch.Tensor):
    if regression:
        loss = F.mse_loss(logits.float().view(-1), labels.float())
        return loss, {"mse loss": loss.detach()}
    loss = F.cross_entropy(logits.float(), labels)
    return loss, {"cross-entropy loss": loss.detach()}


def forward_step(data_iterator, model, *, regression: bool):
    """One micro-batch through the model; returns the outputs and the loss function."""
    batch = next(data_iterator)
    logits = model(batch["text"], batch["padding_mask"], batch["types"])
    return logits, functools.partial(_loss_func, batch["label"], regression)


# ------------------------------------------------------------------------------ checkpoints


def load_pretrained_checkpoint(model: torch.nn.Module, load_dir: str) -> Tuple[int, List[str]]:
    """Load the language-model weights of ``load_dir`` into ``model``; the task head stays new.

    A pretraining checkpoint's ``lm_head``/``binary_head`` (or another task's head) are dropped.
    A checkpoint trained without the binary head has no pooler; the pooler then starts new too.

    Returns:
        ``(iteration, dropped keys)``.

    Raises:
        CheckpointError: for missing language-model weights or shapes that do not fit.
    """
    # Any tensor-parallel size: the weights are resharded and the vocabulary re-padded.
    state, _, iteration = load_model_state_dict(
        load_dir, tensor_model_parallel_size=mpu.get_tensor_model_parallel_world_size(),
        tensor_model_parallel_rank=mpu.get_tensor_model_parallel_rank(),
        vocab_size=model.config.vocab_size)
    own = model.state_dict()
    weights = {key: value for key, value in state.items() if key.startswith("language_model.")}
    dropped = sorted(set(state) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    missing = sorted(key for key in own if key.startswith("language_model.")
                     and key not in weights)
    if unexpected or [key for key in missing if not key.startswith("language_model.pooler.")]:
        raise CheckpointError(f"{load_dir} does not fit this model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for key, value in weights.items():
        if value.shape != own[key].shape:
            raise CheckpointError(f"{load_dir}: {key} has shape {tuple(value.shape)}, the model "
                                  f"expects {tuple(own[key].shape)}")
    model.load_state_dict(weights, strict=False)
    if missing:
        logger.warning("%s has no pooler (pretrained without the binary head); the pooler "
                       "starts from random weights", load_dir)
    return iteration, dropped


# ------------------------------------------------------------------------------------ loop


class _Finetuner:
    """State of one finetuning run (split from :func:`finetune` to keep functions short)."""

    def __init__(self, task: FinetuneTask, args: argparse.Namespace, model, optimizer,
                 scheduler, device, train_dataset, valid_datasets) -> None:
        self.task, self.args, self.device = task, args, device
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_dataset, self.valid_datasets = train_dataset, list(valid_datasets)
        self.result = FinetuneResult()
        self.best_score = -float("inf")
        self.start = time.time()

    # -- evaluation and checkpoints

    def restore(self, saved_args) -> None:
        state = getattr(saved_args, "finetune_state", None) or {}
        self.result.evaluations = list(state.get("evaluations", []))
        self.result.best = state.get("best")
        self.result.best_checkpoint = state.get("best_checkpoint")
        if self.result.best is not None:
            self.best_score = self.result.best["score"]

    def evaluate(self, iteration: int) -> Optional[dict]:
        if not self.valid_datasets:
            return None
        args = self.args
        metrics = evaluate_datasets(self.model, self.valid_datasets, self.task.metrics,
                                    micro_batch_size=args.eval_micro_batch_size,
                                    device=self.device)
        score = float(np.mean([self.task.score(values) for values in metrics.values()]))
        epoch = iteration / args.iterations_per_epoch if args.iterations_per_epoch else 0.0
        record = {"iteration": iteration, "epoch": round(epoch, 4), "score": score,
                  "metrics": metrics}
        print_rank_0(format_metrics(f"iteration {iteration} (epoch {epoch:.2f})", metrics))
        self.result.evaluations.append(record)
        if score > self.best_score and iteration > 0:
            self.best_score = score
            self.result.best = record
            if args.save:
                self.result.best_checkpoint = self._save_best(iteration)
        return record

    def _remember(self) -> None:
        self.args.finetune_state = {"evaluations": self.result.evaluations,
                                    "best": self.result.best,
                                    "best_checkpoint": self.result.best_checkpoint}

    def _save_best(self, iteration: int) -> str:
        best_dir = os.path.join(self.args.save, "best")
        self._remember()
        path = save_checkpoint(iteration, self.model, save_dir=best_dir, args=self.args,
                               no_save_optim=True, no_save_rng=True, keep_last_n=1)
        print_rank_0(f"new best score {self.best_score:.4f} at iteration {iteration}: saved to "
                     f"{path}")
        return path

    def save(self, iteration: int) -> None:
        if not self.args.save or self.optimizer is None:
            return
        if self.result.checkpoint and self.result.checkpoint.endswith(f"iter_{iteration:07d}"):
            return
        self._remember()
        self.result.checkpoint = save_checkpoint(
            iteration, self.model, self.optimizer, self.scheduler, save_dir=self.args.save,
            args=self.args, no_save_optim=self.args.no_save_optim,
            no_save_rng=self.args.no_save_rng, keep_last_n=self.args.keep_last_n_checkpoints)
        print_rank_0(f"saved checkpoint at iteration {iteration} to {self.result.checkpoint}")

    # -- training

    def train(self, iteration: int, log: TrainingLogger, signals=None) -> int:
        """Train from ``iteration`` to ``--train-iters`` (or an exit condition); the last one."""
        args = self.args
        per_epoch = args.iterations_per_epoch
        step = functools.partial(forward_step, regression=self.task.regression)
        skipped_in_a_row = 0
        while iteration < args.train_iters:
            epoch, start = divmod(iteration, per_epoch)
            batches = _batches(self.train_dataset, epoch_micro_batches(
                len(self.train_dataset), epoch=epoch, seed=args.seed,
                global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
                data_parallel_rank=mpu.get_data_parallel_rank(),
                data_parallel_size=mpu.get_data_parallel_world_size(), start_iteration=start),
                self.device)
            for _ in range(start, per_epoch):
                losses, updated, grad_norm = training.train_step(
                    step, batches, self.model, self.optimizer, self.scheduler,
                    num_micro_batches=args.num_micro_batches,
                    global_batch_size=args.global_batch_size, iteration=iteration + 1,
                    check_for_nan=args.check_for_nan_in_loss_and_grad)
                iteration += 1
                self.result.losses.append(float(next(iter(losses.values()))))
                skipped_in_a_row = 0 if updated else skipped_in_a_row + 1
                log.iteration(iteration, losses, updated=updated, grad_norm=grad_norm,
                              learning_rate=self.scheduler.get_lr(),
                              loss_scale=self.optimizer.get_loss_scale(),
                              consumed_samples=iteration * args.global_batch_size)
                training.check_loss_scale_collapse(args, skipped_in_a_row, iteration,
                                                   self.optimizer)
                if iteration % per_epoch == 0 or iteration % args.eval_interval == 0:
                    self.evaluate(iteration)
                if args.save_interval and iteration % args.save_interval == 0:
                    self.save(iteration)
                reason = (training.exit_reason(args, iteration, self.start, signals,
                                               self.device)
                          if iteration < args.train_iters else None)
                if reason is not None:
                    self.save(iteration)
                    self.result.stopped_early = True
                    print_rank_0(f"exiting at iteration {iteration} ({reason})")
                    return iteration
        return iteration

    # -- predictions and summary

    def write_predictions(self, test_datasets: Sequence[TaskDataset]) -> None:
        result, args = self.result, self.args
        if result.best_checkpoint and result.best and result.best["iteration"] != result.iteration:
            load_checkpoint(self.model, load_dir=os.path.dirname(result.best_checkpoint),
                            finetune=True)
            print_rank_0(f"predicting with the best model, {result.best_checkpoint}")
        directory = os.path.join(args.save, "predictions")
        for dataset in test_datasets:
            outputs = predict(self.model, dataset, micro_batch_size=args.eval_micro_batch_size,
                              device=self.device)
            path = os.path.join(directory, self.task.prediction_filename(dataset))
            if path in result.predictions:  # two test files with one GLUE name
                path = os.path.join(directory, f"{self.task.name}-{dataset.name}.tsv")
            result.predictions.append(path)
            if not dist.is_initialized() or dist.get_rank() == 0:
                write_atomically(path, self.task.format_predictions(outputs, dataset))
            print_rank_0(f"wrote {len(dataset)} predictions for {dataset.paths[0]} to {path}")

    def summary(self) -> dict:
        args, result = self.args, self.result
        return {
            "task": self.task.name, "iterations": result.iteration, "epochs": args.epochs,
            "iterations_per_epoch": args.iterations_per_epoch,
            "train_samples": len(self.train_dataset) if self.train_dataset else 0,
            "global_batch_size": args.global_batch_size, "seq_length": args.seq_length,
            "tensor_model_parallel_size": args.tensor_model_parallel_size,
            "data_parallel_size": args.data_parallel_size,
            "pretrained_checkpoint": args.pretrained_checkpoint,
            "num_classes": self.task.num_classes, "label_names": self.task.label_names,
            "first_train_loss": result.losses[0] if result.losses else None,
            "last_train_loss": result.losses[-1] if result.losses else None,
            "evaluations": result.evaluations, "best": result.best,
            "final": result.evaluations[-1] if result.evaluations else None,
            "checkpoint": result.checkpoint, "best_checkpoint": result.best_checkpoint,
            "predictions": result.predictions, "stopped_early": result.stopped_early,
            "wall_seconds": round(time.time() - self.start, 1),
        }


def _build(task: FinetuneTask, args: argparse.Namespace, vocab_size: int, device):
    config = bert_config_from_args(args, vocab_size, add_binary_head=False)
    # Both sizes go into checkpoints, as pretrain_bert.py's: exporters strip the padding.
    args.vocab_size, args.padded_vocab_size = vocab_size, config.padded_vocab_size
    if args.train_iters > 0:
        return training.setup_model_and_optimizer(lambda: task.build_model(config), args, device)
    return task.build_model(config).to(device), None, None


def _start(runner: _Finetuner, args: argparse.Namespace) -> int:
    """Resume from ``--load`` or start from ``--pretrained-checkpoint``; the iteration."""
    iteration = 0
    if args.load is not None and find_checkpoint(args.load, args.ckpt_step) is not None:
        iteration, saved_args = load_checkpoint(
            runner.model, runner.optimizer, runner.scheduler, load_dir=args.load,
            no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng,
            finetune=args.finetune or runner.optimizer is None, iteration=args.ckpt_step)
        if iteration > 0:
            runner.restore(saved_args)
            print_rank_0(f"resuming from {args.load} at iteration {iteration}")
        else:
            print_rank_0(f"loaded the finetuned model from {args.load}")
        return iteration
    if args.pretrained_checkpoint:
        loaded, dropped = load_pretrained_checkpoint(runner.model, args.pretrained_checkpoint)
        print_rank_0(f"loaded the language model of {args.pretrained_checkpoint} (iteration "
                     f"{loaded}); new {runner.task.name} head"
                     + (f"; dropped {len(dropped)} tensors of its heads" if dropped else ""))
    else:
        print_rank_0("no --pretrained-checkpoint: finetuning from random initialisation")
    return iteration


def finetune(task: FinetuneTask, args: argparse.Namespace, *, vocab_size: int,
             train_dataset: Optional[TaskDataset], valid_datasets: Sequence[TaskDataset],
             test_datasets: Sequence[TaskDataset] = ()) -> FinetuneResult:
    """Finetune (or, with ``--epochs 0``, evaluate) ``task``; see the module docstring.

    Args:
        task: the task.
        args: validated arguments (:func:`tasks.arguments.validate_task_args`).
        vocab_size: the tokenizer's vocabulary size.
        train_dataset, valid_datasets, test_datasets: encoded datasets.

    Returns:
        A :class:`FinetuneResult`.
    """
    device = initialize_megatron(
        tensor_model_parallel_size=args.tensor_model_parallel_size, seed=args.seed,
        distributed_backend=args.distributed_backend,
        distributed_timeout_minutes=args.distributed_timeout_minutes)
    # Stored with every checkpoint: exporters build the HF head (and id2label) from them.
    args.num_classes, args.label_names = task.num_classes, task.label_names
    model, optimizer, scheduler = _build(task, args, vocab_size, device)
    runner = _Finetuner(task, args, model, optimizer, scheduler, device, train_dataset,
                        valid_datasets)
    iteration = _start(runner, args)
    if iteration < args.train_iters:
        log = TrainingLogger(args, model, device)
        log.flops_per_iteration *= task.sequences_per_sample
        signals = DistributedSignalHandler() if args.exit_signal_handler else None
        try:
            with signals if signals is not None else contextlib.nullcontext():
                iteration = runner.train(iteration, log, signals)
        finally:
            log.close()
    runner.result.iteration = iteration
    if not runner.result.stopped_early and (not runner.result.evaluations or
                                            runner.result.evaluations[-1]["iteration"]
                                            != iteration):
        runner.evaluate(iteration)
    runner.save(iteration)
    if args.predict and not runner.result.stopped_early:
        runner.write_predictions(test_datasets)
    summary = runner.summary()
    if args.save and (not dist.is_initialized() or dist.get_rank() == 0):
        runner.result.summary_path = os.path.join(args.save, SUMMARY_FILENAME)
        write_atomically(runner.result.summary_path, json.dumps(summary, indent=1) + "\n")
        print_rank_0(f"wrote the summary to {runner.result.summary_path}")
    best = runner.result.best
    if best is not None:
        print_rank_0(f"best score {best['score']:.4f} at iteration {best['iteration']} "
                     f"(epoch {best['epoch']})")
    return runner.result
