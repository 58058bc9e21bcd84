"""Deterministic subsets of COCO train2017 for the limited-label benchmark (COCO-10K, COCO-1K).

Why: the LoCo paper fine-tunes Mask R-CNN on 10k and 1k COCO training images and averages over
random splits. A split must be reproducible from (size, seed) alone, on any machine, so the
selection depends only on the sorted image ids of the source file and a seeded RNG (numpy's
PCG64 through `default_rng(seed)`), never on file order or Python's hash seed.

Naming (what `loco_det.detection.datasets.register_all` finds and registers):

    $DETECTRON2_DATASETS/coco/annotations/instances_train2017_{N}_seed{S}.json
        -> Detectron2 dataset `coco_2017_train_{label}_seed{S}`, images from coco/train2017

where label is N/1000 followed by "k" when N is a multiple of 1000 ("10k", "1k") and N itself
otherwise ("500").
"""
import json
import os
import re

import numpy as np

from .utils import LocoError, atomic_write, check_distinct, check_output_dir

SUBSET_FILE_RE = re.compile(r"^instances_train2017_(\d+)_seed(\d+)\.json$")


def size_label(size):
    """10000 -> '10k', 1000 -> '1k', 500 -> '500'."""
    size = int(size)
    return f"{size // 1000}k" if size % 1000 == 0 and size > 0 else str(size)


def subset_filename(size, seed):
    return f"instances_train2017_{int(size)}_seed{int(seed)}.json"


def subset_dataset_name(size, seed):
    return f"coco_2017_train_{size_label(size)}_seed{int(seed)}"


def default_coco_root():
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "coco")


def select_image_ids(image_ids, size, seed):
    """`size` distinct ids from `image_ids`, the same for the same (set of ids, size, seed).
    The ids are sorted first, so the input order does not matter; the result is sorted."""
    ids = sorted({int(i) for i in image_ids})
    if size < 1:
        raise LocoError(f"--size must be positive, got {size}")
    if size > len(ids):
        raise LocoError(f"--size {size} is larger than the {len(ids)} images available")
    rng = np.random.default_rng(int(seed))
    chosen = rng.choice(len(ids), size=size, replace=False)
    return sorted(ids[i] for i in chosen)


def make_subset(coco, size, seed):
    """A COCO dict holding `size` images chosen by `select_image_ids` and only their
    annotations; every other top-level key (info, licenses, categories) is kept."""
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise LocoError("not a COCO instances file: needs 'images' and 'annotations'")
    keep = set(select_image_ids([im["id"] for im in coco["images"]], size, seed))
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    out["images"] = sorted((im for im in coco["images"] if im["id"] in keep), key=lambda im: im["id"])
    out["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    info = dict(out.get("info") or {})
    info["loco_det_subset"] = {"size": int(size), "seed": int(seed)}
    out["info"] = info
    return out


def load_coco_file(path):
    if not os.path.isfile(path):
        raise LocoError(f"COCO annotation file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise LocoError(f"cannot read COCO annotation file {path}: {e}") from e


def registered_name(out, size, seed):
    """The Detectron2 dataset name `register_all` will give the file at `out`, or None when it
    is not where (or not named as) `register_all` looks."""
    expected = os.path.join(default_coco_root(), "annotations", subset_filename(size, seed))
    if os.path.abspath(out) == os.path.abspath(expected):
        return subset_dataset_name(size, seed)
    return None


def check_out_path(src, out):
    """Preflight of the output file: never the source, never a directory or under a file."""
    if os.path.isdir(out):
        raise LocoError(f"--out {out} is a directory; give a file name, e.g. "
                        f"{os.path.join(out, 'instances_subset.json')}")
    check_output_dir(os.path.dirname(os.path.abspath(out)), what=f"--out {out}: folder",
                     links=False)  # a file written atomically: a link there is replaced
    check_distinct(out, src)


def write_subset(src, size, seed, out=None):
    """Read `src`, write the subset atomically (no half-written file is ever visible under the
    name that `register_all` globs for), return (out path, subset dict). Every check (the
    output is not the source, not a directory; the source is a COCO file; the size fits) runs
    before anything is written."""
    if out is None:
        out = os.path.join(os.path.dirname(os.path.abspath(src)), subset_filename(size, seed))
    check_out_path(src, out)
    coco = load_coco_file(src)
    subset = make_subset(coco, size, seed)
    with atomic_write(out, "w") as f:
        json.dump(subset, f)
    return out, subset
