"""Learning-rate annealing and weight-decay increment (Megatron-LM's ``OptimizerParamScheduler``).

The learning rate rises linearly from ``init_lr`` to ``max_lr`` over ``lr_warmup_steps`` and then
decays to ``min_lr`` by ``lr_decay_steps``; weight decay moves from ``start_wd`` to ``end_wd``
over ``wd_incr_steps``. A "step" is whatever unit the caller counts in: Megatron advances the
scheduler by the global batch size (samples) when training by samples and by one otherwise.

Each optimizer parameter group receives ``lr * group.get("lr_mult", 1.0)`` and
``weight_decay = wd * group.get("wd_mult", 1.0)``.

The ``state_dict`` keys are Megatron-LM's, and ``load_state_dict`` also reads the keys of its
older ``AnnealingLR`` checkpoints (``start_lr``, ``warmup_iter``, ``end_iter``, ``decay_style``,
``num_iters``, ``warmup_steps``, ``decay_steps``).
"""

import logging
import math
from typing import Any, Dict, List, Mapping, Protocol, Tuple

__all__ = ["LR_DECAY_STYLES", "WD_INCR_STYLES", "OptimizerParamScheduler"]

logger = logging.getLogger(__name__)

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
WD_INCR_STYLES = ("constant", "linear", "cosine")

# Checkpoint key -> the names it may be stored under, searched in this order. Older Megatron
# checkpoints used the legacy names, which take precedence exactly as in Megatron-LM.
_CHECKPOINT_KEYS: Dict[str, Tuple[str, ...]] = {
    "max_lr": ("start_lr", "max_lr"),
    "min_lr": ("min_lr",),
    "lr_warmup_steps": ("warmup_iter", "warmup_steps", "lr_warmup_steps"),
    "lr_decay_steps": ("end_iter", "decay_steps", "lr_decay_steps"),
    "lr_decay_style": ("decay_style", "lr_decay_style"),
    "num_steps": ("num_iters", "num_steps"),
}
# Checkpoints written before weight-decay scheduling existed lack these; they are then ignored.
_WD_KEYS = ("start_wd", "end_wd", "wd_incr_steps", "wd_incr_style")


class _HasParamGroups(Protocol):
    param_groups: List[Dict[str, Any]]


