"""LARS against a hand-computed step; warm-up + cosine schedule values; lr scaling rule."""
import math

import pytest
import torch
from torch import nn

from loco_det.pretrain.config import load_config
from loco_det.pretrain.optim import (LARS, WarmupCosine, build_optimizer, build_scheduler,
                                     peak_lr, split_decay_params)


def test_lars_two_steps_by_hand():
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))   # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    lr, mom, wd, eta = 2.0, 0.9, 0.1, 0.001
    opt = LARS([{"params": [w], "weight_decay": wd, "lars": True},
                {"params": [b], "weight_decay": 0.0, "lars": False}],
               lr=lr, momentum=mom, eta=eta)
    g = [0.6, 0.8]                                                      # ||g|| = 1

    # step 1: g' = g + wd w = (0.9, 1.2), ||g'|| = 1.5, trust = eta * 5 / 1.5
    w.grad = torch.tensor(g, dtype=torch.float64)
    b.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    trust = eta * 5 / 1.5
    v = [lr * trust * 0.9, lr * trust * 1.2]                            # (0.006, 0.008)
    assert w.tolist() == pytest.approx([3 - v[0], 4 - v[1]], abs=1e-12)
    assert w.tolist() == pytest.approx([2.994, 3.992], abs=1e-12)
    # bias: no decay, no trust ratio: v = lr * 0.5 = 1
    assert b.tolist() == pytest.approx([0.0], abs=1e-12)

    # step 2, same gradient: momentum carries v
    w1 = w.tolist()
    w.grad = torch.tensor(g, dtype=torch.float64)
    b.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    gp = [g[0] + wd * w1[0], g[1] + wd * w1[1]]
    trust = eta * math.hypot(*w1) / math.hypot(*gp)
    v = [mom * v[0] + lr * trust * gp[0], mom * v[1] + lr * trust * gp[1]]
    assert w.tolist() == pytest.approx([w1[0] - v[0], w1[1] - v[1]], abs=1e-12)
    assert b.tolist() == pytest.approx([0.0 - (0.9 * 1.0 + 1.0)], abs=1e-12)


def test_lars_zero_grad_or_weight_uses_trust_one():
    w = nn.Parameter(torch.zeros(3))
    opt = LARS([w], lr=0.5, momentum=0.0, eta=0.001)
    w.grad = torch.ones(3)
    opt.step()  # ||w|| = 0: trust 1, plain SGD step
    assert w.tolist() == pytest.approx([-0.5] * 3)


def test_bn_and_bias_excluded_from_decay_and_adaptation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4, 2))
    regular, excluded = split_decay_params(model)
    assert {id(p) for p in regular} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in excluded} == {id(model[1].weight), id(model[1].bias),
                                         id(model[3].bias)}
    cfg = load_config(None, ["OPTIM.NAME=lars", "OPTIM.WEIGHT_DECAY=0.5", "OPTIM.BATCH_SIZE=512"])
    opt = build_optimizer(cfg, model)
    (reg, exc) = opt.param_groups
    assert reg["lars"] and reg["weight_decay"] == 0.5
    assert not exc["lars"] and exc["weight_decay"] == 0.0
    assert reg["lr"] == pytest.approx(0.3 * 512 / 256)
    for name in ("sgd", "adamw"):
        opt = build_optimizer(load_config(None, [f"OPTIM.NAME={name}"]), model)
        assert [g["weight_decay"] for g in opt.param_groups] == [1e-6, 0.0]  # the default


def test_lr_scales_with_global_batch():
    assert peak_lr(load_config(None, ["OPTIM.BATCH_SIZE=4096", "OPTIM.BASE_LR=0.3"])) \
        == pytest.approx(4.8)
    assert peak_lr(load_config(None, ["OPTIM.BATCH_SIZE=64", "OPTIM.BASE_LR=1.0"])) \
        == pytest.approx(0.25)


def test_warmup_cosine_values():
    f = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.0)
    assert f(0) == pytest.approx(0.1)          # first step already moves
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)          # end of warm-up: peak
    assert f(10) == pytest.approx(1.0)         # cosine starts at the peak
    assert f(60) == pytest.approx(0.5)         # half-way through the decay
    assert f(109) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert f(110) == pytest.approx(0.0)
    g = WarmupCosine(0, 100, min_ratio=0.1)
    assert g(0) == pytest.approx(1.0) and g(100) == pytest.approx(0.1)


def test_scheduler_steps_per_optimizer_step():
    cfg = load_config(None, ["OPTIM.BATCH_SIZE=256", "OPTIM.BASE_LR=0.4", "OPTIM.EPOCHS=4",
                             "OPTIM.WARMUP_EPOCHS=1"])
    model = nn.Linear(2, 2)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, steps_per_epoch=5)   # 20 steps, 5 of warm-up
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.4 / 5)
    assert lrs[4] == pytest.approx(0.4)                    # peak at the end of warm-up
    assert lrs[5] == pytest.approx(0.4)
    assert lrs[12] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert lrs[-1] < 0.01 and lrs == sorted(lrs[:5]) + sorted(lrs[5:], reverse=True)
    # state round trip (resume)
    sched2 = build_scheduler(cfg, build_optimizer(cfg, model), steps_per_epoch=5)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 20
