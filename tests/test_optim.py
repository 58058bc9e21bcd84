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


class ReferenceLARS(torch.optim.Optimizer):
    """The per-tensor LARS loop loco_det used before its step moved to the `torch._foreach_*`
    ops, kept verbatim as the reference the new step must equal."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    one = torch.ones_like(w_norm)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["eta"] * w_norm / g_norm, one)
                    grad = grad.mul(trust * group["lr"])
                else:
                    grad = grad.mul(group["lr"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(grad)
                p.sub_(buf)


def test_foreach_lars_equals_the_per_tensor_reference():
    """A ResNet-18 with its real parameter groups (LARS + decay on weights; BN and biases
    without), five steps with a changing lr, a tensor of zeros (trust 1), a parameter without
    gradient in some steps: weights, gradients and momentum buffers equal the per-tensor loop
    at float32 tolerance."""
    import copy

    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        model.layer1[0].conv1.weight.zero_()       # ||w|| = 0
    twin, initial = copy.deepcopy(model), copy.deepcopy(model)
    cfg = load_config(None, ["OPTIM.NAME=lars", "OPTIM.WEIGHT_DECAY=1e-4", "OPTIM.BATCH_SIZE=512",
                             "OPTIM.LARS_ETA=0.02"])
    new = build_optimizer(cfg, model)
    assert isinstance(new, LARS)
    ref_groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "lars": g["lars"]}
                  for g in build_optimizer(cfg, twin).param_groups]
    ref = ReferenceLARS(ref_groups, lr=peak_lr(cfg), momentum=cfg.OPTIM.MOMENTUM,
                        eta=cfg.OPTIM.LARS_ETA)
    x = torch.randn(4, 3, 32, 32)
    for step in range(5):
        for m, opt in ((model, new), (twin, ref)):
            opt.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            if step % 2:
                m.fc.bias.grad = None                   # skipped this step
            for group in opt.param_groups:
                group["lr"] = peak_lr(cfg) * (step + 1) / 5
            opt.step()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, msg=lambda m: f"step {step} {name}: {m}")
            torch.testing.assert_close(new.state[a]["momentum_buffer"],
                                       ref.state[b]["momentum_buffer"])
    moved = sum(not torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters()))
    assert moved > 50   # of 62 tensors (the zeroed conv, its BN weight see no gradient)
