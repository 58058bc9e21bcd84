"""Verification of converted weights: Detectron2's own ResNet, loaded through loco_det's
checkpointer, gives the same res2..res5 features as torchvision's ResNet on random input.

Why: a wrong rename, stride convention or BN handling does not fail loudly in Detectron2, it
gives different features. This is the check that the weights mean the same thing there. This
module imports Detectron2; conversion without --verify never imports it.
"""
import os

import numpy as np
import torch

from ..detection.checkpoint import LocoCheckpointer  # first: loco_det.detection precedes detectron2
from ..records import STAGES
from ..utils import LocoError
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling.backbone.resnet import build_resnet_backbone  # noqa: E402
from .resnet import (METADATA_KEY, TORCHVISION_PIXEL_MEAN, TORCHVISION_PIXEL_STD, infer_resnet,
                     inverse_rename)
from .safe_load import load_pkl


def _backbone_cfg(depth):
    """Detectron2 config for a bare ResNet with the torchvision-weight conventions
    (docs/benchmarks.md)."""
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = list(STAGES)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.PIXEL_MEAN = list(TORCHVISION_PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(TORCHVISION_PIXEL_STD)
    cfg.INPUT.FORMAT = "RGB"
    return cfg


def stage_errors(d2_features, tv_model, images):
    """Relative error per stage: max |d2 - tv| / max |tv| at res2..res5 vs layer1..layer4.

    Why this measure: the features are post-ReLU with many exact zeros, so an elementwise relative
    error is undefined; normalising by the stage's largest activation is scale-free.
    """
    tv = tv_model
    with torch.no_grad():
        x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(images))))
        errors = {}
        for i, name in enumerate(STAGES, start=1):
            x = getattr(tv, f"layer{i}")(x)
            ours = d2_features[name]
            if ours.shape != x.shape:
                raise LocoError(f"{name} has shape {tuple(ours.shape)} in Detectron2 but "
                                f"{tuple(x.shape)} in torchvision")
            if not bool(torch.isfinite(x).all()):
                # The weights themselves overflow (finite but huge): not a conversion error.
                raise LocoError(f"torchvision's own ResNet gives non-finite layer{i} features "
                                "with these weights on random input: the weights are broken, "
                                "not the conversion")
            errors[name] = float((ours - x).abs().max() / x.abs().max().clamp_min(1e-12))
    return errors


def verify_converted(data, torchvision_state=None, *, tol=1e-4, image_size=224, batch_size=2,
                     seed=0, source="converted weights", return_stages=False):
    """Load converted weights into Detectron2's own ResNet and compare with torchvision's.

    `data` is the converted dict; `torchvision_state` the state dict it came from (if None it is
    rebuilt from the Detectron2 names). Detectron2's backbone is built by its own
    `build_resnet_backbone` with the conventions of docs/benchmarks.md (DEPTH, RES2_OUT_CHANNELS,
    STRIDE_IN_1X1 False, FrozenBN, res2..res5) and loaded through `LocoCheckpointer`, i.e.
    Detectron2's suffix matching. Both models run in eval mode on the same random input.
    Returns the max relative error; raises `LocoError` above `tol`.

    Why: a wrong rename, stride convention or BN handling does not fail loudly in Detectron2, it
    gives different features. This is the check that the weights mean the same thing there.
    """
    import torchvision

    meta = data.get(METADATA_KEY) or {}
    if torchvision_state is None:
        torchvision_state = {inverse_rename(k): torch.as_tensor(np.asarray(v))
                             for k, v in data["model"].items()}
    depth = int(meta.get("depth") or infer_resnet(torchvision_state, source))

    backbone = build_resnet_backbone(_backbone_cfg(depth), ShapeSpec(channels=3)).eval()
    checkpoint = dict(data)
    checkpoint["model"] = dict(data["model"])
    checkpoint.setdefault("matching_heuristics", True)
    LocoCheckpointer(backbone, save_to_disk=False).load_loaded(checkpoint, source)

    tv = getattr(torchvision.models, f"resnet{depth}")()
    incompatible = tv.load_state_dict(torchvision_state, strict=False)
    not_fc = [k for k in incompatible.missing_keys if not k.startswith("fc.")
              and not k.endswith("num_batches_tracked")]
    if not_fc or incompatible.unexpected_keys:
        raise LocoError(f"torchvision ResNet-{depth} does not accept the weights of {source}: "
                        f"missing {not_fc[:3]}, unexpected {incompatible.unexpected_keys[:3]}")
    tv.eval()

    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    with torch.no_grad():
        features = backbone(images)
    errors = stage_errors(features, tv, images)
    worst = max(errors.values())
    if not worst <= tol:  # also catches NaN
        detail = ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
        raise LocoError(f"verification failed for {source}: Detectron2's ResNet-{depth} features "
                        f"differ from torchvision's (relative error {detail}; limit {tol:.0e})")
    return (worst, errors) if return_stages else worst


def verify(pkl_path, torchvision_state=None, *, tol=1e-4, image_size=224, batch_size=2, seed=0):
    """Verify a converted `.pkl` on disk (read safely); see `verify_converted`. Returns the max
    relative error between Detectron2's res2..res5 and torchvision's layer1..layer4 features."""
    data = load_pkl(pkl_path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise LocoError(f"{pkl_path} is not a Detectron2 weights pickle (no 'model' dict)")
    return verify_converted(data, torchvision_state, tol=tol, image_size=image_size,
                            batch_size=batch_size, seed=seed, source=os.fspath(pkl_path))
