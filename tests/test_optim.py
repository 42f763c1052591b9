"""Optimisers and lr schedules: AdaBound against a plain numpy re-implementation, parameter groups,
each schedule's lr trajectory, and schedule/optimiser state surviving a save-rebuild-load mid-run."""

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from vascdist.config import OptimConfig, SchedConfig
from vascdist.errors import ConfigError, VascdistError
from vascdist.train.adabound import AdaBound
from vascdist.train.optim import build_optimizer, build_scheduler

pytestmark = pytest.mark.filterwarnings("error")  # torch's scheduler-order / deprecation warnings fail tests

# Per-element curvature of the toy quadratic: spans 1e-2..1e2 so AdaBound's step hits both bounds.
SCALES = np.array([0.01, 0.1, 1.0, 10.0, 100.0])
TARGET = np.array([1.0, -2.0, 0.5, 3.0, -1.0])
P0 = np.array([0.3, 0.7, -1.2, 0.0, 2.0])


def _numpy_adabound(lr_per_step, base_lr, betas, final_lr, gamma, eps, weight_decay, amsbound):
    """AdaBound written out plainly (Luo et al. 2019, reference code) on grad = SCALES * (p - TARGET)."""
    beta1, beta2 = betas
    p = P0.copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    v_max = np.zeros_like(p)
    trajectory = []
    for t, lr in enumerate(lr_per_step, start=1):
        g = SCALES * (p - TARGET) + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_max = np.maximum(v_max, v)
        denom = np.sqrt(v_max if amsbound else v) + eps
        step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        target_lr = final_lr * lr / base_lr
        lower = target_lr * (1 - 1 / (gamma * t + 1))
        upper = target_lr * (1 + 1 / (gamma * t))
        p = p - np.clip(step_size / denom, lower, upper) * m
        trajectory.append(p.copy())
    return trajectory


def _grad_step(opt, p):
    """Set grad = SCALES * (p - TARGET) and take one optimiser step."""
    p.grad = torch.from_numpy(SCALES) * (p.detach() - torch.from_numpy(TARGET))
    opt.step()


@pytest.mark.parametrize("amsbound", [False, True])
def test_adabound_matches_numpy_reimplementation(amsbound):
    kw = dict(betas=(0.9, 0.999), final_lr=0.1, gamma=0.1, eps=1e-8, weight_decay=0.01)
    # lr halves after step 3, as a schedule would do: the bounds must follow (final_lr * lr / base_lr).
    lrs = [0.01] * 3 + [0.005] * 5
    expected = _numpy_adabound(lrs, base_lr=0.01, amsbound=amsbound, **kw)

    p = torch.tensor(P0, dtype=torch.float64, requires_grad=True)
    opt = AdaBound([p], lr=0.01, amsbound=amsbound, **kw)
    for lr, want in zip(lrs, expected):
        opt.param_groups[0]["lr"] = lr
        _grad_step(opt, p)
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12, atol=1e-15)
    assert not np.allclose(expected[-1], P0)  # it really moved


def test_adabound_bounds_are_active():
    """At t = 1 with gamma = 0.1 the clip range is [0.1 * (1 - 1/1.1), 0.1 * 11]; the extreme curvatures hit it."""
    p = torch.tensor(P0, dtype=torch.float64, requires_grad=True)
    opt = AdaBound([p], lr=0.01, final_lr=0.1, gamma=0.1)
    _grad_step(opt, p)
    g = SCALES * (P0 - TARGET)
    m = 0.1 * g  # first moment after one step
    per_element_lr = (P0 - p.detach().numpy()) / m
    np.testing.assert_allclose(per_element_lr[[0, 4]], [0.1 * 11, 0.1 * (1 - 1 / 1.1)], rtol=1e-9)


def test_adabound_state_dict_round_trips_exactly():
    p_a = torch.tensor(P0, dtype=torch.float64, requires_grad=True)
    opt_a = AdaBound([p_a], lr=0.01, final_lr=0.1, gamma=0.1, weight_decay=0.01, amsbound=True)
    for _ in range(3):
        _grad_step(opt_a, p_a)
    opt_a.param_groups[0]["lr"] = 0.004  # a schedule moved the lr; base_lr must still be 0.01 after loading
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)

    p_b = p_a.detach().clone().requires_grad_(True)
    opt_b = AdaBound([p_b], lr=0.02, final_lr=0.1, gamma=0.1, weight_decay=0.01, amsbound=True)
    opt_b.load_state_dict(torch.load(buf))
    assert opt_b.param_groups[0]["lr"] == 0.004 and opt_b.param_groups[0]["base_lr"] == 0.01
    for _ in range(4):
        _grad_step(opt_a, p_a)
        _grad_step(opt_b, p_b)
    assert torch.equal(p_a, p_b)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert torch.equal(opt_a.state[p_a][key], opt_b.state[p_b][key])
    assert opt_a.state[p_a]["step"] == opt_b.state[p_b]["step"] == 7


