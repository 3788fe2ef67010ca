"""Tests for the learning-rate/weight-decay scheduler and the fp16 loss scalers (CPU only)."""

import math

import pytest
import torch

from megatron.training.grad_scaler import (
    ConstantGradScaler,
    DynamicGradScaler,
    MegatronGradScaler,
    build_grad_scaler,
)
from megatron.training.optimizer_param_scheduler import OptimizerParamScheduler


class FakeOptimizer:
    def __init__(self, *groups):
        self.param_groups = [dict(g) for g in groups] or [{}]


def make_scheduler(optimizer=None, **overrides):
    kwargs = dict(
        init_lr=0.0,
        max_lr=1.0,
        min_lr=0.1,
        lr_warmup_steps=10,
        lr_decay_steps=110,
        lr_decay_style="linear",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=100,
        wd_incr_style="constant",
    )
    kwargs.update(overrides)
    return OptimizerParamScheduler(optimizer or FakeOptimizer(), **kwargs)


def lr_at(sched, step):
    sched.step(step - sched.num_steps)
    return sched.optimizer.param_groups[0]["lr"]


# --------------------------------------------------------------------------- scheduler


def test_constructor_sets_lr_immediately():
    opt = FakeOptimizer()
    make_scheduler(opt, init_lr=0.2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.01)


@pytest.mark.parametrize(
    "init_lr,step,expected", [(0.0, 0, 0.0), (0.0, 5, 0.5), (0.0, 10, 1.0), (0.2, 5, 0.6)]
)
def test_warmup_is_linear_from_init_lr(init_lr, step, expected):
    sched = make_scheduler(init_lr=init_lr, lr_decay_style="cosine")
    assert lr_at(sched, step) == pytest.approx(expected)


@pytest.mark.parametrize(
    "style,step,expected",
    [
        ("linear", 35, 0.1 + 0.9 * 0.75),
        ("linear", 60, 0.55),
        ("linear", 110, 0.1),
        ("cosine", 35, 0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5))),
        ("cosine", 60, 0.55),
        ("cosine", 85, 0.1 + 0.9 * 0.5 * (1 - math.sqrt(0.5))),
        ("constant", 60, 1.0),
        ("constant", 10_000, 1.0),  # Megatron: constant means max_lr after warmup, always
    ],
)
def test_decay_styles(style, step, expected):
    assert lr_at(make_scheduler(lr_decay_style=style), step) == pytest.approx(expected)


@pytest.mark.parametrize("style", ["linear", "cosine", "inverse-square-root"])
def test_min_lr_floor_after_decay(style):
    sched = make_scheduler(lr_decay_style=style)
    for step in (111, 500, 10**7):
        assert lr_at(sched, step) == pytest.approx(0.1)


def test_inverse_square_root():
    sched = make_scheduler(
        lr_decay_style="inverse-square-root", lr_warmup_steps=16, lr_decay_steps=10**6, min_lr=0.01
    )
    assert lr_at(sched, 64) == pytest.approx(0.5)  # sqrt(16) / sqrt(64)
    assert lr_at(sched, 40_000) == pytest.approx(0.02)  # 4 / 200
    assert lr_at(sched, 640_000) == pytest.approx(0.01)  # 4 / 800 = 0.005, floored


def test_step_counts_samples():
    sched = make_scheduler()
    for _ in range(3):
        sched.step(increment=20)  # e.g. a global batch of 20 samples
    assert sched.num_steps == 60
    assert sched.get_lr() == pytest.approx(0.55)
    assert sched.get_lr_at(35) == pytest.approx(0.775)
    with pytest.raises(ValueError, match="-1"):
        sched.step(-1)


@pytest.mark.parametrize(
    "style,step,expected",
    [("linear", 25, 0.025), ("cosine", 25, 0.05 * (1 - math.sqrt(0.5))), ("linear", 200, 0.1)],
)
def test_weight_decay_increment(style, step, expected):
    sched = make_scheduler(start_wd=0.0, end_wd=0.1, wd_incr_style=style)
    sched.step(step)
    assert sched.get_wd() == pytest.approx(expected)
    assert sched.optimizer.param_groups[0]["weight_decay"] == pytest.approx(expected)


