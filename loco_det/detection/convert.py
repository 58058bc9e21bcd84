"""Convert a torchvision-style ResNet checkpoint into Detectron2's weights pickle, and verify it.

The renaming is Detectron2's own (`tools/convert-torchvision-to-d2.py`, REFERENCE.md section 3):
keys without "layer" get `stem.`, `layerN` -> `res{N+1}`, `bnK` -> `convK.norm`,
`downsample.0` -> `shortcut`, `downsample.1` -> `shortcut.norm`; Detectron2 then matches names by
suffix when loading. On top of that script this module:

- reads the input with `torch.load(weights_only=True)` (a checkpoint is a pickle; loading it must
  not run code), with one-line errors for missing / corrupt / truncated files;
- finds the encoder in loco_det pretraining checkpoints, plain state dicts and wrapped ones
  (`module.`, `module.encoder_q.`, `encoder.`, under `state_dict`/`model`, or a named prefix);
- infers ResNet-18/34/50/101/152 from the keys and shapes and refuses anything else;
- drops (and lists) projection heads, decoders, `fc` and everything outside the encoder, which
  Detectron2 would otherwise load silently as "unused";
- records the preprocessing the weights need (docs/formats.md, "Converted weights") so that
  `checkpoint.check_weights_metadata` can refuse a disagreeing config;
- writes atomically, and `verify` checks Detectron2's own ResNet against torchvision's.
"""
import hashlib
import os
import pickle
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import fingerprint
from ..utils import LocoError, atomic_write
from . import compat  # noqa: F401  (must precede detectron2 imports)
from .checkpoint import METADATA_KEY, safe_load_pkl, safe_loads_pkl, torch_load_weights

__all__ = ["TORCHVISION_PIXEL_MEAN", "TORCHVISION_PIXEL_STD", "ConversionResult", "convert",
           "convert_state_dict", "extract_encoder", "infer_resnet", "rename_key", "verify",
           "verify_converted"]

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

# Wrapper prefixes tried (in this order) when several ResNets sit in one checkpoint, e.g. MoCo's
# query and key encoders: the query encoder is the one that was trained by gradient.
KNOWN_PREFIXES = ("", "encoder.", "module.", "module.encoder_q.", "encoder_q.", "module.encoder.",
                  "backbone.", "module.backbone.", "model.", "module.model.")

# Where a checkpoint commonly keeps its state dict.
_CONTAINER_KEYS = ("state_dict", "model", "encoder", "network", "net")

# Top-level entries that are training state, listed as one dropped item each.
_TRAINING_STATE = {"optimizer", "scheduler", "lr_scheduler", "rng", "scaler", "grad_scaler", "amp"}

_ANCHOR = "layer1.0.conv1.weight"
_RESNET_KEY = re.compile(r"^(conv1\.|bn1\.|layer[1-4]\.)")


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


def _inverse_rename(key):
    """Detectron2 name -> torchvision name (for verifying a .pkl without its source)."""
    if key.startswith("stem."):
        key = key[len("stem."):]
    key = re.sub(r"^res([2-5])\.", lambda m: f"layer{int(m.group(1)) - 1}.", key)
    key = key.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    key = re.sub(r"conv([1-3])\.norm", r"bn\1", key)
    return key


@dataclass
class ConversionResult:
    """What `convert` did: the written file, the ResNet found and the keys it left out."""

    output: str
    arch: str
    depth: int
    prefix: str
    method: object
    num_tensors: int
    dropped: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    verify_error: float = None
    stage_errors: dict = None


def _is_tensor_dict(obj):
    return isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())