class OptimizerParamScheduler:
    """Anneals the learning rate and increments the weight decay of an optimizer.

    Learning rate at step ``n`` (``W = lr_warmup_steps``, ``D = lr_decay_steps``):

    * ``n <= W`` (and ``W > 0``): ``init_lr + (max_lr - init_lr) * n / W``.
    * style ``constant``: ``max_lr`` (for every step after warmup, as in Megatron-LM).
    * ``n > D``: ``min_lr``.
    * otherwise, with ``r = (n - W) / (D - W)``: ``linear`` gives
      ``min_lr + (max_lr - min_lr) * (1 - r)``; ``cosine`` gives
      ``min_lr + (max_lr - min_lr) * 0.5 * (cos(pi * r) + 1)``; ``inverse-square-root`` gives
      ``max(min_lr, max_lr * sqrt(max(W, 1)) / sqrt(max(n, 1)))``.

    Weight decay at step ``n`` (``I = wd_incr_steps``): ``end_wd`` when ``n > I`` or the style is
    ``constant``; otherwise ``start_wd + (end_wd - start_wd) * c`` with ``c = n / I`` (``linear``)
    or ``c = 0.5 * (cos(pi * (1 - n / I)) + 1)`` (``cosine``).

    Args:
        optimizer: Anything with ``param_groups`` (a list of dicts), e.g. a ``torch.optim``
            optimizer. Groups may carry ``lr_mult`` and ``wd_mult`` (default 1.0).
        init_lr: Learning rate at step 0 of the warmup.
        max_lr: Learning rate at the end of warmup.
        min_lr: Learning rate floor, reached at ``lr_decay_steps``.
        lr_warmup_steps: Length of the linear warmup.
        lr_decay_steps: Step at which the decay ends (counted from 0, warmup included).
        lr_decay_style: One of ``LR_DECAY_STYLES``.
        start_wd: Weight decay at step 0.
        end_wd: Weight decay from ``wd_incr_steps`` on.
        wd_incr_steps: Length of the weight-decay increment.
        wd_incr_style: One of ``WD_INCR_STYLES``; ``constant`` requires ``start_wd == end_wd``.
        use_checkpoint_opt_param_scheduler: On load, take the hyperparameters from the
            checkpoint; when False they must equal the constructor's.
        override_opt_param_scheduler: On load, keep the constructor's hyperparameters and take
            only the step count from the checkpoint. Wins over the flag above.

    Raises:
        ValueError: If a hyperparameter is out of range or a style is unknown.
    """

    def __init__(
        self,
        optimizer: _HasParamGroups,
        *,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: int,
        lr_decay_steps: int,
        lr_decay_style: str,
        start_wd: float,
        end_wd: float,
        wd_incr_steps: int,
        wd_incr_style: str = "constant",
        use_checkpoint_opt_param_scheduler: bool = True,
        override_opt_param_scheduler: bool = False,
    ) -> None:
        if not hasattr(optimizer, "param_groups"):
            raise ValueError(
                f"optimizer of type {type(optimizer).__name__} has no param_groups attribute"
            )
        self.optimizer = optimizer
        self.init_lr = float(init_lr)
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.lr_warmup_steps = int(lr_warmup_steps)
        self.lr_decay_steps = int(lr_decay_steps)
        self.lr_decay_style = lr_decay_style
        self.start_wd = float(start_wd)
        self.end_wd = float(end_wd)
        self.wd_incr_steps = int(wd_incr_steps)
        self.wd_incr_style = wd_incr_style
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.override_opt_param_scheduler = override_opt_param_scheduler
        if override_opt_param_scheduler and not use_checkpoint_opt_param_scheduler:
            logger.info(
                "override_opt_param_scheduler is set: checkpoint hyperparameters will be "
                "ignored, not checked"
            )
        self._validate()
        self.num_steps = 0
        self.step(0)

    def _validate(self) -> None:
        """Checks the hyperparameters; raises ValueError naming the values at fault."""
        for name in ("init_lr", "min_lr", "lr_warmup_steps", "start_wd", "end_wd", "wd_incr_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.max_lr < self.min_lr:
            raise ValueError(f"max_lr {self.max_lr} is smaller than min_lr {self.min_lr}")
        if self.init_lr > self.max_lr:
            raise ValueError(f"init_lr {self.init_lr} is larger than max_lr {self.max_lr}")
        if self.lr_decay_steps <= 0:
            raise ValueError(f"lr_decay_steps must be positive, got {self.lr_decay_steps}")
        if self.lr_warmup_steps > self.lr_decay_steps:
            raise ValueError(
                f"lr_warmup_steps {self.lr_warmup_steps} exceeds lr_decay_steps "
                f"{self.lr_decay_steps}"
            )
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(
                f"unknown lr_decay_style {self.lr_decay_style!r}; expected one of {LR_DECAY_STYLES}"
            )
        if self.wd_incr_style not in WD_INCR_STYLES:
            raise ValueError(
                f"unknown wd_incr_style {self.wd_incr_style!r}; expected one of {WD_INCR_STYLES}"
            )
        if self.end_wd < self.start_wd:
            raise ValueError(f"end_wd {self.end_wd} is smaller than start_wd {self.start_wd}")
        if self.wd_incr_style == "constant" and self.start_wd != self.end_wd:
            raise ValueError(
                f"wd_incr_style 'constant' needs start_wd == end_wd, got start_wd "
                f"{self.start_wd} and end_wd {self.end_wd}"
            )
        if self.wd_incr_style != "constant" and self.wd_incr_steps <= 0:
            raise ValueError(
                f"wd_incr_style {self.wd_incr_style!r} needs positive wd_incr_steps, got "
                f"{self.wd_incr_steps}"
            )

    def get_lr_at(self, step: int) -> float:
        """Returns the (unmultiplied) learning rate at ``step``.

        Raises:
            ValueError: If ``step`` is negative.
        """
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        warmup = self.lr_warmup_steps
        if warmup > 0 and step <= warmup:
            return self.init_lr + (self.max_lr - self.init_lr) * float(step) / float(warmup)
        if self.lr_decay_style == "constant":
            return self.max_lr
        if step > self.lr_decay_steps:
            return self.min_lr
        if self.lr_decay_style == "inverse-square-root":
            lr = self.max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(step, 1))
            return max(self.min_lr, lr)
        # warmup < step <= lr_decay_steps here, so the denominator is positive.
        decay_ratio = float(step - warmup) / float(self.lr_decay_steps - warmup)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - decay_ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def get_wd_at(self, step: int) -> float:
        """Returns the (unmultiplied) weight decay at ``step``.

        Raises:
            ValueError: If ``step`` is negative.
        """
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        if step > self.wd_incr_steps or self.wd_incr_style == "constant":
            return self.end_wd
        incr_ratio = float(step) / float(self.wd_incr_steps)
        if self.wd_incr_style == "linear":
            coeff = incr_ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * (1.0 - incr_ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self) -> float:
        """Returns the learning rate at the current ``num_steps``."""
        return self.get_lr_at(self.num_steps)

    def get_wd(self) -> float:
        """Returns the weight decay at the current ``num_steps``."""
        return self.get_wd_at(self.num_steps)

    def step(self, increment: int) -> None:
        """Advances ``num_steps`` by ``increment`` and writes lr and weight decay to the groups.

        Args:
            increment: Steps to advance (samples or iterations, as the caller counts them).

        Raises:
            ValueError: If ``increment`` is negative.
        """
        if increment < 0:
            raise ValueError(f"increment must be non-negative, got {increment}")
        self.num_steps += increment
        new_lr = self.get_lr()
        new_wd = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = new_wd * group.get("wd_mult", 1.0)

    def state_dict(self) -> Dict[str, Any]:
        """Returns the hyperparameters and step count under Megatron-LM's key names."""
        return {
            "max_lr": self.max_lr,
            "lr_warmup_steps": self.lr_warmup_steps,
            "num_steps": self.num_steps,
            "lr_decay_style": self.lr_decay_style,
            "lr_decay_steps": self.lr_decay_steps,
            "min_lr": self.min_lr,
            "start_wd": self.start_wd,
            "end_wd": self.end_wd,
            "wd_incr_style": self.wd_incr_style,
            "wd_incr_steps": self.wd_incr_steps,
        }

    def _check_and_set(self, name: str, cls_value: Any, sd_value: Any) -> Any:
        """Chooses between the constructor's and the checkpoint's value of one hyperparameter."""
        if self.override_opt_param_scheduler:
            logger.info("overriding %s value to %s", name, cls_value)
            return cls_value
        if not self.use_checkpoint_opt_param_scheduler and cls_value != sd_value:
            raise ValueError(
                f"the learning-rate schedule's {name} is {cls_value} here but {sd_value} in "
                "the checkpoint: keep the schedule flags of the run that saved it, or pass "
                "--use-checkpoint-opt_param-scheduler (take the checkpoint's) or "
                "--override-opt_param-scheduler (take these flags')"
            )
        logger.info("using checkpoint value %s for %s", sd_value, name)
        return sd_value

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores the step count and, per the constructor's flags, the hyperparameters.

        Args:
            state_dict: A dict from ``state_dict()`` or from a Megatron-LM checkpoint, current or
                legacy key names.

        Raises:
            KeyError: If a required key is missing under all of its names.
            ValueError: If ``use_checkpoint_opt_param_scheduler`` and
                ``override_opt_param_scheduler`` are both False and a hyperparameter differs
                from the checkpoint's, or the resulting hyperparameters are invalid.
        """
        values = {name: _lookup(state_dict, name) for name in _CHECKPOINT_KEYS}
        if "start_wd" in state_dict:
            values.update({name: state_dict[name] for name in _WD_KEYS})
        num_steps = int(values.pop("num_steps"))
        if num_steps < 0:
            raise ValueError(f"checkpoint num_steps must be non-negative, got {num_steps}")
        chosen = {
            name: self._check_and_set(name, getattr(self, name), sd_value)
            for name, sd_value in values.items()
        }
        previous = {name: getattr(self, name) for name in chosen}
        for name, value in chosen.items():
            setattr(self, name, value)
        try:
            self._validate()
        except ValueError:
            for name, value in previous.items():  # leave the scheduler as it was
                setattr(self, name, value)
            raise
        self.num_steps = num_steps
        self.step(0)


def _lookup(state_dict: Mapping[str, Any], name: str) -> Any:
    """Returns ``state_dict``'s value for ``name`` under its first present (legacy) key."""
    for key in _CHECKPOINT_KEYS[name]:
        if key in state_dict:
            return state_dict[key]
    raise KeyError(
        f"scheduler state_dict has none of the keys {_CHECKPOINT_KEYS[name]} for {name}; "
        f"keys present: {sorted(state_dict)}"
    )
