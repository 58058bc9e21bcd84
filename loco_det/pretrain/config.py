"""Pretraining configuration: every key, its default and its meaning, in one place.

Recipes in `pretrain/` are YAML files that override these defaults, optionally inheriting from
another recipe with `_BASE_: other.yaml` (path relative to the file). Command-line overrides are
`KEY=VALUE` pairs with dotted keys, e.g. `OPTIM.BASE_LR=0.5 DATA.ROOT=/data/imagenet`.
An unknown key is an error that names it.
"""
import os

from fvcore.common.config import CfgNode as _FvCfgNode

from .. import ARCHS
from ..utils import ConfigError, get_dotted, unknown_key_hint
from ..weights.safe_load import yaml_chain
from .heads import DECODER_DEFAULTS
from .model import LOCO_SCHEDULES
from .rules import RuleError, registered_needs, rule_needs


AMP_MODES = ("bf16", "fp16", "off")
LEGACY_AMP = {True: "bf16", False: "off"}  # RUN.AMP was a boolean (bf16 autocast or none)


class CfgNode(_FvCfgNode):
    def merge_from_other_cfg(self, cfg_other):
        """Reads a recipe's boolean RUN.AMP as its mode (yacs refuses a bool for a str key)."""
        amp = cfg_other.get("RUN", {}).get("AMP")
        if isinstance(amp, bool):
            cfg_other.RUN.AMP = LEGACY_AMP[amp]
        return super().merge_from_other_cfg(cfg_other)


_C = CfgNode()

# Seed of the run; -1 draws one at random (it is then recorded in the run's config.yaml).
_C.SEED = -1

_C.MODEL = CfgNode()
# Learning rule: "e2e" (SimCLR, one loss at the top), "gim" (one unit per stage, inputs
# detached), "loco" (overlapping units {S1,S2},{S2,S3},{S3,S4}, inputs detached) or
# "supervised" (cross-entropy on the ImageFolder labels with one linear classifier on the
# pooled res5 features: the labelled baseline; MODEL.DECODER and LOSS.TEMPERATURE do not apply),
# "loco_overlap2" (three-stage units {S1,S2,S3},{S2,S3,S4}), "loco_blocks" (LoCo over residual
# blocks, see MODEL.LOCO_BLOCKS); or a rule from outside the library: an import path
# "package.module:rule" or the name of a `loco_det.rules` entry point (docs/pretraining.md,
# "Learning rules, and your own"; loco_det/pretrain/rules.py).
_C.MODEL.METHOD = "loco"
# torchvision ResNet: resnet18, resnet34, resnet50 or resnet101 (parameter names unchanged).
_C.MODEL.ARCH = "resnet50"
# Synchronised BN across processes (SimCLR's global BN). Ignored with a notice on 1 process.
_C.MODEL.SYNC_BN = False

_C.MODEL.DECODER = CfgNode()
# Residual conv blocks with stride-2 downsampling before pooling (0, 1 or 2). The paper's final
# local decoders use 1.
_C.MODEL.DECODER.CONV_BLOCKS = 0
# Layers of the projection MLP after global average pooling (2 or 4).
_C.MODEL.DECODER.MLP_LAYERS = 2
# Output dimension of the projection.
_C.MODEL.DECODER.PROJ_DIM = 128
# Hidden width of the MLP; 0 means the width of the unit's output feature map.
_C.MODEL.DECODER.HIDDEN_DIM = 0

# LoCo backward schedule for the shared stages (time/memory trade-off; see model.py's docstring):
# "fused" computes each shared stage's forward once and its weight gradient once from the sum
# of both units' output gradients; "recompute" recomputes the shared stage's forward inside the
# upper unit (less memory, more time); "hybrid" recomputes S2 only; "*_stem" also recomputes the
# stem during S1's backward. "fused_stem" meets both of the time and memory targets.
_C.MODEL.LOCO_SCHEDULE = "fused_stem"

