"""One torchvision ResNet trained by one of four learning rules: e2e (SimCLR), GIM, LoCo or
supervised (the labelled baseline in the same harness).

The encoder is split into four stages (REFERENCE.md section 1):

    S1 = stem (conv1, bn1, relu, maxpool) + layer1   ("res2")
    S2 = layer2 ("res3"),  S3 = layer3 ("res4"),  S4 = layer4 ("res5")

and trained by units, each a run of consecutive stages with its own decoder and NT-Xent loss:

    e2e : {S1..S4}                  one loss at the top
    gim : {S1} {S2} {S3} {S4}       each unit's input detached
    loco: {S1,S2} {S2,S3} {S3,S4}   each unit's input detached; S2 and S3 shared by two units
    supervised: {S1..S4}            cross-entropy on the ImageFolder labels; the "decoder" is one
                                    linear classifier on the globally pooled res5 features
                                    (torchvision's own head, so the trained network *is* a
                                    torchvision classifier)

`PretrainModel.forward_backward(view1, view2, labels)` runs one step's forward and backward and leaves
the gradients in `.grad` (no optimizer step, no zero_grad). The encoder stays a plain torchvision
ResNet (its unused `fc` included) so that `encoder.state_dict()` loads with `strict=True` into
`torchvision.models.resnetXX()`.

LoCo schedules (how the shared stages' backward is organised; all give the same gradients, see
tests/test_pretrain_model.py; measured trade-offs: tools/bench_pretrain.py):

    "fused"       every stage's forward runs once; a shared stage keeps its graph until the
                  upper unit's gradient arrives, then computes its weight gradient once from the
                  sum of both units' output gradients. Only the input-gradient path of the lower
                  unit (to feed the stage below) is computed separately. Least compute, but S2's
                  saved activations stay alive while S1 (the largest) runs its backward.
    "recompute"   a shared stage frees its activations right after the lower unit's
                  input-gradient path and recomputes its forward inside the upper unit for the
                  fused weight gradient: one extra forward of S2 and of S3.
    "hybrid"      "recompute" for S2 (its activations are what sits on top of S1's at the
                  peak) and "fused" for S3 (the most FLOPs, little memory): the memory of
                  "recompute", one extra forward of S2 only.
    "fused_stem"  "fused", plus the stem (conv1/bn1/relu/maxpool: in ResNet-50 10 % of the
                  saved activations for 3 % of the FLOPs, the most memory per FLOP anywhere)
                  keeps only its output during the step and is recomputed when S1's backward
                  reaches it: about the time of "fused" and the peak memory of "hybrid"; each
                  idea used where it pays most.
    "hybrid_stem" "hybrid" plus the stem recompute: the least memory.

Measured with tools/bench_pretrain.py (ResNet-50, 224 px, 16 images, this project's 2-core CPU
shared with other jobs, load average 4-8; three runs), step time / peak memory against e2e:

    fused 1.18-1.29 / 0.84-0.87     recompute 1.36-1.40 / 0.74-0.77   hybrid 1.23-1.37 / 0.75
    fused_stem 1.15-1.27 / 0.76-0.78                  hybrid_stem 1.22-1.59 / 0.66-0.68

On the quiet machine (one run): fused 1.17 / 0.81, recompute 1.24 / 0.71, hybrid 1.17 / 0.71,
fused_stem 1.10 / 0.73, hybrid_stem 1.16 / 0.64. Memory repeats within a few hundredths; wall
time moves with the neighbours' load (one thread, less disturbed: fused 1.17, fused_stem
1.14-1.18). "fused" does strictly less work than "fused_stem": the stem's recomputation costs
~3-4 % of a step.

Recomputed forwards do not update BatchNorm running statistics twice: every stage's statistics
move exactly once per step, as in a plain forward.
"""
import contextlib

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

from .losses import nt_xent

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
METHODS = ("e2e", "gim", "loco", "supervised")
LOCO_SCHEDULES = ("fused", "recompute", "hybrid", "fused_stem", "hybrid_stem")
NUM_STAGES = 4