def _tensor_paths(obj, prefix):
    """Dotted names of every tensor inside nested dicts/lists (for listing what is dropped)."""
    if isinstance(obj, torch.Tensor):
        return [prefix]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = []
    for k, v in items:
        out += _tensor_paths(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _dropped_outside(obj, chosen_key):
    dropped = []
    for key, value in obj.items():
        if key == chosen_key:
            continue
        paths = _tensor_paths(value, str(key))
        if not paths:
            continue  # metadata (config, epoch, method...), not weights
        if key in _TRAINING_STATE:
            dropped.append(f"{key} (training state, {len(paths)} tensors)")
        else:
            dropped += paths
    return dropped


def extract_encoder(obj, source="checkpoint", prefix=None):
    """Find the torchvision ResNet state dict inside a loaded checkpoint.

    Returns `(state_dict, dropped, info)`: the encoder's tensors with torchvision names, the
    names of everything left out (heads, decoders, fc, training state, other encoders), and
    `{"prefix", "method", "arch_hint", "container"}`.

    Why so many layouts: loco_det's own checkpoints keep the encoder under "encoder"; torchvision
    gives a flat state dict; DDP adds `module.`; MoCo keeps two encoders (`module.encoder_q.`,
    `module.encoder_k.`) plus a queue; many repos nest under "state_dict" or "model". With
    `prefix` given, exactly the keys under it are used.
    """
    if not isinstance(obj, dict):
        raise LocoError(f"{source} holds a {type(obj).__name__}, not a dict of weights")
    info = {"method": None, "arch_hint": None, "container": None}
    is_loco = isinstance(obj.get("encoder"), dict) and ("method" in obj or "arch" in obj)
    if is_loco:
        info.update(method=obj.get("method"), arch_hint=obj.get("arch"), container="encoder")
        container = obj["encoder"]
    elif _is_tensor_dict(obj) or (prefix is not None and any(
            isinstance(k, str) and k.startswith(prefix) for k in obj)):
        container = obj
    else:
        found = [k for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)]
        if not found:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise LocoError(f"no state dict found in {source} (top-level keys: {keys}); expected "
                            "a state dict or one under 'encoder', 'state_dict' or 'model'")
        info["container"] = found[0]
        container = obj[found[0]]
    dropped = _dropped_outside(obj, info["container"]) if info["container"] else []
    tensors = {k: v for k, v in container.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    outer = f"{info['container']}." if info["container"] else ""

    if (prefix is not None and outer and prefix.startswith(outer)
            and not any(k.startswith(prefix) for k in tensors)):
        prefix = prefix[len(outer):]  # prefix given with the container's name in front
    if prefix is None:
        prefix = _choose_prefix(tensors, source)
    elif not any(k.startswith(prefix) for k in tensors):
        sample = ", ".join(list(tensors)[:5])
        raise LocoError(f"no key in {source} starts with prefix {prefix!r} (keys look like: {sample})")

    # Other complete ResNets (MoCo's momentum encoder, a teacher...) are listed as one entry each.
    others = [p for p in _resnet_prefixes(tensors) if p != prefix and not prefix.startswith(p)]
    other_counts = dict.fromkeys(others, 0)
    state = {}
    for key, value in tensors.items():
        if key.startswith(prefix) and _RESNET_KEY.match(key[len(prefix):]):
            state[key[len(prefix):]] = value
            continue
        owner = next((p for p in others if key.startswith(p) and _RESNET_KEY.match(key[len(p):])), None)
        if owner is None:
            dropped.append(outer + key)
        else:
            other_counts[owner] += 1
    dropped += [f"{outer}{p}* (another ResNet, {n} tensors)" for p, n in other_counts.items() if n]
    if not state:
        raise LocoError(f"{source} holds no ResNet weights under prefix {prefix!r}")
    info["prefix"] = prefix
    return state, dropped, info


def _resnet_prefixes(tensors):
    """Prefixes under which a torchvision ResNet (stem conv1 + layer1) sits."""
    candidates = sorted({k[:-len(_ANCHOR)] for k in tensors if k.endswith(_ANCHOR)
                         and (k == _ANCHOR or k[:-len(_ANCHOR)].endswith("."))})
    return [p for p in candidates if p + "conv1.weight" in tensors]


def _choose_prefix(tensors, source):
    candidates = _resnet_prefixes(tensors)
    if not candidates:
        sample = ", ".join(list(tensors)[:5])
        raise LocoError(f"{source} is not a torchvision ResNet checkpoint: no key ending in "
                        f"'conv1.weight' and '{_ANCHOR}' (keys look like: {sample}); use --prefix "
                        "if the encoder sits under an unusual prefix")
    if len(candidates) == 1:
        return candidates[0]
    for known in KNOWN_PREFIXES:
        if known in candidates:
            return known
    raise LocoError(f"{source} holds several ResNets (prefixes {', '.join(map(repr, candidates))}); "
                    "choose one with --prefix")


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


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(input_path, output_path, prefix=None, verify=False, tol=1e-4, verify_image_size=224):
    """Convert INPUT (loco_det checkpoint, torchvision state dict, or wrapped) to OUTPUT.pkl.

    The output is docs/formats.md's "Converted weights" pickle. With `verify=True`, the exact
    bytes about to be written are loaded into Detectron2's own ResNet and compared with
    torchvision's first (see `verify_converted`); only then is the file written, atomically, so a
    failed conversion or verification leaves no output and an existing file untouched.
    """
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    if not output_path.endswith(".pkl"):
        raise LocoError(f"output {output_path} must end in .pkl (Detectron2 chooses how to load "
                        "weights by their extension)")
    if os.path.exists(input_path) and os.path.realpath(input_path) == os.path.realpath(output_path):
        raise LocoError(f"output {output_path} is the input file")
    obj = torch_load_weights(input_path, "input checkpoint")
    state, dropped, info = extract_encoder(obj, input_path, prefix)
    depth = infer_resnet(state, input_path, info["arch_hint"])
    method = info["method"]
    metadata = {
        "arch": f"resnet{depth}",
        "depth": depth,
        "input_format": "RGB",
        "pixel_mean": list(TORCHVISION_PIXEL_MEAN),
        "pixel_std": list(TORCHVISION_PIXEL_STD),
        "stride_in_1x1": False,
        "res2_out_channels": 64 if depth in (18, 34) else 256,
        "source": os.path.abspath(input_path),
        "source_sha256": _sha256(input_path),
        "method": None if method is None else str(method),
        "prefix": info["prefix"],
        # run identity of a loco_det checkpoint (loco_det/fingerprint.py); None otherwise
        "fingerprint": fingerprint.checkpoint_fingerprint(obj),
        "seed": fingerprint.checkpoint_seed(obj),
    }
    result = {"model": convert_state_dict(state), "__author__": "loco_det",
              "matching_heuristics": True, METADATA_KEY: metadata}
    payload = pickle.dumps(result, protocol=4)  # protocol 4: readable by every Python 3 Detectron2
    outcome = ConversionResult(output=output_path, arch=metadata["arch"], depth=depth,
                               prefix=info["prefix"], method=metadata["method"],
                               num_tensors=len(result["model"]), dropped=dropped, metadata=metadata)
    if verify:
        err, stages = verify_converted(safe_loads_pkl(payload, output_path), state, tol=tol,
                                       image_size=verify_image_size, source=output_path,
                                       return_stages=True)
        outcome.verify_error, outcome.stage_errors = err, stages
    try:
        with atomic_write(output_path, "wb") as f:
            f.write(payload)
    except OSError as e:
        raise LocoError(f"cannot write {output_path}: {e.strerror or e}") from None
    return outcome


def _backbone_cfg(depth):
    """Detectron2 config for a bare ResNet with the self-supervised conventions (REFERENCE 3)."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
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
        for i, name in enumerate(["res2", "res3", "res4", "res5"], start=1):
            x = getattr(tv, f"layer{i}")(x)
            ours = d2_features[name]
            if ours.shape != x.shape:
                raise LocoError(f"{name} has shape {tuple(ours.shape)} in Detectron2 but "
                                f"{tuple(x.shape)} in torchvision")
            errors[name] = float((ours - x).abs().max() / x.abs().max().clamp_min(1e-12))
    return errors


def verify_converted(data, torchvision_state=None, *, tol=1e-4, image_size=224, batch_size=2,
                     seed=0, source="converted weights", return_stages=False):
    """Load converted weights into Detectron2's own ResNet and compare with torchvision's.

    `data` is the converted dict; `torchvision_state` the state dict it came from (if None it is
    rebuilt from the Detectron2 names). Detectron2's backbone is built by its own
    `build_resnet_backbone` with REFERENCE.md's conventions (DEPTH, RES2_OUT_CHANNELS,
    STRIDE_IN_1X1 False, FrozenBN, res2..res5) and loaded through `LocoCheckpointer`, i.e.
    Detectron2's suffix matching. Both models run in eval mode on the same random input.
    Returns the max relative error; raises `LocoError` above `tol`.

    Why: a wrong rename, stride convention or BN handling does not fail loudly in Detectron2, it
    gives different features. This is the check that the weights mean the same thing there.
    """
    import torchvision
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from .checkpoint import LocoCheckpointer

    meta = data.get(METADATA_KEY) or {}
    if torchvision_state is None:
        torchvision_state = {_inverse_rename(k): torch.as_tensor(np.asarray(v))
                             for k, v in data["model"].items()}
    depth = int(meta.get("depth") or infer_resnet(torchvision_state, source))

    backbone = build_resnet_backbone(_backbone_cfg(depth), ShapeSpec(channels=3)).eval()
    checkpointer = LocoCheckpointer(backbone, save_to_disk=False)
    checkpointer._loading = source
    checkpoint = dict(data)
    checkpoint["model"] = dict(data["model"])
    checkpoint.setdefault("matching_heuristics", True)
    checkpointer._load_model(checkpoint)

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
    data = safe_load_pkl(pkl_path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise LocoError(f"{pkl_path} is not a Detectron2 weights pickle (no 'model' dict)")
    return verify_converted(data, torchvision_state, tol=tol, image_size=image_size,
                            batch_size=batch_size, seed=seed, source=os.fspath(pkl_path))