# "loco_blocks" only. Pieces are the stem and every residual block (ResNet-18: 1 + 8, ResNet-50:
# 1 + 16); each unit is UNIT_LENGTH consecutive pieces and shares OVERLAP of them with the next
# (the last unit ends at the top block, shorter if the pieces run out).
_C.MODEL.LOCO_BLOCKS = CfgNode()
_C.MODEL.LOCO_BLOCKS.UNIT_LENGTH = 2
_C.MODEL.LOCO_BLOCKS.OVERLAP = 1

_C.LOSS = CfgNode()
# NT-Xent temperature tau (SimCLR ImageNet recipe: 0.1).
_C.LOSS.TEMPERATURE = 0.1
# Supervised rule only: views of each image the cross-entropy sees per step. 2: both views of
# the pair (the crops and BN batch of the contrastive rules); 1: the first view only (one crop
# per image per step, as torchvision's classification recipe; the loader still makes two).
_C.LOSS.SUPERVISED_VIEWS = 2

_C.DATA = CfgNode()
# ImageFolder-style directory (ImageNet layout: ROOT/<class>/<image>), e.g. ImageNet's train/.
_C.DATA.ROOT = "datasets/loco_synth/imagefolder/train"
# Side of the square random resized crop, in pixels.
_C.DATA.IMAGE_SIZE = 224
# Random resized crop scale range (SimCLR: 0.08-1.0).
_C.DATA.CROP_SCALE = (0.08, 1.0)
# Colour jitter strength s (SimCLR: brightness/contrast/saturation 0.8 s, hue 0.2 s) and prob.
_C.DATA.COLOR_JITTER = 1.0
_C.DATA.COLOR_JITTER_PROB = 0.8
_C.DATA.GRAYSCALE_PROB = 0.2
# Gaussian blur probability; kernel is ~10% of IMAGE_SIZE (odd), sigma in [0.1, 2.0].
_C.DATA.BLUR_PROB = 0.5
# Data-loading worker processes per training process.
_C.DATA.NUM_WORKERS = 4
# Batches each worker prepares ahead (torch's prefetch_factor; workers persist across epochs).
# Loader batches are uint8 and cross /dev/shm: a training process needs about NUM_WORKERS *
# PREFETCH_FACTOR * (BATCH_SIZE / world size) * 2 views * 3 * IMAGE_SIZE^2 bytes of it
# (docs/pretraining-input.md). Speed only.
_C.DATA.PREFETCH_FACTOR = 2
# Where the colour jitter, grayscale and blur run (both normalise on the training device):
# "cpu": loader workers do the whole augmentation on uint8 (loco_det/pretrain/augment.py);
# "cuda": workers only decode, crop and flip, and the training GPU applies the rest to the
# whole batch, each sample with its own parameters (fewer CPU cores per GPU; same parameters
# and distribution, pixels differ by rounding). Needs a CUDA device.
_C.DATA.AUGMENT_DEVICE = "cpu"
# Largest share of unreadable images tolerated before the run fails (they are skipped).
_C.DATA.MAX_BAD_FRACTION = 0.01
# Use at most this many images (0: all); for quick runs.
_C.DATA.MAX_IMAGES = 0

_C.OPTIM = CfgNode()
# "lars", "sgd" or "adamw".
_C.OPTIM.NAME = "lars"
# Global batch over all processes (views are twice this). Must divide by the world size.
_C.OPTIM.BATCH_SIZE = 4096
# Exact gradient accumulation for every rule (GradCache, Gao et al. 2021): each process's batch
# (BATCH_SIZE / world size images) is split into this many equal micro-batches that run one at a
# time, so that activation memory is that of one micro-batch; every unit's loss still sees all
# negatives of the global batch. Gradients equal those of one full-batch step except for
# BatchNorm, whose batch statistics (and running-statistics updates) are per micro-batch. Costs
# about one extra forward per step (docs/pretraining.md, "Gradient accumulation"). 1: off. The per-process
# batch must divide by it.
_C.OPTIM.ACCUM_STEPS = 1
# Learning rate per 256 images of global batch: lr = BASE_LR * BATCH_SIZE / 256 (SimCLR).
_C.OPTIM.BASE_LR = 0.3
_C.OPTIM.WEIGHT_DECAY = 1e-6
_C.OPTIM.MOMENTUM = 0.9
# LARS trust coefficient.
_C.OPTIM.LARS_ETA = 0.001
_C.OPTIM.EPOCHS = 100
_C.OPTIM.WARMUP_EPOCHS = 10
# Final learning rate of the cosine schedule, as a fraction of the peak.
_C.OPTIM.MIN_LR_RATIO = 0.0
# Learning-rate schedule after warm-up: "cosine" (SimCLR) or "step" (multiply by LR_GAMMA at
# each epoch in LR_STEPS, as torchvision's supervised ImageNet recipe).
_C.OPTIM.SCHEDULE = "cosine"
# "step" schedule only: epochs (strictly increasing, within 1..EPOCHS-1) at which lr drops.
_C.OPTIM.LR_STEPS = ()
_C.OPTIM.LR_GAMMA = 0.1

