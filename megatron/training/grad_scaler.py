"""Loss scaling for fp16 training (Megatron-LM's ``grad_scaler``).

The loss is multiplied by ``scale`` before backward and the gradients by ``inv_scale`` after it,
so that small fp16 gradients do not underflow. A dynamic scaler halves the scale when the
gradients overflow (after ``hysteresis`` overflowing steps) and doubles it after
``growth_interval`` clean steps in a row.

Scales are one-element float32 tensors, created on the CPU. Call ``scaler.to(device)`` once to
keep them next to the model, or multiply by ``scaler.scale.to(loss.device)`` at the call site;
the arithmetic in ``update`` runs on whatever device the scale lives on.
"""

import logging
from abc import ABC, abstractmethod
from typing import Any, Dict, Mapping, Optional, Union

import torch

__all__ = [
    "ConstantGradScaler",
    "DynamicGradScaler",
    "MegatronGradScaler",
    "build_grad_scaler",
]

logger = logging.getLogger(__name__)

FoundInf = Union[bool, torch.Tensor]


def _scale_tensor(value: Union[float, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Returns ``value`` as a one-element float32 tensor on ``device``."""
    tensor = torch.as_tensor(value, dtype=torch.float32).detach().reshape(-1)
    if tensor.numel() != 1:
        raise ValueError(f"a loss scale must have one element, got shape {tuple(tensor.shape)}")
    return tensor.to(device).clone()


class MegatronGradScaler(ABC):
    """Base class of loss scalers: holds the current scale and its reciprocal.

    Args:
        initial_scale: The starting loss scale; must be positive.

    Raises:
        ValueError: If ``initial_scale`` is not positive.
    """

    def __init__(self, initial_scale: float) -> None:
        if not initial_scale > 0.0:
            raise ValueError(f"initial_scale must be positive, got {initial_scale}")
        self._scale = _scale_tensor(initial_scale, torch.device("cpu"))

    @property
    def scale(self) -> torch.Tensor:
        """The loss scale, a one-element float32 tensor."""
        return self._scale

    @property
    def inv_scale(self) -> torch.Tensor:
        """``1 / scale`` as a one-element float32 tensor (computed in float64)."""
        return self._scale.double().reciprocal().float()

    def to(self, device: Union[str, torch.device]) -> "MegatronGradScaler":
        """Moves the scale to ``device`` and returns ``self``."""
        self._scale = self._scale.to(device)
        return self

    @abstractmethod
    def update(self, found_inf: FoundInf) -> None:
        """Updates the scale after a step; ``found_inf`` says whether gradients overflowed."""

    @abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        """Returns the state to checkpoint."""

    @abstractmethod
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores the state returned by ``state_dict``."""


class ConstantGradScaler(MegatronGradScaler):
    """A loss scaler whose scale never changes (Megatron's ``--loss-scale``).

    Its state is the constructor argument alone, so ``state_dict`` is empty, as in Megatron-LM.
    """

    def update(self, found_inf: FoundInf) -> None:
        """Does nothing: the scale is constant."""

    def state_dict(self) -> Dict[str, Any]:
        """Returns an empty dict."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Ignores ``state_dict``: the scale comes from the constructor."""


class DynamicGradScaler(MegatronGradScaler):
    """A loss scaler that backs off on overflow and grows after a run of clean steps.

    On an overflowing step the growth tracker is reset to 0 and the hysteresis tracker is
    decremented; once it is ``<= 0`` the scale is multiplied by ``backoff_factor`` (but kept at
    least ``min_scale``), and keeps backing off on every further overflow. On a clean step the
    growth tracker is incremented; when it reaches ``growth_interval`` it is reset to 0, the
    hysteresis tracker is reset to ``hysteresis`` and the scale is multiplied by
    ``growth_factor``. As in Megatron-LM, only growth resets the hysteresis tracker.

    Args:
        initial_scale: The starting loss scale.
        min_scale: The smallest scale backoff may reach; ``0 < min_scale <= initial_scale``.
        growth_factor: Factor applied on growth; ``> 1``.
        backoff_factor: Factor applied on backoff; ``0 < backoff_factor < 1``.
        growth_interval: Clean steps in a row that trigger growth; ``> 0``.
        hysteresis: Overflowing steps tolerated before the first backoff; ``> 0``.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        *,
        initial_scale: float,
        min_scale: float,
        growth_factor: float,
        backoff_factor: float,
        growth_interval: int,
        hysteresis: int,
    ) -> None:
        super().__init__(initial_scale)
        if not 0.0 < min_scale <= initial_scale:
            raise ValueError(
                f"min_scale must satisfy 0 < min_scale <= initial_scale, got min_scale "
                f"{min_scale} and initial_scale {initial_scale}"
            )
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be greater than 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(
                f"backoff_factor must lie strictly between 0 and 1, got {backoff_factor}"
            )
        if growth_interval <= 0:
            raise ValueError(f"growth_interval must be positive, got {growth_interval}")
        if hysteresis <= 0:
            raise ValueError(f"hysteresis must be positive, got {hysteresis}")
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    @property
    def growth_tracker(self) -> int:
        """Clean steps since the last overflow or growth."""
        return self._growth_tracker

    @property
    def hysteresis_tracker(self) -> int:
        """Overflows still tolerated before backoff (``<= 0``: every overflow backs off)."""
        return self._hysteresis_tracker

    def update(self, found_inf: FoundInf) -> None:
        """Updates the trackers and the scale.

        Args:
            found_inf: Whether any gradient was inf or NaN this step (a bool or a one-element
                tensor; a tensor is read with ``bool()``, which synchronises with its device).
        """
        if bool(found_inf):
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = torch.clamp(self._scale * self.backoff_factor, min=self.min_scale)
                logger.debug("loss scale backed off to %s", self._scale.item())
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale = self._scale * self.growth_factor
                logger.debug("loss scale grew to %s", self._scale.item())

    def state_dict(self) -> Dict[str, Any]:
        """Returns ``scale`` (a tensor), ``growth_tracker`` and ``hysteresis_tracker``."""
        return {
            "scale": self._scale.clone(),
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores the scale and trackers; the scale stays on this scaler's device.

        Args:
            state_dict: A dict from ``state_dict()`` or a Megatron-LM checkpoint; ``scale`` may
                be a tensor on any device or a float.

        Raises:
            KeyError: If a key is missing.
            ValueError: If the stored scale is not a positive one-element value.
        """
        keys = ("scale", "growth_tracker", "hysteresis_tracker")
        missing = [key for key in keys if key not in state_dict]
        if missing:
            raise KeyError(
                f"grad scaler state_dict lacks {missing}; keys present: {sorted(state_dict)}"
            )
        scale = _scale_tensor(state_dict["scale"], self._scale.device)
        if not scale.item() > 0.0:
            raise ValueError(f"checkpoint loss scale must be positive, got {scale.item()}")
        self._scale = scale
        self._growth_tracker = int(state_dict["growth_tracker"])
        self._hysteresis_tracker = int(state_dict["hysteresis_tracker"])


def build_grad_scaler(
    *,
    fp16: bool,
    loss_scale: Optional[float],
    initial_loss_scale: float,
    min_loss_scale: float,
    loss_scale_window: int,
    hysteresis: int,
) -> Optional[MegatronGradScaler]:
    """Builds the loss scaler that Megatron-LM's flags describe.

    Args:
        fp16: Whether training runs in fp16; bf16 and fp32 need no loss scaling.
        loss_scale: A fixed loss scale (``--loss-scale``), or None for dynamic scaling.
        initial_loss_scale: Starting scale of the dynamic scaler (``--initial-loss-scale``).
        min_loss_scale: Floor of the dynamic scaler (``--min-loss-scale``).
        loss_scale_window: Clean steps before the dynamic scale doubles
            (``--loss-scale-window``).
        hysteresis: Overflows tolerated before the dynamic scale halves (``--hysteresis``).

    Returns:
        None when not ``fp16``; a ``ConstantGradScaler`` when ``loss_scale`` is given; otherwise
        a ``DynamicGradScaler`` with growth factor 2 and backoff factor 0.5.

    Raises:
        ValueError: If the chosen scaler rejects its arguments.
    """
    if not fp16:
        return None
    if loss_scale is not None:
        logger.info("using a constant loss scale of %s", loss_scale)
        return ConstantGradScaler(loss_scale)
    logger.info(
        "using a dynamic loss scale: initial %s, min %s, window %s, hysteresis %s",
        initial_loss_scale,
        min_loss_scale,
        loss_scale_window,
        hysteresis,
    )
    return DynamicGradScaler(
        initial_scale=initial_loss_scale,
        min_scale=min_loss_scale,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=loss_scale_window,
        hysteresis=hysteresis,
    )