# --------------------------------------------------------------------------------------------- build_optimizer
class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                      ("adamw", torch.optim.AdamW), ("adabound", AdaBound)])
def test_build_optimizer_splits_decay_from_biases_and_norms(name, cls):
    model = TinyNet()
    opt = build_optimizer(OptimConfig(name=name, lr=0.01, weight_decay=0.1), model)
    assert type(opt) is cls
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(model.conv.weight), id(model.head.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model.conv.bias), id(model.norm.weight),
                                                   id(model.norm.bias), id(model.head.bias)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["lr"] == no_decay["lr"] == 0.01


def test_sgd_weight_decay_shrinks_weights_but_not_biases_or_norms():
    model = TinyNet()
    cfg = OptimConfig(name="sgd", lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.1)
    opt = build_optimizer(cfg, model)
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only weight decay moves anything
    opt.step()
    for name, p in model.named_parameters():
        if name in ("conv.weight", "head.weight"):
            # Nesterov's first step applies the decay gradient (1 + momentum) times.
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.5 * 0.1 * 1.9))
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_frozen_parameters_are_left_out():
    model = TinyNet()
    model.conv.requires_grad_(False)
    opt = build_optimizer(OptimConfig(), model)
    assert sum(len(g["params"]) for g in opt.param_groups) == 4


@pytest.mark.parametrize("cfg,key", [(OptimConfig(name="sgd", momentum=0.0, nesterov=True), "optim.nesterov"),
                                     (OptimConfig(name="adabound", bound_gamma=0.0), "optim.bound_gamma"),
                                     (OptimConfig(name="adabound", final_lr=0.0), "optim.final_lr")])
def test_bad_optimizer_settings_are_config_errors(cfg, key):
    with pytest.raises(ConfigError, match=key):
        build_optimizer(cfg, TinyNet())


# --------------------------------------------------------------------------------------------- schedules
STEPS_PER_EPOCH = 4
# A validation metric that improves, stalls, improves and stalls again (plateau's input).
METRICS = [0.5, 0.6, 0.6, 0.55, 0.6, 0.7, 0.7, 0.7, 0.7, 0.65]


def _build(sched_cfg, epochs, optim_name="sgd"):
    model = nn.Linear(3, 2)  # weight + bias: two param groups
    opt = build_optimizer(OptimConfig(name=optim_name, lr=0.1), model)
    return opt, build_scheduler(sched_cfg, opt, STEPS_PER_EPOCH, epochs)


