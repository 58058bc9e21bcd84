"""Loading detection weights without running code from them, and refusing weights that cannot work.

Detectron2 opens a `.pkl` given as `MODEL.WEIGHTS` with plain `pickle.load`, so a downloaded file
can run arbitrary code; and it only *warns* when backbone weights are missing or when the config's
preprocessing disagrees with the weights, which silently produces "lower than the paper" numbers.
This module closes those gaps while keeping Detectron2's loading behaviour otherwise unchanged:

- `LocoCheckpointer`: Detectron2's `DetectionCheckpointer` that loads `.pkl` through the
  restricted unpickler (loco_det.weights.safe_load), `.pth` with `torch.load(weights_only=True)`,
  errors when a backbone parameter is missing, and logs a table of loaded / missing / unused
  keys.
- `read_weights_metadata` + `check_weights_metadata`: compare the converter's metadata record
  (see docs/formats.md, "Converted weights") with the config before anything is built.

Import order: `loco_det.detection.compat` must be imported before detectron2; importing this
module (part of `loco_det.detection`) does so.
"""
import collections
import os

import numpy as np

from . import compat  # noqa: F401  (must precede detectron2 imports)
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from fvcore.common.checkpoint import Checkpointer, _filter_reused_missing_keys  # noqa: E402

from ..weights.resnet import METADATA_KEY  # noqa: E402
from ..weights.safe_load import (TORCH_LOAD_ERRORS, load_pkl, torch_load_error,  # noqa: E402
                                 torch_load_weights)
from ..utils import LocoError, get_dotted  # noqa: E402

__all__ = ["LocoCheckpointer", "read_weights_metadata", "check_weights_metadata",
           "check_unconverted_weights", "unconverted_kind", "backbone_state_keys"]

def read_weights_metadata(path):
    """Return the converter's metadata record stored in a weights `.pkl`, or None.

    Why: the trainer calls this with `cfg.MODEL.WEIGHTS` *before building the model*, so that a
    config whose preprocessing disagrees with the weights fails in a second, not after the
    dataset and model are built. The file is read with `load_pkl` (loco_det.weights.safe_load). Empty path, non-pkl
    weights (e.g. a Detectron2 `model_final.pth`) and pkl files without a loco_det record give
    None. Remote paths (`detectron2://`, `https://`) are resolved as Detectron2 would.
    """
    if not path:
        return None
    path = os.fspath(path)
    if not path.endswith(".pkl"):
        return None
    if not os.path.exists(path) and "://" in path:
        from detectron2.utils.file_io import PathManager

        try:
            path = PathManager.get_local_path(path)
        except (OSError, ValueError, RuntimeError) as e:
            raise LocoError(f"cannot fetch weights {path}: {e}") from None
    data = load_pkl(path)
    if isinstance(data, dict) and isinstance(data.get(METADATA_KEY), dict):
        return data[METADATA_KEY]
    return None


_TORCHVISION_KEYS = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight")


def unconverted_kind(state):
    """'a loco_det pretraining checkpoint' / 'a torchvision ResNet state dict' when `state`
    (a loaded .pth) is one of those, else None. Detectron2 names the same weights differently
    (stem.conv1, res2, ...), so neither loads before tools/convert_to_detectron2.py."""
    if not isinstance(state, dict):
        return None
    if "encoder" in state and "method" in state:
        return "a loco_det pretraining checkpoint"
    for candidate in (state, state.get("state_dict"), state.get("model")):
        if isinstance(candidate, dict):
            keys = {k[len("module."):] if str(k).startswith("module.") else k for k in candidate}
            if all(k in keys for k in _TORCHVISION_KEYS):
                return "a torchvision ResNet state dict"
    return None