def test_lr_and_wd_multipliers():
    opt = FakeOptimizer({}, {"lr_mult": 0.5, "wd_mult": 0.0}, {"lr_mult": 2.0})
    sched = make_scheduler(opt)
    sched.step(60)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.55, 0.275, 1.1])
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.01, 0.0, 0.01])


def test_works_with_torch_optimizer():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=123.0)
    make_scheduler(opt, init_lr=0.3).step(5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.65)


def test_state_dict_keys_are_megatrons():
    assert set(make_scheduler().state_dict()) == {
        "max_lr",
        "lr_warmup_steps",
        "num_steps",
        "lr_decay_style",
        "lr_decay_steps",
        "min_lr",
        "start_wd",
        "end_wd",
        "wd_incr_style",
        "wd_incr_steps",
    }


def test_state_dict_round_trip_continues_identically():
    first = make_scheduler(
        lr_decay_style="cosine", start_wd=0.0, end_wd=0.1, wd_incr_style="linear"
    )
    for inc in (3, 4, 7, 11):
        first.step(inc)
    state = first.state_dict()
    second = make_scheduler(max_lr=5.0, lr_warmup_steps=0, lr_decay_steps=7)
    second.load_state_dict(state)
    assert second.state_dict() == state
    for inc in (1, 9, 30, 50, 100):
        first.step(inc)
        second.step(inc)
        assert second.optimizer.param_groups == first.optimizer.param_groups


def test_load_mismatch_raises_naming_key_and_values():
    state = make_scheduler(max_lr=2.0).state_dict()
    strict = make_scheduler(use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ValueError, match=r"max_lr is 1\.0 here but 2\.0"):
        strict.load_state_dict(state)
    assert strict.max_lr == 1.0
    matching = make_scheduler(use_checkpoint_opt_param_scheduler=False)
    matching.load_state_dict(dict(make_scheduler().state_dict(), num_steps=60))
    assert matching.get_lr() == pytest.approx(0.55)


def test_override_keeps_class_values_but_takes_num_steps():
    old = make_scheduler(max_lr=2.0, lr_decay_style="constant")
    old.step(60)
    new = make_scheduler(
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False
    )
    new.load_state_dict(old.state_dict())
    assert (new.max_lr, new.lr_decay_style, new.num_steps) == (1.0, "linear", 60)
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(0.55)


def test_use_checkpoint_takes_checkpoint_values():
    old = make_scheduler(max_lr=2.0, min_lr=0.0, lr_decay_steps=210)
    old.step(110)
    new = make_scheduler()
    new.load_state_dict(old.state_dict())
    assert (new.max_lr, new.min_lr, new.lr_decay_steps) == (2.0, 0.0, 210)
    assert new.get_lr() == pytest.approx(1.0)  # halfway through a linear 2.0 -> 0.0 decay


@pytest.mark.parametrize(
    "warmup_key,decay_key", [("warmup_iter", "end_iter"), ("warmup_steps", "decay_steps")]
)
def test_legacy_keys(warmup_key, decay_key):
    legacy = {
        "start_lr": 1.0,
        "min_lr": 0.1,
        warmup_key: 10,
        decay_key: 110,
        "decay_style": "linear",
        "num_iters": 60,
    }
    sched = make_scheduler(
        max_lr=3.0, lr_decay_style="cosine", start_wd=0.0, end_wd=0.1, wd_incr_style="linear"
    )
    sched.load_state_dict(legacy)
    assert (sched.max_lr, sched.lr_decay_style, sched.num_steps) == (1.0, "linear", 60)
    assert sched.get_lr() == pytest.approx(0.55)
    assert (sched.start_wd, sched.end_wd) == (0.0, 0.1)  # absent from legacy: kept


