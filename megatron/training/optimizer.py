"""AdamW for tensor- and data-parallel training, with fp32 master weights for fp16/bf16 models.

:class:`MegatronOptimizer` owns everything between ``loss.backward()`` and the next forward:

1. gradients are averaged over the data-parallel group in a few large all-reduces
   (:func:`allreduce_gradients`); the tensor-parallel group never sees them;
2. for fp16, the loss-scaled gradients are unscaled and checked for inf/NaN (the check is
   all-reduced over the tensor-parallel group, so every rank skips the same steps);
3. the global gradient norm (every shard once, every replicated parameter once) is computed with
   :func:`megatron.mpu.get_grad_norm` and the gradients clipped to ``clip_grad`` (inside the
   fused AdamW kernel where there is one);
4. ``torch.optim.AdamW`` (``fused=True`` where the device has it, apex's ``FusedAdam`` on CUDA when
   installed) updates the fp32 parameters, and half-precision models get a copy of the result.

Half-precision models accumulate gradients over micro-batches in an fp32 ``main_grad`` buffer per
parameter (a hook moves each fresh gradient there), as Megatron-LM does for bf16.
"""

import logging
import math
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.training.grad_scaler import MegatronGradScaler

__all__ = ["MegatronOptimizer", "allreduce_gradients", "get_param_groups"]

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 40 * 1024 * 1024