def check_unconverted_weights(path):
    """One line telling to convert first when MODEL.WEIGHTS is a torchvision-named `.pth`
    (instead of Detectron2's "backbone weights missing" after the model is built)."""
    if "://" in str(path) or not str(path).endswith((".pth", ".pt", ".pth.tar")):
        return
    kind = unconverted_kind(torch_load_weights(path, what="MODEL.WEIGHTS"))
    if kind:
        stem = os.path.splitext(os.path.basename(path))[0]
        raise LocoError(f"MODEL.WEIGHTS {path} is {kind} (torchvision names), not Detectron2 "
                        f"weights: convert it first with python tools/convert_to_detectron2.py "
                        f"{path} {stem}.pkl, then set MODEL.WEIGHTS {stem}.pkl")


def check_weights_metadata(cfg, metadata, weights_path=None):
    """Refuse a config whose preprocessing or ResNet layout disagrees with converted weights.

    Why: torchvision-trained weights need RGB input, torchvision's mean/std (0-255 units) and the
    stride in the 3x3 conv; Detectron2's defaults (BGR, std 1, stride in 1x1) are for the MSRA
    Caffe weights and give wrong features *without any error*. Compared keys: INPUT.FORMAT,
    MODEL.PIXEL_MEAN / PIXEL_STD (allclose), MODEL.RESNETS.STRIDE_IN_1X1 (bottleneck ResNets
    only: basic blocks have no 1x1 conv, Detectron2 ignores it there), MODEL.RESNETS.DEPTH and
    MODEL.RESNETS.RES2_OUT_CHANNELS. All disagreements are reported on one line naming the key,
    the config's value and the weights' value. `metadata` None (weights without a record) passes.
    """
    if not metadata:
        return
    where = weights_path or get_dotted(cfg, "MODEL.WEIGHTS") or metadata.get("source") or "the weights"
    problems = []

    def mismatch(key, cfg_value, want):
        problems.append(f"{key} is {cfg_value!r} in the config but {want!r} for the weights")

    if "input_format" in metadata:
        value = get_dotted(cfg, "INPUT.FORMAT")
        if value != metadata["input_format"]:
            mismatch("INPUT.FORMAT", value, metadata["input_format"])
    for key, meta_key in (("MODEL.PIXEL_MEAN", "pixel_mean"), ("MODEL.PIXEL_STD", "pixel_std")):
        if meta_key not in metadata:
            continue
        value = [float(v) for v in get_dotted(cfg, key)]
        want = [float(v) for v in metadata[meta_key]]
        if len(value) != len(want) or not np.allclose(value, want, rtol=1e-4, atol=1e-3):
            mismatch(key, value, want)
    depth = metadata.get("depth")
    if depth is not None and int(get_dotted(cfg, "MODEL.RESNETS.DEPTH")) != int(depth):
        mismatch("MODEL.RESNETS.DEPTH", int(get_dotted(cfg, "MODEL.RESNETS.DEPTH")), int(depth))
    if "res2_out_channels" in metadata:
        value = int(get_dotted(cfg, "MODEL.RESNETS.RES2_OUT_CHANNELS"))
        if value != int(metadata["res2_out_channels"]):
            mismatch("MODEL.RESNETS.RES2_OUT_CHANNELS", value, int(metadata["res2_out_channels"]))
    if "stride_in_1x1" in metadata and (depth is None or int(depth) >= 50):
        value = bool(get_dotted(cfg, "MODEL.RESNETS.STRIDE_IN_1X1"))
        if value != bool(metadata["stride_in_1x1"]):
            mismatch("MODEL.RESNETS.STRIDE_IN_1X1", value, bool(metadata["stride_in_1x1"]))
    if problems:
        raise LocoError(f"config does not match the converted weights {where}: "
                        + "; ".join(problems)
                        + " (torchvision-style weights need INPUT.FORMAT RGB, torchvision's "
                        "MODEL.PIXEL_MEAN/PIXEL_STD and MODEL.RESNETS.STRIDE_IN_1X1 False, as "
                        "det_configs/Base-loco-SSL.yaml sets them)")


