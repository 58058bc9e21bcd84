"""torchvision's ResNet as Detectron2 sees it: the depth of a state dict (refusing anything
Detectron2's ResNet cannot load), Detectron2's renaming and its inverse, the preprocessing the
weights need, and the metadata key converted weights carry it under (docs/formats.md).

The renaming is Detectron2's own (`tools/convert-torchvision-to-d2.py`; docs/checkpoints.md):
keys without "layer" get `stem.`, `layerN` -> `res{N+1}`, `bnK` -> `convK.norm`,
`downsample.0` -> `shortcut`, `downsample.1` -> `shortcut.norm`; Detectron2 then matches names by
suffix when loading.
"""
import re

import torch

from ..utils import LocoError

# The converter's record in a weights .pkl (docs/formats.md, "Converted weights").
METADATA_KEY = "loco_det"

# torchvision's ImageNet normalisation in Detectron2's 0-255 units.
TORCHVISION_PIXEL_MEAN = [123.675, 116.28, 103.53]
TORCHVISION_PIXEL_STD = [58.395, 57.12, 57.375]

# (block type, blocks per stage) -> depth. Detectron2's build_resnet_backbone uses the same table.
_LAYOUTS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}

def rename_key(key):
    """Detectron2's torchvision -> Detectron2 renaming, applied exactly as its script does."""
    if "layer" not in key:
        key = "stem." + key
    for t in [1, 2, 3, 4]:
        key = key.replace("layer{}".format(t), "res{}".format(t + 1))
    for t in [1, 2, 3]:
        key = key.replace("bn{}".format(t), "conv{}.norm".format(t))
    key = key.replace("downsample.0", "shortcut")
    key = key.replace("downsample.1", "shortcut.norm")
    return key


def inverse_rename(key):
    """Detectron2 name -> torchvision name (for verifying a .pkl without its source)."""
    if key.startswith("stem."):
        key = key[len("stem."):]
    key = re.sub(r"^res([2-5])\.", lambda m: f"layer{int(m.group(1)) - 1}.", key)
    key = key.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    key = re.sub(r"conv([1-3])\.norm", r"bn\1", key)
    return key


def infer_resnet(state, source="checkpoint", arch_hint=None):
    """Depth of the torchvision ResNet whose state dict this is; `LocoError` if it is not one.

    Why check so much: block type (conv3 exists -> bottleneck) and blocks per stage decide the
    depth; then every key and shape must equal torchvision's for that depth, so a ResNeXt, a
    wide ResNet, a truncated or foreign checkpoint fails here instead of loading half its
    weights into Detectron2.
    """
    import torchvision

    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    counts = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state for m in [re.match(rf"^layer{stage}\.(\d+)\.", k)] if m}
        if not idx:
            raise LocoError(f"{source} is not a complete ResNet: no weights for layer{stage}")
        if idx != set(range(max(idx) + 1)):
            raise LocoError(f"{source} is not a complete ResNet: layer{stage} blocks {sorted(idx)}")
        counts.append(max(idx) + 1)
    depth = _LAYOUTS.get((block, tuple(counts)))
    if depth is None:
        raise LocoError(f"{source}: unsupported ResNet layout ({block} blocks {counts}); supported: "
                        "ResNet-18/34 (basic 2-2-2-2, 3-4-6-3), ResNet-50/101/152 (bottleneck "
                        "3-4-6-3, 3-4-23-3, 3-8-36-3)")
    if "conv1.weight" not in state and "conv1.0.weight" in state:
        raise LocoError(f"{source}: the encoder has a deep stem (conv1.0, conv1.1, ...; timm's "
                        "resnet*d, mmcls ResNetV1c/V1d), but Detectron2's ResNet stem is one 7x7 "
                        "conv1: these weights cannot be loaded there")
    stem = state.get("conv1.weight")
    if stem is not None and stem.dim() == 4 and tuple(stem.shape[1:]) != (3, 7, 7):
        raise LocoError(f"{source}: conv1.weight has shape {tuple(stem.shape)}: a "
                        f"{stem.shape[-1]}x{stem.shape[-1]} stem on {stem.shape[1]} channels "
                        "(e.g. a CIFAR-style ResNet), but Detectron2's ResNet stem is a 7x7 conv "
                        "on 3 channels: these weights cannot be loaded there")
    avg_down = [k for k in state if re.match(r"^layer\d\.0\.downsample\.1\.weight$", k)
                and state[k].dim() == 4]
    if avg_down:
        raise LocoError(f"{source}: {avg_down[0]} is a conv, i.e. an average-pool shortcut "
                        "(ResNet-D, timm resnet*d, mmcls avg_down=True), which Detectron2's "
                        "ResNet does not have: these weights cannot be loaded there")
    with torch.device("meta"):
        reference = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    reference = {k: tuple(v.shape) for k, v in reference.items() if not k.startswith("fc.")}
    for key, shape in reference.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue
            raise LocoError(f"{source}: ResNet-{depth} weight {key} is missing")
        if tuple(state[key].shape) != shape:
            raise LocoError(f"{source}: {key} has shape {tuple(state[key].shape)}, torchvision "
                            f"ResNet-{depth} has {shape} (grouped or wide ResNets are not supported)")
    extra = sorted(set(state) - set(reference))
    if extra:
        raise LocoError(f"{source}: {extra[0]} is not part of a torchvision ResNet-{depth}")
    if arch_hint:
        digits = re.findall(r"\d+", str(arch_hint))
        if digits and int(digits[-1]) != depth:
            raise LocoError(f"{source}: checkpoint says arch {arch_hint!r} but its weights are a "
                            f"ResNet-{depth}")
    return depth


def convert_state_dict(state):
    """torchvision ResNet state dict -> Detectron2 names with numpy values (Detectron2's script)."""
    out = {}
    for key, value in state.items():
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
            tensor = tensor.float()
        out[rename_key(key)] = tensor.numpy()
    return out
