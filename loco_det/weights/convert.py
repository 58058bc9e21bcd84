"""Convert a torchvision-style ResNet checkpoint (any layout layouts.py reads) into
Detectron2's weights pickle (docs/formats.md, "Converted weights").

Every check (output path, input layout, ResNet shape, finite weights, and with `verify=True`
Detectron2's features against torchvision's, verify.py) runs before anything is written; the file
is then written atomically. The preprocessing the weights need is recorded in the file so that
`loco_det.detection.checkpoint.check_weights_metadata` can refuse a disagreeing config.

Without `verify` nothing here imports Detectron2: conversion runs where Detectron2 is not
installed.
"""
import os
import pickle
from dataclasses import dataclass, field

from .. import fingerprint
from ..utils import LocoError, atomic_write
from .layouts import check_finite, extract_encoder, load_checkpoint
from .resnet import (METADATA_KEY, TORCHVISION_PIXEL_MEAN, TORCHVISION_PIXEL_STD,
                     convert_state_dict, infer_resnet, rename_key)
from .safe_load import loads_pkl

# The conversion's vocabulary, for its callers: reading (layouts.py), the ResNet (resnet.py).
__all__ = ["ConversionResult", "convert", "check_finite", "extract_encoder", "load_checkpoint",
           "METADATA_KEY", "TORCHVISION_PIXEL_MEAN", "TORCHVISION_PIXEL_STD",
           "convert_state_dict", "infer_resnet", "rename_key"]


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
    layout: str = None
    reason: str = None
    placeholders: list = field(default_factory=list)


def _check_output(input_path, output_path):
    """Everything about OUTPUT that can be checked before reading INPUT."""
    if not output_path.endswith(".pkl"):
        raise LocoError(f"output {output_path} must end in .pkl (Detectron2 chooses how to load "
                        "weights by their extension)")
    if os.path.isdir(output_path):
        raise LocoError(f"output {output_path} is a directory; give a file name ending in .pkl")
    if os.path.exists(input_path) and os.path.exists(output_path) \
            and os.path.samefile(input_path, output_path):
        raise LocoError(f"output {output_path} is the input file")
    parent = os.path.dirname(os.path.abspath(output_path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise LocoError(f"cannot write {output_path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise LocoError(f"cannot write {output_path}: {existing} is not writable")


def convert(input_path, output_path, prefix=None, verify=False, tol=1e-4, verify_image_size=224,
            take=None):
    """Convert INPUT (any layout `extract_encoder` accepts) to OUTPUT.pkl.

    The output is docs/formats.md's "Converted weights" pickle. Every check (output path, input
    layout, ResNet shape, finite weights, and with `verify=True` Detectron2's features against
    torchvision's on the exact bytes about to be written) runs before anything is written; the
    file is then written atomically, so a failure leaves no output and an existing file untouched.
    """
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    _check_output(input_path, output_path)
    obj, placeholders = load_checkpoint(input_path)
    state, dropped, info = extract_encoder(obj, input_path, prefix, take)
    depth = infer_resnet(state, input_path, info["arch_hint"])
    check_finite(state, input_path)
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
        "source_sha256": fingerprint.file_sha256(input_path),
        "method": None if method is None else str(method),
        "prefix": info["prefix"],
        "layout": info["layout"],
        # run identity of a loco_det checkpoint (loco_det/fingerprint.py); None otherwise
        "fingerprint": fingerprint.checkpoint_fingerprint(obj),
        "seed": fingerprint.checkpoint_seed(obj),
    }
    result = {"model": convert_state_dict(state), "__author__": "loco_det",
              "matching_heuristics": True, METADATA_KEY: metadata}
    payload = pickle.dumps(result, protocol=4)  # protocol 4: readable by every Python 3 Detectron2
    outcome = ConversionResult(output=output_path, arch=metadata["arch"], depth=depth,
                               prefix=info["prefix"], method=metadata["method"],
                               num_tensors=len(result["model"]), dropped=dropped, metadata=metadata,
                               layout=info["layout"], reason=info["reason"],
                               placeholders=placeholders)
    if verify:
        from .verify import verify_converted   # Detectron2: only when asked to verify

        err, stages = verify_converted(loads_pkl(payload, output_path), state, tol=tol,
                                       image_size=verify_image_size, source=output_path,
                                       return_stages=True)
        outcome.verify_error, outcome.stage_errors = err, stages
    try:
        with atomic_write(output_path, "wb") as f:
            f.write(payload)
    except OSError as e:
        raise LocoError(f"cannot write {output_path}: {e.strerror or e}") from None
    return outcome