def backbone_state_keys(model):
    """State-dict keys of the pretrained ResNet inside a Detectron2 model.

    Why this definition: the converted checkpoint holds exactly a ResNet (stem + residual
    blocks). In FPN models it is `backbone.bottom_up`; in C4 models res5 lives in the ROI head
    (`roi_heads.res5.<i>`). FPN lateral/output convs, an extra norm appended after res5 (MoCo's
    protocol) and the heads are new layers that are *expected* to be missing. BatchNorm's
    `num_batches_tracked` is bookkeeping, not a weight, and old checkpoints lack it.
    """
    from detectron2.modeling.backbone.resnet import BasicStem, CNNBlockBase, ResNet

    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (ResNet, BasicStem, CNNBlockBase)):
            for name in module.state_dict().keys():
                if name.endswith("num_batches_tracked"):
                    continue
                keys.add(f"{prefix}.{name}" if prefix else name)
    return keys


def _group(key, depth=2):
    return ".".join(key.split(".")[:depth])


class _WeightsOnlyLoad(Checkpointer):
    """fvcore's native `.pth` load (`torch.load`) as `torch_load_weights`: weights only, and
    one-line errors. Placed after Detectron2's class in LocoCheckpointer's bases, so that
    Detectron2's `.pth` branch reaches it through its own `super()._load_file`."""

    def _load_file(self, filename):
        loaded = torch_load_weights(filename)
        if not isinstance(loaded, dict):
            raise LocoError(f"cannot use {filename}: expected a dict, found "
                            f"{type(loaded).__name__}")
        return loaded


