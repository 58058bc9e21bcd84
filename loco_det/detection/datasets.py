"""Detectron2 dataset registration for loco_det's data.

Registered names (root = $DETECTRON2_DATASETS, default "datasets", read when `register_all` runs):

- `loco_synth_coco_{train,val}`: COCO view of the embedded data (root/loco_synth/coco), with
  the metadata `register_coco_instances` sets (evaluator_type "coco", json_file, image_root).
- `loco_synth_cityscapes_instance_seg_{train,val}`: Cityscapes view (root/loco_synth/cityscapes),
  loaded by Detectron2's own `load_cityscapes_instances(from_json=True, to_polygons=True)` with
  the metadata of Detectron2's builtin Cityscapes registration (thing_classes, gt_dir,
  evaluator_type "cityscapes_instance"), so the official `cityscapesscripts` evaluation runs.
- `loco_synth_cityscapes_sem_seg_{train,val}`: the same Cityscapes view for 19-class semantic
  segmentation, loaded by Detectron2's own `load_cityscapes_semantic` (`*_labelTrainIds.png`)
  with the metadata of Detectron2's builtin `cityscapes_fine_sem_seg_*` (evaluator_type
  "cityscapes_sem_seg", ignore_label 255): `CityscapesSemSegEvaluator`, i.e. cityscapesscripts'
  pixel-level evaluation, scores it.
- `loco_synth_voc_{train,val}`: PASCAL VOC view (root/loco_synth/voc/VOC2007), registered by
  Detectron2's own `register_pascal_voc` with the six shape classes (evaluator_type
  "pascal_voc", so `PascalVOCDetectionEvaluator` scores it with the VOC07 11-point AP).
- `loco_synth_coco_train_{N}_seed{S}`, `loco_synth_cityscapes_instance_seg_train_{N}_seed{S}`
  (N in SYNTH_SUBSET_SIZES, S in 0..SYNTH_SUBSET_SEEDS-1): N labelled scenes of the train split
  drawn at random with seed S (`synthetic_subset`), the small-scale analogue of COCO-1K/10K for
  limited-label fine-tuning. Both views of seed S hold the same scenes.
- `coco_2017_train_{label}_seed{S}`: one per subset file
  root/coco/annotations/instances_train2017_{N}_seed{S}.json present when `register_all` runs
  (see `loco_det.coco_subset` for the naming), images from root/coco/train2017.

Real COCO, Cityscapes and VOC keep Detectron2's builtin names (`coco_2017_train`,
`cityscapes_fine_instance_seg_train`, `cityscapes_fine_sem_seg_train`, `voc_2007_trainval`,
`voc_2012_trainval`, `voc_2007_test`, ...), registered by Detectron2 itself.

Registration is lazy: it only records paths, so importing loco_det works without any data. The
loaders check their paths when a dataset is actually loaded and raise `LocoError` naming the
missing directory or file, instead of Detectron2's bare assertion or a FileNotFoundError deep in
a worker pool.
"""
import glob
import logging
import os

from . import compat  # noqa: F401  (must precede detectron2 imports)
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from .. import coco_subset, synthetic  # noqa: E402
from ..utils import LocoError  # noqa: E402

logger = logging.getLogger(__name__)

SYNTH_DIRNAME = "loco_synth"
# Limited-label splits of the embedded train split (5%, 10%, 20%, 50% of its default 600 scenes).
SYNTH_SUBSET_SIZES = (30, 60, 120, 300)
SYNTH_SUBSET_SEEDS = 10

# name -> signature of what we registered; lets register_all be called any number of times and
# re-register only what changed (e.g. tests pointing DETECTRON2_DATASETS somewhere else).
_REGISTERED = {}


def datasets_root():
    """$DETECTRON2_DATASETS, as Detectron2 itself resolves it (default "datasets")."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def synthetic_subset(dicts, n, seed, name):
    """`n` of the dataset dicts, drawn without replacement by `numpy.random.default_rng(seed)`
    from the dicts sorted by file name (so the split depends only on n, seed and the data)."""
    import numpy as np

    dicts = sorted(dicts, key=lambda d: d["file_name"])
    if n > len(dicts):
        raise LocoError(f"{name}: asks for {n} labelled scenes but the train split has only "
                        f"{len(dicts)}")
    keep = np.sort(np.random.default_rng(seed).choice(len(dicts), n, replace=False))
    return [dicts[i] for i in keep]


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise LocoError(f"{what} directory not found: {path} (set DETECTRON2_DATASETS, or "
                        "generate the embedded data with tools/make_synthetic_data.py)")


def _require_file(path, what):
    if not os.path.isfile(path):
        raise LocoError(f"{what} not found: {path}")


def load_coco_checked(json_file, image_root, dataset_name):
    """Detectron2's `load_coco_json`, after checking that both paths exist."""
    from detectron2.data.datasets.coco import load_coco_json

    _require_file(json_file, "COCO annotation file")
    _require_dir(image_root, "COCO image")
    return load_coco_json(json_file, image_root, dataset_name)