# Stages (0-based) of each unit, per method.
UNITS = {
    "e2e": ((0, 1, 2, 3),),
    "gim": ((0,), (1,), (2,), (3,)),
    "loco": ((0, 1), (1, 2), (2, 3)),
    "supervised": ((0, 1, 2, 3),),
}
# Per shared stage (1 = S2, 2 = S3): keep its graph ("fused") or recompute its forward; "stem":
# whether the stem's forward is recomputed in S1's backward instead of keeping its activations.
_SCHEDULE_POLICY = {
    "fused": {1: "fused", 2: "fused"},
    "recompute": {1: "recompute", 2: "recompute"},
    "hybrid": {1: "recompute", 2: "fused"},
    "fused_stem": {1: "fused", 2: "fused", "stem": "recompute"},
    "hybrid_stem": {1: "recompute", 2: "fused", "stem": "recompute"},
}


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, choices))}")


def build_encoder(arch):
    """A randomly initialised torchvision ResNet with its own parameter names."""
    _check_choice("architecture", arch, ARCHS)
    return getattr(torchvision.models, arch)(weights=None)


def run_stem(encoder, x):
    return encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))


def run_stage(encoder, stage, x):
    """Forward of stage `stage` (0-based: 0 = stem + layer1, ..., 3 = layer4) of a torchvision
    ResNet. Looks the modules up on every call so that in-place module swaps (SyncBatchNorm
    conversion) are seen."""
    if stage == 0:
        return encoder.layer1(run_stem(encoder, x))
    return getattr(encoder, f"layer{stage + 1}")(x)


def stage_modules(encoder, stage):
    """The modules whose parameters belong to a stage."""
    if stage == 0:
        return [encoder.conv1, encoder.bn1, encoder.layer1]
    return [getattr(encoder, f"layer{stage + 1}")]


def stage_parameters(encoder, stage):
    return [p for m in stage_modules(encoder, stage) for p in m.parameters() if p.requires_grad]


def stage_channels(encoder):
    """Output channels of the four stages (e.g. 256/512/1024/2048 for ResNet-50)."""
    channels = []
    for stage in range(NUM_STAGES):
        last = getattr(encoder, f"layer{stage + 1}")[-1]
        conv = last.conv3 if hasattr(last, "conv3") else last.conv2
        channels.append(conv.out_channels)
    return channels


def conv_block(block_type, channels):
    """One residual block of the encoder's own type (BasicBlock for ResNet-18/34, Bottleneck for
    ResNet-50/101) that halves the resolution, keeps the width and has a 1x1-conv shortcut: the
    paper's extra conv block of a local decoder. A BasicBlock at ResNet-50's widths would add
    ~80 M parameters to a unit on res5; the bottleneck adds ~9 M, like one more res5 block."""
    shortcut = nn.Sequential(nn.Conv2d(channels, channels, 1, stride=2, bias=False),
                             nn.BatchNorm2d(channels))
    if block_type is Bottleneck:
        return Bottleneck(channels, channels // Bottleneck.expansion, stride=2,
                          downsample=shortcut)
    return BasicBlock(channels, channels, stride=2, downsample=shortcut)


def projection_mlp(in_dim, hidden_dim, out_dim, layers):
    """`layers` Linear layers with BatchNorm + ReLU between them (SimCLR v2 style head)."""
    modules, dim = [], in_dim
    for _ in range(layers - 1):
        modules += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                    nn.ReLU(inplace=True)]
        dim = hidden_dim
    modules.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*modules)