class LocoCheckpointer(DetectionCheckpointer, _WeightsOnlyLoad):
    """Detectron2's `DetectionCheckpointer` with safe loading and strict backbone checks.

    Use it wherever Detectron2 code makes a `DetectionCheckpointer`:
    `LocoCheckpointer(model, save_dir, allow_missing_backbone=cfg.LOCO_DET.FROM_SCRATCH,
    **checkpointables)`. Saving is unchanged (Detectron2's `.pth`), so `--resume` and
    `--eval-only` with `model_final.pth` work as before.

    Why each change:
    - `.pkl` files go through `load_pkl` (loco_det.weights.safe_load) (Detectron2 would run any code in them);
      Detectron2's handling of its model-zoo and Caffe2 pickles is otherwise kept.
    - `.pth` files are read with `torch.load(weights_only=True)` (`_WeightsOnlyLoad`); `.pyth`
      (pycls) files by Detectron2, whose `torch.load` is weights-only by default in torch >= 2.6.
    - A backbone weight missing after loading (wrong depth, wrong file, a prefix that did not
      match) is a `LocoError` naming it, not a warning scrolled past in the log; unless
      `allow_missing_backbone` (training from scratch).
    - A table of loaded / missing / unused keys per module is logged.
    - If `cfg` is given, converter metadata in a loaded `.pkl` is checked against it too.
    """

    def __init__(self, model, save_dir="", *, allow_missing_backbone=False, cfg=None,
                 save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_missing_backbone = bool(allow_missing_backbone)
        self.cfg = cfg
        self._loading = None
        self.last_load_report = None

    def load(self, path, *args, **kwargs):
        """Same as Detectron2's, with a one-line error for a local path that does not exist."""
        if path and "://" not in str(path) and not os.path.isfile(path):
            raise LocoError(f"checkpoint not found: {path}")
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def load_loaded(self, checkpoint, source):
        """Load a checkpoint dict already in memory (e.g. weights being converted, before they
        are written) into the model with the same checks and table as `load`."""
        self._loading = source
        try:
            return self._load_model(checkpoint)
        finally:
            self._loading = None

    def _load_file(self, filename):
        """`.pkl`: the safe loader (Detectron2 would `pickle.load` it, running any code in it),
        then Detectron2's own model-zoo / Caffe2 handling of what was read, which it offers no
        hook for between unpickling and that handling. Everything else is Detectron2's own code
        (its `.pyth` and `.pth` branches), whose native `.pth` load is `_WeightsOnlyLoad`'s."""
        if not filename.endswith(".pkl"):
            try:
                return super()._load_file(filename)
            except AssertionError as e:   # Detectron2's check that a pycls file has model_state
                raise LocoError(f"cannot load {filename}: {e}") from None
            except TORCH_LOAD_ERRORS as e:   # Detectron2's own torch.load of a .pyth
                raise torch_load_error(filename, e) from None
        data = load_pkl(filename)
        if not isinstance(data, dict):
            raise LocoError(f"cannot use {filename}: expected a dict of weights, found "
                            f"{type(data).__name__}")
        if self.cfg is not None:
            check_weights_metadata(self.cfg, data.get(METADATA_KEY), filename)
        if "model" in data and "__author__" in data:
            # Detectron2 model-zoo format (and loco_det's converter output)
            self.logger.info("Reading a file from '{}'".format(data["__author__"]))
            return data
        # Caffe2 / Detectron1 model zoo, as Detectron2 does it
        if "blobs" in data:
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        source = self._loading or "the checkpoint"
        model_keys = list(self.model.state_dict().keys())
        missing = set(_filter_reused_missing_keys(self.model, list(incompatible.missing_keys)))
        missing |= {k for k, _, _ in incompatible.incorrect_shapes}
        unused = set(incompatible.unexpected_keys)
        self._log_table(model_keys, missing, unused, source)

        backbone_missing = sorted(missing & backbone_state_keys(self.model))
        self.last_load_report = {"loaded": sorted(set(model_keys) - missing),
                                 "missing": sorted(missing), "unused": sorted(unused),
                                 "backbone_missing": backbone_missing}
        if backbone_missing:
            if self.allow_missing_backbone:
                self.logger.warning(
                    f"{len(backbone_missing)} backbone weights not in {source}; they keep their "
                    "random initialisation (training from scratch is allowed)")
            else:
                more = f" (and {len(backbone_missing) - 1} more)" if len(backbone_missing) > 1 else ""
                raise LocoError(
                    f"backbone parameter {backbone_missing[0]}{more} is missing from {source}: "
                    "the weights do not fit this model (wrong depth or file?); set "
                    "LOCO_DET.FROM_SCRATCH True to train the backbone from scratch instead")
        return incompatible

    def _log_incompatible_keys(self, incompatible):
        """Only shape mismatches are warned about here: missing and unused keys are in the
        table (`_log_table`, log file), and a missing backbone weight is an error."""
        for key, shape_checkpoint, shape_model in incompatible.incorrect_shapes:
            self.logger.warning(f"not loaded: {key} has shape {tuple(shape_checkpoint)} in the "
                                f"checkpoint but {tuple(shape_model)} in the model")

    def _log_table(self, model_keys, missing, unused, source):
        """Per-module counts of loaded, missing and unused keys: one glance shows whether the
        backbone was fully loaded and which heads start from scratch."""
        from tabulate import tabulate

        rows = collections.OrderedDict()
        for key in model_keys:
            row = rows.setdefault(_group(key), [0, 0, 0])
            row[1 if key in missing else 0] += 1
        for key in sorted(unused):
            rows.setdefault("(checkpoint) " + _group(key, 1), [0, 0, 0])[2] += 1
        table = tabulate([[name, *counts] for name, counts in rows.items()],
                         headers=["module", "loaded", "missing", "unused"], tablefmt="pipe")
        file_only = {"loco_det_file_only": True}  # details for log.txt, not the console
        self.logger.info(f"Weights loaded from {source}: {len(model_keys) - len(missing)} of "
                         f"{len(model_keys)} model keys, {len(missing)} missing (new layers), "
                         f"{len(unused)} unused (table in log.txt)")
        self.logger.info(f"Weights loaded from {source}:\n{table}", extra=file_only)
        if missing:
            shown = sorted(missing)
            self.logger.info("Missing keys (initialised from scratch): "
                             + ", ".join(shown[:50]) + (" ..." if len(shown) > 50 else ""),
                             extra=file_only)
        if unused:
            shown = sorted(unused)
            self.logger.info("Unused checkpoint keys: "
                             + ", ".join(shown[:50]) + (" ..." if len(shown) > 50 else ""),
                             extra=file_only)