_C.RUN = CfgNode()
# Mixed precision on CUDA: "bf16" (bfloat16 autocast; Ampere and newer GPUs), "fp16" (float16
# autocast with a dynamic loss scale, torch.amp.GradScaler: for V100, T4 and other GPUs without
# fast bfloat16) or "off" (float32). The booleans of older configs still read: true is "bf16",
# false is "off" (and they keep their fingerprint). CUDA only; ignored with a notice on CPU.
_C.RUN.AMP = "bf16"
# channels_last memory format for the model and its inputs (CUDA only).
_C.RUN.CHANNELS_LAST = True
# Process-group backend: "" for nccl on CUDA and gloo on CPU; "nccl" or "gloo" to choose. With
# "gloo" on CUDA several processes may share one GPU (process i uses cuda:(LOCAL_RANK mod the
# number of visible GPUs)); slow, meant for checks of the multi-process code on one GPU.
_C.RUN.DIST_BACKEND = ""
# Minutes any collective may wait for the slowest process before the job is ended with an
# error (torch's own default is 10 minutes for nccl). Rank 0 alone writes checkpoints while the
# others wait in their next collective, and a rank's kNN share (RUN.KNN_PERIOD) or slow file
# system can keep the others waiting: this must exceed the longest such wait
# (docs/distributed.md).
_C.RUN.DIST_TIMEOUT_MIN = 120.0
# Log to metrics.jsonl / TensorBoard every this many steps.
_C.RUN.LOG_PERIOD = 10
# Besides every epoch, write checkpoint_last.pth every this many steps (0: epochs only).
_C.RUN.CHECKPOINT_PERIOD = 0
# Weighted kNN readout per stage (k 20/200, T 0.07; loco_det/pretrain/knn.py) every this many
# epochs, into metrics.jsonl and TensorBoard as knn/k20/res5 etc. (0: off). Every process
# extracts and searches its share of the images, so the readout adds 1/world of its
# one-process time.
_C.RUN.KNN_PERIOD = 0
# Folder with train/ (memory bank) and held-out val/ (queries) ImageFolder splits; empty: the
# parent of DATA.ROOT (the embedded data's imagefolder/, ImageNet's root).
_C.RUN.KNN_DATA = ""
# Memory bank size: at most this many train/ images, evenly spaced over classes (0: all).
_C.RUN.KNN_MAX_TRAIN_IMAGES = 0


def get_cfg():
    return _C.clone()


def load_config(path=None, overrides=()):
    """Defaults <- YAML file (with _BASE_) <- KEY=VALUE overrides, validated; returns frozen cfg."""
    cfg = get_cfg()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        yaml_chain(path)   # plain data only: a Python tag is one line naming file and line
        try:
            cfg.merge_from_file(path, allow_unsafe=False)
        except KeyError as e:
            msg = str(e.args[0] if e.args else e)
            raise ConfigError(f"{path}: {msg}{unknown_key_hint(msg, get_cfg())}") from None
    opts = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not KEY=VALUE")
        k, v = item.split("=", 1)
        if k == "RUN.AMP" and v.strip().lower() in ("true", "false"):
            v = LEGACY_AMP[v.strip().lower() == "true"]
        opts += [k, _float_if_needed(cfg, k, v)]
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError) as e:
        msg = str(e.args[0] if e.args else e)
        raise ConfigError(f"command-line override: {msg}{unknown_key_hint(msg, cfg)}") from None
    validate(cfg)
    cfg.freeze()
    return cfg