def test_load_missing_key_raises():
    with pytest.raises(KeyError, match="num_steps"):
        make_scheduler().load_state_dict(
            {
                "max_lr": 1.0,
                "min_lr": 0.1,
                "lr_warmup_steps": 1,
                "lr_decay_steps": 5,
                "lr_decay_style": "linear",
            }
        )


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"max_lr": 0.05}, r"max_lr 0\.05 is smaller than min_lr 0\.1"),
        ({"min_lr": -0.1}, r"min_lr must be non-negative, got -0\.1"),
        ({"init_lr": 2.0}, r"init_lr 2\.0 is larger than max_lr 1\.0"),
        ({"lr_warmup_steps": -1}, "lr_warmup_steps must be non-negative"),
        ({"lr_decay_steps": 0}, "lr_decay_steps must be positive, got 0"),
        ({"lr_warmup_steps": 200}, "lr_warmup_steps 200 exceeds lr_decay_steps 110"),
        ({"lr_decay_style": "exp"}, "unknown lr_decay_style 'exp'"),
        ({"wd_incr_style": "step"}, "unknown wd_incr_style 'step'"),
        ({"start_wd": -1.0}, "start_wd must be non-negative"),
        ({"end_wd": 0.5}, "needs start_wd == end_wd"),
        ({"end_wd": 0.0, "wd_incr_style": "linear"}, "end_wd 0.0 is smaller than start_wd"),
        (
            {"wd_incr_steps": 0, "end_wd": 0.1, "wd_incr_style": "cosine"},
            "needs positive wd_incr_steps, got 0",
        ),
    ],
)
def test_scheduler_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_scheduler(**overrides)


def test_optimizer_without_param_groups_rejected():
    with pytest.raises(ValueError, match="object has no param_groups"):
        OptimizerParamScheduler(
            object(),
            init_lr=0.0,
            max_lr=1.0,
            min_lr=0.0,
            lr_warmup_steps=0,
            lr_decay_steps=1,
            lr_decay_style="linear",
            start_wd=0.0,
            end_wd=0.0,
            wd_incr_steps=0,
        )


# --------------------------------------------------------------------------- grad scaler


def make_dynamic(**overrides):
    kwargs = dict(
        initial_scale=2.0**16,
        min_scale=2.0**10,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=4,
        hysteresis=2,
    )
    kwargs.update(overrides)
    return DynamicGradScaler(**kwargs)


def test_scale_is_one_element_float32_and_inverse():
    scaler = make_dynamic()
    assert scaler.scale.dtype == torch.float32 and scaler.scale.shape == (1,)
    assert scaler.scale.item() == 2.0**16
    assert scaler.inv_scale.item() == 2.0**-16
    loss = torch.ones(3)
    assert torch.equal(loss * scaler.scale.to(loss.device), torch.full((3,), 2.0**16))
    assert scaler.to("cpu") is scaler


def test_backoff_only_after_hysteresis_overflows():
    scaler = make_dynamic(hysteresis=3)
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale.item() == 2.0**16
    scaler.update(True)
    assert scaler.scale.item() == 2.0**15
    scaler.update(torch.tensor(1.0))  # tracker stays <= 0: every further overflow backs off
    assert scaler.scale.item() == 2.0**14
    assert scaler.hysteresis_tracker == -1


def test_clean_step_does_not_reset_hysteresis():
    scaler = make_dynamic(hysteresis=2)
    scaler.update(True)
    scaler.update(False)
    scaler.update(True)  # second overflow, though not consecutive: backs off (Megatron)
    assert scaler.scale.item() == 2.0**15


def test_backoff_never_below_min_scale():
    scaler = make_dynamic(initial_scale=2.0**12, min_scale=3000.0, hysteresis=1)
    for _ in range(10):
        scaler.update(True)
    assert scaler.scale.item() == 3000.0


def test_growth_after_interval_resets_trackers():
    scaler = make_dynamic(growth_interval=4, hysteresis=2)
    scaler.update(True)
    assert scaler.hysteresis_tracker == 1
    for _ in range(3):
        scaler.update(False)
    assert scaler.scale.item() == 2.0**16
    scaler.update(False)
    assert scaler.scale.item() == 2.0**17
    assert (scaler.growth_tracker, scaler.hysteresis_tracker) == (0, 2)