class Decoder(nn.Module):
    """Decoder of one unit: [conv blocks] -> global average pooling -> projection MLP."""

    def __init__(self, in_channels, conv_blocks=0, mlp_layers=2, proj_dim=128, hidden_dim=0,
                 block_type=BasicBlock):
        super().__init__()
        _check_choice("conv_blocks", conv_blocks, (0, 1, 2))
        _check_choice("mlp_layers", mlp_layers, (2, 4))
        self.blocks = nn.Sequential(*[conv_block(block_type, in_channels)
                                      for _ in range(conv_blocks)])
        self.mlp = projection_mlp(in_channels, hidden_dim or in_channels, proj_dim, mlp_layers)

    def forward(self, x):
        x = self.blocks(x)
        return self.mlp(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class LinearClassifier(nn.Module):
    """Decoder of the supervised rule: global average pooling -> one Linear layer to the class
    logits (torchvision ResNet's `avgpool` + `fc`)."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# Decoder options of the contrastive rules; the supervised rule has none (one linear layer).
DECODER_DEFAULTS = {"conv_blocks": 0, "mlp_layers": 2, "proj_dim": 128, "hidden_dim": 0}


@contextlib.contextmanager
def frozen_bn_stats(module):
    """Run a forward without moving BatchNorm running statistics: a recomputed forward must not
    count the same batch twice."""
    bns = [m for m in module.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


class PretrainModel(nn.Module):
    """Encoder + one decoder per unit; `forward_backward` is one training step's gradients."""

    def __init__(self, method, arch, conv_blocks=0, mlp_layers=2, proj_dim=128, hidden_dim=0,
                 temperature=0.1, loco_schedule="fused_stem", num_classes=None,
                 supervised_views=2):
        super().__init__()
        _check_choice("method", method, METHODS)
        _check_choice("loco_schedule", loco_schedule, LOCO_SCHEDULES)
        if method == "supervised":
            given = {"conv_blocks": conv_blocks, "mlp_layers": mlp_layers, "proj_dim": proj_dim,
                     "hidden_dim": hidden_dim}
            extra = {k: v for k, v in given.items() if v != DECODER_DEFAULTS[k]}
            if extra:
                raise ValueError(f"decoder options {extra} do not apply to method 'supervised' "
                                 f"(one linear classifier on pooled res5)")
            if not isinstance(num_classes, int) or num_classes < 2:
                raise ValueError(f"method 'supervised' needs num_classes >= 2, got {num_classes!r}")
            _check_choice("supervised_views", supervised_views, (1, 2))
        self.num_classes = num_classes
        self.supervised_views = supervised_views
        self.method, self.arch = method, arch
        self.temperature = temperature
        self.loco_schedule = loco_schedule
        # When set (e.g. torch.bfloat16), forwards run under torch.autocast; backwards outside.
        self.autocast_dtype = None
        self.encoder = build_encoder(arch)
        channels = stage_channels(self.encoder)
        self.units = UNITS[method]
        self.unit_names = [f"unit{k + 1}" for k in range(len(self.units))]
        if method == "supervised":
            self.decoders = nn.ModuleList([LinearClassifier(channels[-1], num_classes)])
        else:
            self.decoders = nn.ModuleList(
                Decoder(channels[unit[-1]], conv_blocks, mlp_layers, proj_dim, hidden_dim,
                        block_type=type(self.encoder.layer1[0]))
                for unit in self.units)

    # -- helpers -------------------------------------------------------------------------------
    def _autocast(self, x):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)

    def _stage(self, stage, x):
        with self._autocast(x):
            return run_stage(self.encoder, stage, x)

    def _unit_loss(self, unit, h, n):
        with self._autocast(h):
            z = self.decoders[unit](h)
        return nt_xent(z[:n], z[n:], self.temperature)

    def _head(self, unit, h, n):
        """Loss of `unit` on stage output `h`; backward through the decoder only. Returns the
        loss and its gradient at `h`, which the caller routes through the encoder."""
        leaf = h.detach().requires_grad_()
        loss = self._unit_loss(unit, leaf, n)
        loss.backward()
        return loss.detach(), leaf.grad

    def forward(self, x):
        """Features of the four stages (res2..res5) for a batch of images."""
        feats = []
        for stage in range(NUM_STAGES):
            x = self._stage(stage, x)
            feats.append(x)
        return feats

    # -- one step ------------------------------------------------------------------------------
    def forward_backward(self, view1, view2, labels=None):
        """Compute every unit's loss on two batches of views of the same images, accumulate all
        gradients into `.grad`, and return {"unit1": loss, ...} as floats.

        Both views go through the encoder as one 2N batch, so BatchNorm sees both (SimCLR).
        `labels` (N class indices) are used by the supervised rule only."""
        if view1.shape != view2.shape:
            raise ValueError(f"views differ in shape: {tuple(view1.shape)} vs {tuple(view2.shape)}")
        n = view1.shape[0]
        if self.method == "supervised":
            if labels is None or labels.shape != (n,):
                raise ValueError(f"method 'supervised' needs {n} labels, got "
                                 f"{None if labels is None else tuple(labels.shape)}")
            losses = self._supervised_step(view1, view2, labels.to(view1.device))
            return {name: float(loss) for name, loss in zip(self.unit_names, losses)}
        x = torch.cat([view1, view2], dim=0)
        if self.method == "e2e":
            losses = self._e2e_step(x, n)
        elif self.method == "gim":
            losses = self._gim_step(x, n)
        else:
            losses = self._loco_step(x, n, _SCHEDULE_POLICY[self.loco_schedule])
        return {name: float(loss) for name, loss in zip(self.unit_names, losses)}

    def _e2e_step(self, x, n):
        h = x
        for stage in range(NUM_STAGES):
            h = self._stage(stage, h)
        loss = self._unit_loss(0, h, n)
        loss.backward()
        return [loss.detach()]

    def _supervised_step(self, view1, view2, labels):
        """Cross-entropy of the linear classifier on pooled res5, mean over the views used: both
        (each image's label twice; the same crops and BN batch as the contrastive rules) or,
        with supervised_views=1, view1 only (one crop per image, torchvision's recipe)."""
        if self.supervised_views == 2:
            x, y = torch.cat([view1, view2], dim=0), torch.cat([labels, labels], dim=0)
        else:
            x, y = view1, labels
        h = x
        for stage in range(NUM_STAGES):
            h = self._stage(stage, h)
        with self._autocast(h):
            logits = self.decoders[0](h)
        loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        return [loss.detach()]

    def _gim_step(self, x, n):
        """Stage by stage: forward, loss, backward, free; the next stage sees a detached input."""
        losses, h = [], x
        for stage in range(NUM_STAGES):
            out = self._stage(stage, h.detach())
            loss = self._unit_loss(stage, out, n)
            loss.backward()
            losses.append(loss.detach())
            h = out.detach()
            del out, loss
        return losses

    def _loco_step(self, x, n, policy):
        """LoCo: unit k covers stages k and k+1; shared stage s gets its weight gradient once,
        from (gradient of the lower unit + gradient of the upper unit) at its output.

        Per unit k, top-down: stage k+1's forward, the unit's loss and decoder backward; the
        gradient reaching stage k+1's input (from unit k only) via an input-only backward
        through stage k+1 (or, for the top stage, a full backward); then stage k's weight
        gradient, after which nothing of stage k is kept."""
        enc = self.encoder
        last = NUM_STAGES - 1
        inp = [None] * NUM_STAGES    # detached input of each stage (leaf when it needs a grad)
        out = [None] * NUM_STAGES    # output of each stage, with graph while it is needed
        g_lo = [None] * NUM_STAGES   # gradient at a stage's output from the unit below's loss
        losses = []
        inp[0] = x
        stem_leaf = None
        if policy.get("stem") == "recompute":
            # The stem holds ~10 % of ResNet-50's saved activations for ~3 % of its FLOPs: keep
            # only its output now, recompute it when stage 0's backward reaches it.
            with torch.no_grad(), self._autocast(x):
                stem_leaf = run_stem(enc, x)
            stem_leaf.requires_grad_()
            with self._autocast(x):
                out[0] = enc.layer1(stem_leaf)
        else:
            out[0] = self._stage(0, x)
        for k in range(len(self.units)):
            top = k + 1
            inp[top] = out[top - 1].detach().requires_grad_()
            out[top] = self._stage(top, inp[top])
            loss, g_lo[top] = self._head(k, out[top], n)
            losses.append(loss)
            if top == last:
                # Top stage belongs to this unit only: weights and input gradient in one pass.
                torch.autograd.backward(out[top], g_lo[top],
                                        inputs=stage_parameters(enc, top) + [inp[top]])
                g_hi = inp[top].grad
                out[top] = None
            else:
                keep = policy[top] == "fused"
                (g_hi,) = torch.autograd.grad(out[top], inp[top], g_lo[top], retain_graph=keep)
                if not keep:
                    out[top] = out[top].detach()
                    inp[top] = inp[top].detach()
            # Weight gradient of stage k (the unit's lower stage), then forget stage k.
            if k == 0 and stem_leaf is not None:
                self._stage0_backward_recomputing_stem(x, stem_leaf, out[0], g_hi)
                stem_leaf = None
            else:
                # In place: g_lo[k] is ours (a detached leaf's .grad) and no longer needed.
                grad = g_hi if g_lo[k] is None else g_lo[k].add_(g_hi)
                self._stage_weight_backward(k, inp[k], out[k], grad, policy)
                del grad
            inp[k] = out[k] = g_lo[k] = None
            del g_hi, loss
        return losses

    def _stage0_backward_recomputing_stem(self, x, stem_leaf, stage_out, grad):
        enc = self.encoder
        layer1 = [p for p in enc.layer1.parameters() if p.requires_grad]
        torch.autograd.backward(stage_out, grad, inputs=layer1 + [stem_leaf])
        stem_grad = stem_leaf.grad
        del stage_out, grad
        stem = nn.ModuleList([enc.conv1, enc.bn1])
        with frozen_bn_stats(stem):
            out = self._autocast_call(run_stem, x)
            torch.autograd.backward(out, stem_grad,
                                    inputs=[p for p in stem.parameters() if p.requires_grad])

    def _autocast_call(self, fn, x):
        with self._autocast(x):
            return fn(self.encoder, x)

    def _stage_weight_backward(self, stage, stage_in, stage_out, grad, policy):
        params = stage_parameters(self.encoder, stage)
        if stage_out.grad_fn is not None:
            torch.autograd.backward(stage_out, grad, inputs=params)
            return
        # Graph dropped after the input path: recompute it. BatchNorm saves its running-stat
        # buffers for backward, so they are restored only once the backward has run.
        with frozen_bn_stats(nn.ModuleList(stage_modules(self.encoder, stage))):
            stage_out = self._stage(stage, stage_in.detach())
            torch.autograd.backward(stage_out, grad, inputs=params)


