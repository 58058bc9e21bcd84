"""Optimizers and learning-rate schedule of the pretraining recipes.

SimCLR (and therefore the LoCo paper) trains with LARS at a batch of 4096: plain SGD at that
batch is unstable because the right step size differs by orders of magnitude between layers;
LARS rescales each layer's step by ||w|| / ||g||. Batch-norm parameters and biases are left out
of both the adaptation and the weight decay, as in SimCLR: their norms say nothing about a
sensible step size, and decaying them only hurts.

The learning rate scales with the *global* batch: lr = BASE_LR * BATCH_SIZE / 256, so a recipe
means the same thing on 1 process or on 64. The schedule is per optimizer step: linear warm-up
to that peak, then cosine decay to MIN_LR_RATIO * peak, or (OPTIM.SCHEDULE "step", torchvision's
supervised recipe) drops by LR_GAMMA at the epochs in LR_STEPS.
"""
import math

import torch
from torch import nn

from ..utils import ConfigError


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling, following SimCLR's TensorFlow implementation.

    For each parameter tensor w with gradient g, in a group with `lars=True`::

        g  <- g + weight_decay * w
        q  <- eta * ||w|| / ||g||      (1 where ||w|| or ||g|| is 0)
        v  <- momentum * v + lr * q * g
        w  <- w - v

    Groups with `lars=False` (BN and bias parameters) use q = 1 and their own weight decay
    (0 in `param_groups`). The learning rate sits inside the momentum buffer as in SimCLR, so a
    change of lr takes effect gradually.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError("LARS: lr, momentum, weight_decay must be >= 0 and eta > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, a group at a time with the
        `torch._foreach_*` ops (a few kernels per group, not a dozen per tensor)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["lars"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((w_norm > 0) & (g_norm > 0),
                                    group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                grads = torch._foreach_mul(grads, list((trust * group["lr"]).unbind()))
            else:
                grads = torch._foreach_mul(grads, group["lr"])
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_sub_(params, bufs)
        return loss


def split_decay_params(model):
    """(regular, excluded): excluded = parameters of normalisation layers and every bias.

    Decided by module type and parameter name, not by `ndim == 1`, so a 1-d weight of some
    other layer would still be treated as a weight."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                  nn.modules.instancenorm._InstanceNorm)
    regular, excluded, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, norm_types) or name == "bias":
                excluded.append(p)
            else:
                regular.append(p)
    return regular, excluded


def peak_lr(cfg):
    """SimCLR's linear scaling rule on the global batch."""
    return cfg.OPTIM.BASE_LR * cfg.OPTIM.BATCH_SIZE / 256


def build_optimizer(cfg, model):
    """LARS / SGD / AdamW over `model`'s parameters, BN and biases without weight decay."""
    lr = peak_lr(cfg)
    wd = cfg.OPTIM.WEIGHT_DECAY
    regular, excluded = split_decay_params(model)
    name = cfg.OPTIM.NAME
    if name == "lars":
        groups = [{"params": regular, "weight_decay": wd, "lars": True},
                  {"params": excluded, "weight_decay": 0.0, "lars": False}]
        return LARS(groups, lr=lr, momentum=cfg.OPTIM.MOMENTUM, eta=cfg.OPTIM.LARS_ETA)
    groups = [{"params": regular, "weight_decay": wd},
              {"params": excluded, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.OPTIM.MOMENTUM)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ConfigError(f"OPTIM.NAME: {name!r} is not one of lars, sgd, adamw")


class WarmupCosine:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    Steps 0..W-1 ramp linearly to 1 ((step + 1) / W, so the first step already moves);
    then cosine from 1 at step W down to `min_ratio` at step `total` (the step after the last).
    A callable object rather than a lambda so LambdaLR's state dict can hold it."""

    def __init__(self, warmup_steps, total_steps, min_ratio=0.0):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step):
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupStep:
    """Multiplier of the peak lr at optimizer step `step` (0-based): the same linear warm-up,
    then gamma ** (number of milestones <= step), milestones in optimizer steps (torchvision's
    StepLR / MultiStepLR, applied per step)."""

    def __init__(self, warmup_steps, milestones, gamma):
        self.warmup_steps = int(warmup_steps)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)

    def __call__(self, step):
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.gamma ** sum(step >= m for m in self.milestones)


def build_scheduler(cfg, optimizer, steps_per_epoch):
    """Per-step LambdaLR: linear warm-up over WARMUP_EPOCHS, then cosine to the end of EPOCHS
    (OPTIM.SCHEDULE "cosine") or drops by LR_GAMMA at the epochs in LR_STEPS ("step")."""
    total = cfg.OPTIM.EPOCHS * steps_per_epoch
    warmup = min(round(cfg.OPTIM.WARMUP_EPOCHS * steps_per_epoch), total)
    if cfg.OPTIM.SCHEDULE == "step":
        milestones = [e * steps_per_epoch for e in cfg.OPTIM.LR_STEPS]
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupStep(warmup, milestones, cfg.OPTIM.LR_GAMMA))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup, total, cfg.OPTIM.MIN_LR_RATIO))