def test_overflow_resets_growth_tracker():
    scaler = make_dynamic(growth_interval=4, hysteresis=5)
    for _ in range(3):
        scaler.update(False)
    scaler.update(True)
    assert scaler.growth_tracker == 0
    for _ in range(3):
        scaler.update(False)
    assert scaler.scale.item() == 2.0**16  # only 3 clean steps since the overflow
    scaler.update(False)
    assert scaler.scale.item() == 2.0**17


def test_dynamic_state_dict_round_trip():
    pattern = [False, True, False, False, True, True, False, False, False, False, True]
    first = make_dynamic(growth_interval=3, hysteresis=2)
    for found_inf in pattern:
        first.update(found_inf)
    state = first.state_dict()
    assert set(state) == {"scale", "growth_tracker", "hysteresis_tracker"}
    second = make_dynamic(initial_scale=2.0**20, growth_interval=3, hysteresis=2)
    second.load_state_dict(state)
    for found_inf in pattern * 2:
        first.update(found_inf)
        second.update(found_inf)
        assert torch.equal(first.scale, second.scale)
        assert first.state_dict()["growth_tracker"] == second.state_dict()["growth_tracker"]
    third = make_dynamic()
    third.load_state_dict(dict(state, scale=1024.0))  # a plain float is accepted too
    assert third.scale.item() == 1024.0


def test_dynamic_load_rejects_bad_state():
    with pytest.raises(KeyError, match="hysteresis_tracker"):
        make_dynamic().load_state_dict({"scale": torch.tensor([1.0]), "growth_tracker": 0})
    with pytest.raises(ValueError, match="positive, got 0.0"):
        make_dynamic().load_state_dict(
            {"scale": torch.tensor([0.0]), "growth_tracker": 0, "hysteresis_tracker": 1}
        )


def test_constant_scaler_never_changes():
    scaler = ConstantGradScaler(128.0)
    for found_inf in (True, True, False, True) + (False,) * 2000:
        scaler.update(found_inf)
    assert scaler.scale.item() == 128.0
    assert scaler.state_dict() == {}
    scaler.load_state_dict({"scale": torch.tensor([1.0])})
    assert scaler.scale.item() == 128.0


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"initial_scale": 0.0}, "initial_scale must be positive, got 0.0"),
        ({"min_scale": 0.0}, "min_scale 0.0"),
        ({"min_scale": 2.0**17}, r"min_scale 131072\.0 and initial_scale 65536\.0"),
        ({"growth_factor": 1.0}, "growth_factor must be greater than 1, got 1.0"),
        ({"backoff_factor": 1.0}, "backoff_factor .* got 1.0"),
        ({"backoff_factor": 0.0}, "backoff_factor .* got 0.0"),
        ({"growth_interval": 0}, "growth_interval must be positive, got 0"),
        ({"hysteresis": 0}, "hysteresis must be positive, got 0"),
    ],
)
def test_dynamic_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_dynamic(**overrides)


def test_constant_validation_and_abstract_base():
    with pytest.raises(ValueError, match="initial_scale must be positive, got -1.0"):
        ConstantGradScaler(-1.0)
    with pytest.raises(TypeError):
        MegatronGradScaler(1.0)


def test_build_grad_scaler():
    common = dict(
        initial_loss_scale=2.0**32, min_loss_scale=1.0, loss_scale_window=1000, hysteresis=2
    )
    assert build_grad_scaler(fp16=False, loss_scale=None, **common) is None
    assert build_grad_scaler(fp16=False, loss_scale=8.0, **common) is None
    constant = build_grad_scaler(fp16=True, loss_scale=8.0, **common)
    assert isinstance(constant, ConstantGradScaler) and constant.scale.item() == 8.0
    dynamic = build_grad_scaler(fp16=True, loss_scale=None, **common)
    assert isinstance(dynamic, DynamicGradScaler)
    assert dynamic.scale.item() == 2.0**32 and dynamic.min_scale == 1.0
    assert (dynamic.growth_factor, dynamic.backoff_factor) == (2.0, 0.5)
    assert (dynamic.growth_interval, dynamic.hysteresis) == (1000, 2)