def load_cityscapes_checked(image_dir, gt_dir):
    """Detectron2's own `load_cityscapes_instances` (polygons from the json files, as its builtin
    registration does), after checking that both directories exist and hold files."""
    from detectron2.data.datasets.cityscapes import load_cityscapes_instances

    _require_dir(image_dir, "Cityscapes image (leftImg8bit)")
    _require_dir(gt_dir, "Cityscapes annotation (gtFine)")
    if not glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png")):
        raise LocoError(f"no <city>/*_leftImg8bit.png images in {image_dir}")
    for image in sorted(glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png")))[:1]:
        city = os.path.basename(os.path.dirname(image))
        stem = os.path.basename(image)[: -len("leftImg8bit.png")]
        for suffix in ("gtFine_instanceIds.png", "gtFine_polygons.json"):
            _require_file(os.path.join(gt_dir, city, stem + suffix), "Cityscapes annotation file")
    return load_cityscapes_instances(image_dir, gt_dir, from_json=True, to_polygons=True)


def load_cityscapes_semantic_checked(image_dir, gt_dir):
    """Detectron2's own `load_cityscapes_semantic`, after checking the files it needs (its own
    check is a bare assertion)."""
    from detectron2.data.datasets.cityscapes import load_cityscapes_semantic

    _require_dir(image_dir, "Cityscapes image (leftImg8bit)")
    _require_dir(gt_dir, "Cityscapes annotation (gtFine)")
    images = sorted(glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png")))
    if not images:
        raise LocoError(f"no <city>/*_leftImg8bit.png images in {image_dir}")
    city = os.path.basename(os.path.dirname(images[0]))
    stem = os.path.basename(images[0])[: -len("leftImg8bit.png")]
    for suffix in ("gtFine_labelTrainIds.png", "gtFine_labelIds.png", "gtFine_polygons.json"):
        _require_file(os.path.join(gt_dir, city, stem + suffix),
                      "Cityscapes annotation file (labelTrainIds: made by cityscapesscripts' "
                      "createTrainIdLabelImgs)")
    return load_cityscapes_semantic(image_dir, gt_dir)


def load_voc_checked(dirname, split, class_names):
    """Detectron2's own `load_voc_instances`, after checking the split file and folders."""
    import numpy as np
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    if "str" not in np.__dict__:  # v0.6 calls np.loadtxt(dtype=np.str): removed in numpy 1.24,
        np.str = str              # always the builtin (train.py restores the others)

    _require_dir(dirname, "PASCAL VOC")
    _require_file(os.path.join(dirname, "ImageSets", "Main", split + ".txt"), "VOC split file")
    for sub in ("JPEGImages", "Annotations"):
        _require_dir(os.path.join(dirname, sub), f"VOC {sub}")
    return load_voc_instances(dirname, split, class_names)


def _register_voc(name, dirname, split, year, class_names):
    """Detectron2's own `register_pascal_voc` (with our checked loader in place of its bare
    one), unless already registered by us for the same folder."""
    from detectron2.data.datasets.pascal_voc import register_pascal_voc

    signature = ("voc", dirname, split, year, tuple(class_names))
    if _REGISTERED.get(name) == signature and name in DatasetCatalog.list():
        return
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog.list():
            catalog.remove(name)
    register_pascal_voc(name, dirname, split, year, class_names)
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_voc_checked(dirname, split, class_names))
    MetadataCatalog.get(name).evaluator_type = "pascal_voc"
    _REGISTERED[name] = signature


def _cityscapes_metadata():
    try:
        from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

        return _get_builtin_metadata("cityscapes")
    except ImportError:  # a future Detectron2 without the private helper: same data, derived
        from cityscapesscripts.helpers.labels import labels

        things = [lb.name for lb in labels if lb.hasInstances and not lb.ignoreInEval]
        stuff = [lb.name for lb in labels if lb.trainId not in (255, -1)]
        return {"thing_classes": things, "stuff_classes": stuff}


def _coco_metadata():
    from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

    return _get_builtin_metadata("coco")


def _synth_coco_metadata():
    cats = synthetic.categories()
    return {"thing_classes": [c["name"] for c in cats],
            "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)}}


def _register(name, loader, metadata, signature):
    """Register `name` unless already registered by us with the same signature; replace it
    otherwise (a stale registration would silently load another root's data)."""
    if _REGISTERED.get(name) == signature and name in DatasetCatalog.list():
        return
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
    _REGISTERED[name] = signature


def register_synthetic(root):
    synth = os.path.join(root, SYNTH_DIRNAME)
    for split in ("train", "val"):
        name = f"loco_synth_coco_{split}"
        json_file = os.path.join(synth, "coco", "annotations", f"instances_{split}.json")
        image_root = os.path.join(synth, "coco", split)
        _register(name,
                  lambda j=json_file, i=image_root, n=name: load_coco_checked(j, i, n),
                  dict(json_file=json_file, image_root=image_root, evaluator_type="coco",
                       **_synth_coco_metadata()),
                  ("coco", json_file, image_root))

        name = f"loco_synth_cityscapes_instance_seg_{split}"
        image_dir = os.path.join(synth, "cityscapes", "leftImg8bit", split)
        gt_dir = os.path.join(synth, "cityscapes", "gtFine", split)
        _register(name,
                  lambda x=image_dir, y=gt_dir: load_cityscapes_checked(x, y),
                  dict(image_dir=image_dir, gt_dir=gt_dir, evaluator_type="cityscapes_instance",
                       **_cityscapes_metadata()),
                  ("cityscapes", image_dir, gt_dir))

        if split == "train":
            for n in SYNTH_SUBSET_SIZES:
                for seed in range(SYNTH_SUBSET_SEEDS):
                    sub = f"loco_synth_coco_train_{n}_seed{seed}"
                    _register(sub, lambda j=json_file, i=image_root, n=n, s=seed, sub=sub:
                              synthetic_subset(load_coco_checked(j, i, sub), n, s, sub),
                              dict(json_file=json_file, image_root=image_root,
                                   evaluator_type="coco", **_synth_coco_metadata()),
                              ("coco", json_file, image_root, n, seed))
                    sub = f"loco_synth_cityscapes_instance_seg_train_{n}_seed{seed}"
                    _register(sub, lambda x=image_dir, y=gt_dir, n=n, s=seed, sub=sub:
                              synthetic_subset(load_cityscapes_checked(x, y), n, s, sub),
                              dict(image_dir=image_dir, gt_dir=gt_dir,
                                   evaluator_type="cityscapes_instance", **_cityscapes_metadata()),
                              ("cityscapes", image_dir, gt_dir, n, seed))

        name = f"loco_synth_cityscapes_sem_seg_{split}"
        _register(name,
                  lambda x=image_dir, y=gt_dir: load_cityscapes_semantic_checked(x, y),
                  dict(image_dir=image_dir, gt_dir=gt_dir, evaluator_type="cityscapes_sem_seg",
                       ignore_label=255, **_cityscapes_metadata()),
                  ("cityscapes_sem_seg", image_dir, gt_dir))

        _register_voc(f"loco_synth_voc_{split}",
                      os.path.join(synth, "voc", f"VOC{synthetic.VOC_YEAR}"), split,
                      synthetic.VOC_YEAR, [c["name"] for c in synthetic.categories()])


def register_coco_subsets(root):
    """Register every `instances_train2017_{N}_seed{S}.json` found now; forget subsets that we
    registered for another root or whose file is gone."""
    ann_dir = os.path.join(root, "coco", "annotations")
    image_root = os.path.join(root, "coco", "train2017")
    found = set()
    for path in sorted(glob.glob(os.path.join(ann_dir, "instances_train2017_*_seed*.json"))):
        m = coco_subset.SUBSET_FILE_RE.match(os.path.basename(path))
        if not m:
            continue
        name = coco_subset.subset_dataset_name(int(m.group(1)), int(m.group(2)))
        found.add(name)
        _register(name,
                  lambda j=path, i=image_root, n=name: load_coco_checked(j, i, n),
                  dict(json_file=path, image_root=image_root, evaluator_type="coco",
                       **_coco_metadata()),
                  ("coco_subset", path, image_root))
    for name in [n for n, sig in _REGISTERED.items() if sig[0] == "coco_subset" and n not in found]:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        del _REGISTERED[name]


def register_all(root=None):
    """Register loco_det's datasets for `root` (default: $DETECTRON2_DATASETS read now).
    Safe to call repeatedly; a call with another root re-points the names to it."""
    root = os.path.abspath(root if root is not None else datasets_root())
    register_synthetic(root)
    register_coco_subsets(root)
    return root
