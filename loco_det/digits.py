"""Real handwritten digits as an ImageFolder: the UCI optical-recognition digits that
scikit-learn ships (`sklearn.datasets.load_digits`), so the learning rules can be checked on
real scans with no download at run time.

The data: 1797 scans of handwritten digits, 10 classes, each an 8x8 grid of ink counts 0..16
(UCI "Optical Recognition of Handwritten Digits", the copy scikit-learn bundles). The split is
fixed and documented (docs/formats.md, "Digits"): scans 0..1436 in scikit-learn's order are
`train` (1437), scans 1437..1796 are `val` (360). Each scan is written as an RGB PNG of
`size` x `size` pixels (bicubic upsampling of the 8x8 grid, ink bright on black), so an
ImageNet-style ResNet stem sees more than one pixel per stage; `meta.json` records the source,
the split and a sha256 of scikit-learn's array, so anyone can check the images come from it.

Like the embedded data, the folder is written to a temporary folder beside `out` and renamed,
so a killed run leaves no half dataset under the real name.
"""
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from .utils import LocoError, _umask, remove_stale_temps, temp_prefix

FORMAT = 1
GENERATOR = "loco_det.digits"
N_TRAIN = 1437   # scans [0, 1437) in scikit-learn's order; [1437, 1797) are val
DEFAULT_SIZE = 32


def load_scans():
    """(images uint8 [N, 8, 8] in 0..16, labels int [N], sha256 of both arrays' bytes)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LocoError("the digits data source needs scikit-learn (pip install scikit-learn)") \
            from None
    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.uint8)
    labels = np.asarray(digits.target, dtype=np.int64)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return images, labels, digest


def render(scan, size):
    """One 8x8 scan (0..16) as an RGB PIL image of size x size (bicubic, ink bright)."""
    from PIL import Image

    gray = Image.fromarray((scan.astype(np.float32) * (255.0 / 16.0)).round().astype(np.uint8))
    return gray.resize((size, size), Image.BICUBIC).convert("RGB")


def request(size):
    import sklearn

    return {"generator": GENERATOR, "format": FORMAT, "size": size,
            "source": "sklearn.datasets.load_digits", "sklearn_version": sklearn.__version__,
            "split": f"train: scans 0..{N_TRAIN - 1}, val: scans {N_TRAIN}..1796 "
                     "(scikit-learn's order)"}


def read_meta(out):
    try:
        with open(os.path.join(out, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write(out, size=DEFAULT_SIZE, progress=None):
    """Write the digits ImageFolder to `out` (train/<digit>/<scan>.png, val/..., meta.json).
    An existing folder written by this function with the same size is reused; any other
    non-empty folder is refused. Returns the metadata."""
    if size < 8:
        raise LocoError(f"--size {size}: the scans are 8x8; choose at least 8")
    out = os.path.abspath(out)
    req = request(size)
    remove_stale_temps(out)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise LocoError(f"{out} exists and is not a directory")
        existing = read_meta(out)
        if existing is not None and existing.get("generator") == GENERATOR \
                and all(existing.get(k) == v for k, v in req.items()):
            return existing
        raise LocoError(f"{out} is not empty and is not a digits folder of size {size}; "
                        "choose another --out (nothing was written)")
    images, labels, digest = load_scans()
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=temp_prefix(out))
    try:
        counts = {"train": 0, "val": 0}
        for i, (scan, label) in enumerate(zip(images, labels)):
            split = "train" if i < N_TRAIN else "val"
            folder = os.path.join(tmp, split, str(int(label)))
            os.makedirs(folder, exist_ok=True)
            render(scan, size).save(os.path.join(folder, f"{i:04d}.png"))
            counts[split] += 1
            if progress:
                progress(i)
        meta = dict(req, counts=counts, sha256=digest, classes=[str(c) for c in range(10)])
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        os.chmod(tmp, 0o777 & ~_umask())
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