def get_param_groups(model: torch.nn.Module) -> List[Dict]:
    """Two AdamW groups: with weight decay, and without it for biases and LayerNorm weights.

    As Megatron-LM: every 1-D parameter (biases, LayerNorm weights) and every ``*.bias`` skips
    weight decay. Empty groups are left out.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() == 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "wd_mult": 1.0, "lr_mult": 1.0},
              {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0}]
    return [group for group in groups if group["params"]]


def allreduce_gradients(grads: Iterable[torch.Tensor], group: Optional[dist.ProcessGroup],
                        bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> int:
    """Average ``grads`` in place over ``group``, coalesced into buckets of ~``bucket_bytes``.

    ``group=None`` stands for a group of one (nothing to do).

    Returns:
        The number of all-reduce calls issued (0 for a group of one).
    """
    grads = [g for g in grads if g is not None]
    size = mpu.parallel_state.group_size(group)
    if size == 1 or not grads:
        return 0
    buckets: List[List[torch.Tensor]] = []
    current, current_bytes = [], 0
    for grad in grads:
        if current and (current_bytes + grad.numel() * grad.element_size() > bucket_bytes
                        or grad.dtype != current[0].dtype):
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(grad)
        current_bytes += grad.numel() * grad.element_size()
    buckets.append(current)
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        flat.div_(size)
        dist.all_reduce(flat, group=group)
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
    return len(buckets)


def _adam_class(device: torch.device, fused: Optional[bool]):
    """``(constructor, description)`` for the fastest AdamW the device has."""
    if device.type == "cuda" and fused is not False:
        try:
            from apex.optimizers import FusedAdam

            def apex_adam(groups, **kw):
                return FusedAdam(groups, adam_w_mode=True, **kw)

            return apex_adam, "apex FusedAdam"
        except ImportError:
            pass
    if fused is False:
        return (lambda groups, **kw: torch.optim.AdamW(groups, **kw)), "torch AdamW"

    def fused_or_plain(groups, **kw):
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, ValueError) as error:  # device or dtype without a fused kernel
            if fused:
                raise
            logger.info("fused AdamW unavailable (%s); using the for-each implementation", error)
            return torch.optim.AdamW(groups, **kw)

    return fused_or_plain, "torch AdamW (fused)"


class MegatronOptimizer:
    """AdamW over a tensor-parallel model shard, data-parallel gradient averaging and clipping.

    Args:
        model: the model shard of this rank.
        lr, weight_decay, betas, eps: AdamW hyper-parameters (the scheduler overrides ``lr`` and
            ``weight_decay`` per group; biases and LayerNorm weights get no weight decay).
        clip_grad: clip the global gradient 2-norm to this; 0 to only measure it.
        grad_scaler: loss scaler (fp16), or ``None``.
        tensor_parallel_group: group the model is sharded over (default: the initialised one).
        data_parallel_group: group of replicas (default: the initialised one, or none).
        fused: ``True`` to require a fused kernel, ``False`` to avoid it, ``None`` to use one
            where available.
        bucket_bytes: size of the coalesced data-parallel all-reduces.
    """

    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float = 0.01,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 clip_grad: float = 1.0, grad_scaler: Optional[MegatronGradScaler] = None,
                 tensor_parallel_group=None, data_parallel_group=None,
                 fused: Optional[bool] = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        if clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0, got {clip_grad}")
        self.model = model
        self.clip_grad = clip_grad
        self.grad_scaler = grad_scaler
        self.tensor_parallel_group = mpu.parallel_state.resolve_tensor_model_parallel_group(
            tensor_parallel_group)
        if data_parallel_group is None and mpu.model_parallel_is_initialized():
            data_parallel_group = mpu.get_data_parallel_group()
        self.data_parallel_group = data_parallel_group
        self.bucket_bytes = bucket_bytes
        groups = get_param_groups(model)
        self.model_params = [p for group in groups for p in group["params"]]
        self.half = self.model_params[0].dtype != torch.float32
        if self.half:
            groups = [dict(group, params=[self._master(p) for p in group["params"]])
                      for group in groups]
        self.master_params = [p for group in groups for p in group["params"]]
        make, self.implementation = _adam_class(self.model_params[0].device, fused)
        self.optimizer = make(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._fused_grad_scale = (isinstance(self.optimizer, torch.optim.AdamW)
                                  and bool(self.optimizer.defaults.get("fused")))
        logger.info("optimizer: %s over %d tensors%s", self.implementation,
                    len(self.model_params), " with fp32 master weights" if self.half else "")

    def _master(self, param: torch.nn.Parameter) -> torch.nn.Parameter:
        """fp32 master copy of a half-precision parameter; gradients accumulate in fp32."""
        master = torch.nn.Parameter(param.detach().float())
        mpu.copy_tensor_model_parallel_attributes(master, param)
        param.main_grad = torch.zeros_like(master)

        def accumulate(p: torch.Tensor) -> None:
            p.main_grad.add_(p.grad)
            p.grad = None

        param.register_post_accumulate_grad_hook(accumulate)
        return master

    @property
    def param_groups(self) -> List[Dict]:
        return self.optimizer.param_groups

    def _grads(self) -> List[torch.Tensor]:
        if self.half:
            return [p.main_grad for p in self.model_params]
        return [p.grad for p in self.model_params if p.grad is not None]

    def zero_grad(self) -> None:
        """Forget the gradients of the last step (before the first micro-batch)."""
        for param in self.model_params:
            param.grad = None
            if self.half:
                param.main_grad.zero_()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the loss scale (fp16), for ``backward``."""
        if self.grad_scaler is None:
            return loss
        return loss * self.grad_scaler.scale.to(loss.device)

    def get_loss_scale(self) -> float:
        return 1.0 if self.grad_scaler is None else float(self.grad_scaler.scale)

    def _unscale_and_check(self, grads: List[torch.Tensor]) -> bool:
        """Unscale ``grads`` in place; True when any of them (on any TP rank) is not finite."""
        device = grads[0].device if grads else torch.device("cpu")
        found_inf = torch.zeros(1, device=device)
        inv_scale = self.grad_scaler.inv_scale.to(device=device, dtype=torch.float32)
        by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for same in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(same, found_inf, inv_scale)
        if mpu.parallel_state.group_size(self.tensor_parallel_group) > 1:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self.tensor_parallel_group)
        return bool(found_inf.item() > 0)

    @torch.no_grad()
    def step(self, skip_if_not_finite: bool = False) -> Tuple[bool, float]:
        """Average, unscale, check, clip and apply the gradients.

        Args:
            skip_if_not_finite: without fp16 loss scaling, skip a step whose gradient norm is
                not finite instead of raising.

        Returns:
            ``(updated, grad_norm)``: ``updated`` is False when fp16 gradients overflowed and the
            step was skipped (the loss scaler has then backed off), or for a non-finite step
            skipped on request; ``grad_norm`` is the norm before clipping (``nan`` if skipped).

        Raises:
            FloatingPointError: for a non-finite gradient norm, unless skipped.
        """
        grads = self._grads()
        allreduce_gradients(grads, self.data_parallel_group, self.bucket_bytes)
        if self.grad_scaler is not None:
            found_inf = self._unscale_and_check(grads)
            self.grad_scaler.update(found_inf)
            if found_inf:
                return False, math.nan
        if self.half:
            for master, param in zip(self.master_params, self.model_params):
                master.grad = param.main_grad
        norm = mpu.get_grad_norm(self.master_params, process_group=self.tensor_parallel_group)
        grad_norm = float(norm)
        if not math.isfinite(grad_norm) and skip_if_not_finite:
            logger.warning("gradient norm is %s: skipping this step", grad_norm)
            return False, math.nan
        if not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"gradient norm is {grad_norm}: the gradients are not finite; stopping before "
                "the weights are updated")
        self._clip(norm, grad_norm)
        self.optimizer.step()
        if self.half:
            for master, param in zip(self.master_params, self.model_params):
                param.copy_(master)
                master.grad = None
        return True, grad_norm

    def _clip(self, norm: torch.Tensor, grad_norm: float) -> None:
        """Scale the gradients by ``clip_grad / norm`` when the norm exceeds ``clip_grad``.

        torch's fused AdamW divides each gradient by its ``grad_scale`` attribute inside the
        update kernel (the hook AMP's GradScaler uses), so there the clipping costs no pass over
        the gradients of its own; other implementations scale the gradients first.
        """
        clip = self.clip_grad > 0 and self.clip_grad / (grad_norm + 1.0e-6) < 1.0
        if self._fused_grad_scale:
            self.optimizer.grad_scale = ((norm + 1.0e-6) / self.clip_grad).reshape(1) if clip \
                else None
        elif clip:
            torch.nn.utils.clip_grads_with_norm_(self.master_params, self.clip_grad, norm)

    def state_dict(self) -> dict:
        """Megatron-LM's layout: AdamW state, plus scaler and fp32 masters for half models."""
        if not self.half and self.grad_scaler is None:
            return self.optimizer.state_dict()
        state = {"optimizer": self.optimizer.state_dict()}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        if self.half:
            state["fp32_from_fp16_params"] = [
                [p.detach().clone() for p in group["params"]] for group in self.param_groups]
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (of the same model layout and precision).

        Raises:
            ValueError: when the saved state does not fit this optimizer.
        """
        wrapped = "optimizer" in state and "state" not in state
        if wrapped != (self.half or self.grad_scaler is not None):
            raise ValueError("the checkpoint's optimizer state was saved with another precision "
                             "setting (fp32/bf16/fp16); load it with --no-load-optim")
        self.optimizer.load_state_dict(state["optimizer"] if wrapped else state)
        if self.grad_scaler is not None:
            if "grad_scaler" in state:
                self.grad_scaler.load_state_dict(state["grad_scaler"])
            else:
                logger.warning("no loss-scaler state in the checkpoint; keeping the initial scale")
        if self.half:
            saved = state["fp32_from_fp16_params"]
            for group, saved_group in zip(self.param_groups, saved):
                for master, value in zip(group["params"], saved_group):
                    if master.shape != value.shape:
                        raise ValueError(f"fp32 master weight of shape {tuple(value.shape)} in "
                                         f"the checkpoint; this model has {tuple(master.shape)}")
                    master.copy_(value)
            for master, param in zip(self.master_params, self.model_params):
                param.copy_(master)