def build_model(method, arch, conv_blocks=0, mlp_layers=2, proj_dim=128, hidden_dim=0,
                temperature=0.1, loco_schedule="fused_stem", num_classes=None,
                supervised_views=2):
    """Encoder (torchvision `arch`) + per-unit decoders for learning rule `method`.

    method: "e2e" | "gim" | "loco" | "supervised"; arch: resnet18 | resnet34 | resnet50 |
    resnet101. "supervised" takes no decoder options, needs num_classes (the ImageFolder's
    classes) and trains on both views (supervised_views=2) or view1 only (1).
    Decoder options apply to every unit (e2e included, for a fair baseline): conv_blocks 0/1/2
    stride-2 residual blocks, an MLP of mlp_layers (2 or 4) Linear layers, hidden width
    hidden_dim (0: the unit's output channels), output proj_dim. loco_schedule (LoCo only): see
    the module doc; the default "fused_stem" is the schedule that meets both of issue 2's LoCo
    targets (time <= 1.25x e2e, peak memory <= 0.85x e2e) with a memory margin.
    """
    return PretrainModel(method, arch, conv_blocks=conv_blocks, mlp_layers=mlp_layers,
                         proj_dim=proj_dim, hidden_dim=hidden_dim, temperature=temperature,
                         loco_schedule=loco_schedule, num_classes=num_classes,
                         supervised_views=supervised_views)