def _float_if_needed(cfg, key, value):
    """`KEY=0` for a float key means 0.0 (yacs would refuse the int as a type mismatch)."""
    node = get_dotted(cfg, key)
    if node is None:
        return value  # unknown key: merge_from_list names it
    if isinstance(node, float) and value.strip().lstrip("+-").isdigit():
        return value.strip() + ".0"
    return value


def validate(cfg):
    choices = {
        "MODEL.ARCH": ARCHS,
        "MODEL.DECODER.CONV_BLOCKS": (0, 1, 2),
        "MODEL.DECODER.MLP_LAYERS": (2, 4),
        "MODEL.LOCO_SCHEDULE": LOCO_SCHEDULES,
        "OPTIM.NAME": ("lars", "sgd", "adamw"),
        "OPTIM.SCHEDULE": ("cosine", "step"),
        "DATA.AUGMENT_DEVICE": ("cpu", "cuda"),
        "RUN.AMP": AMP_MODES,
        "RUN.DIST_BACKEND": ("", "nccl", "gloo"),
    }
    try:
        needs = rule_needs(cfg.MODEL.METHOD)
    except RuleError as e:
        raise ConfigError(f"MODEL.METHOD: {e}") from None
    # the registered rules' own keys (defined in this config whichever rule runs)
    for rule_options in registered_needs().values():
        for opt in rule_options.options.values():
            if opt.choices:
                choices[opt.key] = opt.choices
    for key, allowed in choices.items():
        value = get_dotted(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    if not needs.decoder_options:
        for key, default in DECODER_DEFAULTS.items():
            value = cfg.MODEL.DECODER[key.upper()]
            if value != default:
                raise ConfigError(f"MODEL.DECODER.{key.upper()}={value} does not apply to "
                                  f"MODEL.METHOD={cfg.MODEL.METHOD} (its units bring their own "
                                  f"heads: {needs.head or 'not MODEL.DECODER'}); leave it at "
                                  f"{default}")
    prefetch = cfg.DATA.PREFETCH_FACTOR
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
        raise ConfigError(f"DATA.PREFETCH_FACTOR: {prefetch!r} must be a positive integer")
    accum = cfg.OPTIM.ACCUM_STEPS
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
        raise ConfigError(f"OPTIM.ACCUM_STEPS: {accum!r} must be a positive integer")
    if cfg.OPTIM.BATCH_SIZE % accum:
        raise ConfigError(f"OPTIM.ACCUM_STEPS={accum} does not divide OPTIM.BATCH_SIZE="
                          f"{cfg.OPTIM.BATCH_SIZE}: each process's batch must split into equal "
                          f"micro-batches")
    if not cfg.RUN.DIST_TIMEOUT_MIN > 0:
        raise ConfigError(f"RUN.DIST_TIMEOUT_MIN: {cfg.RUN.DIST_TIMEOUT_MIN} must be a positive "
                          f"number of minutes")
    steps = list(cfg.OPTIM.LR_STEPS)
    if cfg.OPTIM.SCHEDULE == "step":
        if not steps or steps != sorted(set(steps)) or steps[0] < 1 \
                or steps[-1] >= cfg.OPTIM.EPOCHS:
            raise ConfigError(f"OPTIM.LR_STEPS: {steps} must be strictly increasing epochs "
                              f"within 1..{cfg.OPTIM.EPOCHS - 1} for OPTIM.SCHEDULE=step")
    elif steps:
        raise ConfigError(f"OPTIM.LR_STEPS: {steps} applies to OPTIM.SCHEDULE=step only "
                          f"(OPTIM.SCHEDULE={cfg.OPTIM.SCHEDULE})")