def _drive(opt, schedule, start, stop):
    """The training loop's calls from global step `start` to `stop`; returns the lr each step used."""
    used = []
    for step in range(start, stop):
        lrs = schedule.current_lrs()
        assert len(lrs) == 2 and lrs[0] == lrs[1]
        used.append(lrs[0])
        opt.step()
        schedule.after_step()
        if (step + 1) % STEPS_PER_EPOCH == 0:
            schedule.after_epoch()
            schedule.after_eval(METRICS[(step + 1) // STEPS_PER_EPOCH - 1])
    return used


def _per_epoch(used):
    return used[::STEPS_PER_EPOCH]


def test_none_keeps_lr_constant():
    opt, schedule = _build(SchedConfig(name="none"), epochs=3)
    assert _drive(opt, schedule, 0, 12) == [0.1] * 12


def test_step_halves_every_step_size_epochs():
    opt, schedule = _build(SchedConfig(name="step", step_size=2, gamma=0.5), epochs=6)
    used = _drive(opt, schedule, 0, 24)
    assert _per_epoch(used) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert len(set(used[:STEPS_PER_EPOCH])) == 1  # constant within an epoch


def test_exponential_decays_every_epoch():
    opt, schedule = _build(SchedConfig(name="exponential", gamma=0.5), epochs=4)
    assert _per_epoch(_drive(opt, schedule, 0, 16)) == pytest.approx([0.1, 0.05, 0.025, 0.0125])


def test_cosine_warms_up_to_peak_then_anneals_to_min_lr():
    opt, schedule = _build(SchedConfig(name="cosine", warmup_steps=2, min_lr=0.01), epochs=3)  # 12 steps
    used = _drive(opt, schedule, 0, 12)
    assert used[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])  # peak at step warmup_steps
    assert used[7] == pytest.approx(0.055)  # half-way through the cosine: (0.1 + 0.01) / 2
    assert all(a > b for a, b in zip(used[2:], used[3:]))
    assert schedule.current_lrs() == pytest.approx([0.01, 0.01])  # at the end of the run
    _drive(opt, schedule, 12, 16)  # a longer run than planned stays at the floor
    assert schedule.current_lrs() == pytest.approx([0.01, 0.01])


def test_onecycle_rises_to_peak_then_anneals_and_tolerates_extra_steps():
    opt, schedule = _build(SchedConfig(name="onecycle"), epochs=5)  # 20 steps, peak at 30%
    used = _drive(opt, schedule, 0, 20)
    assert used[0] == pytest.approx(0.1 / 25)
    assert max(used) == pytest.approx(0.1) and used.index(max(used)) == 5
    assert used[-1] == pytest.approx(0.1 / 25 / 1e4)
    assert schedule.current_lrs()[0] == pytest.approx(used[-1])  # the last step does not bend back up
    _drive(opt, schedule, 20, 24)  # past total_steps: no error, the final lr is kept
    assert schedule.current_lrs()[0] == pytest.approx(used[-1])


def test_plateau_decays_after_patience_non_improving_evals():
    opt, schedule = _build(SchedConfig(name="plateau", patience=2, gamma=0.5), epochs=10)
    # Evals: 0.5 0.6 | 0.6 0.55 (2 tolerated) 0.6 (3rd: decay) | 0.7 | 0.7 0.7 0.7 (decay) | 0.65
    assert _per_epoch(_drive(opt, schedule, 0, 40)) == pytest.approx(
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025])


@pytest.mark.parametrize("name", ["none", "step", "exponential", "cosine", "onecycle", "plateau"])
@pytest.mark.parametrize("stop_at", [9, 12])  # mid-epoch and at an epoch boundary
@pytest.mark.parametrize("optimizer_first", [True, False])
def test_schedule_state_round_trips_mid_run(name, stop_at, optimizer_first):
    cfg = SchedConfig(name=name, step_size=2, gamma=0.5, warmup_steps=3, min_lr=0.001, patience=1)
    epochs = 7
    opt, schedule = _build(cfg, epochs, optim_name="adabound")
    uninterrupted = _drive(opt, schedule, 0, 28)

    opt, schedule = _build(cfg, epochs, optim_name="adabound")
    first = _drive(opt, schedule, 0, stop_at)
    buf = io.BytesIO()
    torch.save({"optim": opt.state_dict(), "sched": schedule.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)

    # A fresh process: rebuild from config, then load (the loop may load in either order).
    model = nn.Linear(3, 2)
    opt = build_optimizer(OptimConfig(name="adabound", lr=0.1), model)
    if optimizer_first:
        opt.load_state_dict(saved["optim"])
        schedule = build_scheduler(cfg, opt, STEPS_PER_EPOCH, epochs)
    else:
        schedule = build_scheduler(cfg, opt, STEPS_PER_EPOCH, epochs)
        opt.load_state_dict(saved["optim"])
    schedule.load_state_dict(saved["sched"])
    resumed = first + _drive(opt, schedule, stop_at, 28)
    assert resumed == uninterrupted
    assert opt.param_groups[0]["base_lr"] == 0.1  # AdaBound's bound scaling survives too


def test_bad_schedule_settings_are_errors():
    with pytest.raises(ConfigError, match="sched.warmup_steps"):
        _build(SchedConfig(name="cosine", warmup_steps=12), epochs=3)
    with pytest.raises(ConfigError, match="sched.min_lr"):
        _build(SchedConfig(name="cosine", min_lr=0.2), epochs=3)
    with pytest.raises(ConfigError, match="sched.gamma"):
        _build(SchedConfig(name="plateau", gamma=1.0), epochs=3)
    opt, schedule = _build(SchedConfig(name="step"), epochs=3)
    with pytest.raises(VascdistError, match="sched.name"):
        _build(SchedConfig(name="cosine"), epochs=3)[1].load_state_dict(schedule.state_dict())
    with pytest.raises(VascdistError, match="batch_size"):
        build_scheduler(SchedConfig(), opt, steps_per_epoch=0, epochs=3)
