"""Detectron2 registration of loco_det's datasets: Detectron2's own loaders read the embedded
data, the official evaluators give AP 100 on perfect predictions, missing data is named."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import loco_det.detection.compat  # noqa: F401  (before detectron2)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from loco_det.detection import datasets
from loco_det.utils import LocoError

from conftest import SYNTH_VAL

SYNTH_NAMES = [f"loco_synth_{view}_{split}" for view in ("coco", "cityscapes_instance_seg")
               for split in ("train", "val")]


def test_register_all_is_idempotent_and_lazy(tmp_path):
    root = datasets.register_all(str(tmp_path / "nothing_here"))
    datasets.register_all(str(tmp_path / "nothing_here"))
    names = DatasetCatalog.list()
    for name in SYNTH_NAMES:
        assert names.count(name) == 1
    meta = MetadataCatalog.get("loco_synth_cityscapes_instance_seg_val")
    assert meta.evaluator_type == "cityscapes_instance"
    assert meta.gt_dir == os.path.join(root, "loco_synth", "cityscapes", "gtFine", "val")
    builtin = MetadataCatalog.get("cityscapes_fine_instance_seg_val")
    assert meta.thing_classes == builtin.thing_classes
    coco_meta = MetadataCatalog.get("loco_synth_coco_train")
    assert coco_meta.evaluator_type == "coco"
    assert coco_meta.json_file.endswith(os.path.join("coco", "annotations", "instances_train.json"))


def test_limited_label_splits_share_scenes_across_views(synth_env):
    """loco_synth_{coco,cityscapes_instance_seg}_train_{N}_seed{S}: N train scenes drawn with seed
    S, the same scenes in both views; different seeds draw different splits."""
    datasets.register_all()
    n = min(datasets.SYNTH_SUBSET_SIZES)
    if n > 24:   # the session's dataset has 24 train scenes: a larger split is an error
        with pytest.raises(LocoError, match=f"asks for {n} labelled scenes but the train "
                                            "split has only 24"):
            DatasetCatalog.get(f"loco_synth_coco_train_{n}_seed0")
    full = DatasetCatalog.get("loco_synth_coco_train")
    picks = {}
    for seed in (0, 1):
        dicts = datasets.synthetic_subset(full, 10, seed, "x")
        assert len(dicts) == 10 and len({d["file_name"] for d in dicts}) == 10
        picks[seed] = [os.path.basename(d["file_name"]) for d in dicts]
    assert picks[0] != picks[1]
    cs = DatasetCatalog.get("loco_synth_cityscapes_instance_seg_train")
    cs_pick = [os.path.basename(d["file_name"]) for d in datasets.synthetic_subset(cs, 10, 0, "y")]
    # shapes_000000_000007_leftImg8bit.png <-> 000007.png
    assert [f.split("_")[2] + ".png" for f in cs_pick] == picks[0]
    assert datasets.synthetic_subset(list(reversed(full)), 10, 0, "x") == \
        datasets.synthetic_subset(full, 10, 0, "x")   # order of the input does not matter
    meta = MetadataCatalog.get(f"loco_synth_cityscapes_instance_seg_train_{n}_seed3")
    assert meta.evaluator_type == "cityscapes_instance"


def test_missing_data_names_the_path(tmp_path):
    datasets.register_all(str(tmp_path))
    try:
        with pytest.raises(LocoError, match="instances_train.json"):
            DatasetCatalog.get("loco_synth_coco_train")
        with pytest.raises(LocoError, match=r"leftImg8bit[/\\]val"):
            DatasetCatalog.get("loco_synth_cityscapes_instance_seg_val")
        # annotations present but the image folder gone
        ann = tmp_path / "loco_synth" / "coco" / "annotations"
        ann.mkdir(parents=True)
        (ann / "instances_val.json").write_text(json.dumps({"images": [], "annotations": [],
                                                            "categories": []}))
        with pytest.raises(LocoError, match=r"coco[/\\]val"):
            DatasetCatalog.get("loco_synth_coco_val")
    finally:
        datasets.register_all()


def test_detectron2_cityscapes_loader_reads_the_view(synth_env):
    from detectron2.data.datasets.cityscapes import load_cityscapes_instances

    dicts = DatasetCatalog.get("loco_synth_cityscapes_instance_seg_val")  # from_json=True
    assert len(dicts) == SYNTH_VAL
    gt_dir = MetadataCatalog.get("loco_synth_cityscapes_instance_seg_val").gt_dir
    image_dir = MetadataCatalog.get("loco_synth_cityscapes_instance_seg_val").image_dir
    from_png = {d["file_name"]: d for d in load_cityscapes_instances(image_dir, gt_dir,
                                                                     from_json=False,
                                                                     to_polygons=False)}
    import pycocotools.mask as mask_util

    for d in dicts:
        png = from_png[d["file_name"]]
        assert len(d["annotations"]) == len(png["annotations"]) >= 1
        h, w = d["height"], d["width"]
        for a in d["annotations"]:
            poly_mask = mask_util.decode(mask_util.merge(
                mask_util.frPyObjects(a["segmentation"], h, w))).astype(bool)
            ious = [(poly_mask & mask_util.decode(b["segmentation"]).astype(bool)).sum()
                    / (poly_mask | mask_util.decode(b["segmentation"]).astype(bool)).sum()
                    for b in png["annotations"] if b["category_id"] == a["category_id"]]
            assert max(ious) > 0.95


def _perfect_cityscapes_outputs(dicts, metadata):
    """Predictions equal to the pixel ground truth (instanceIds png), score 1."""
    from cityscapesscripts.helpers.labels import id2label

    outputs = []
    for d in dicts:
        stem = os.path.basename(d["file_name"])[: -len("leftImg8bit.png")]
        city = os.path.basename(os.path.dirname(d["file_name"]))
        ids = np.asarray(Image.open(os.path.join(metadata.gt_dir, city,
                                                 stem + "gtFine_instanceIds.png"))).astype(int)
        inst_ids = [v for v in np.unique(ids) if v >= 1000]
        inst = Instances((ids.shape[0], ids.shape[1]))
        inst.pred_masks = torch.from_numpy(np.stack([ids == v for v in inst_ids]))
        inst.pred_classes = torch.tensor([metadata.thing_classes.index(id2label[v // 1000].name)
                                          for v in inst_ids])
        inst.scores = torch.ones(len(inst_ids))
        inst.pred_boxes = Boxes(torch.zeros(len(inst_ids), 4))
        outputs.append({"instances": inst})
    return outputs


def test_cityscapes_evaluator_gives_ap_100_on_perfect_predictions(synth_env, tmp_path,
                                                                  monkeypatch):
    from detectron2.evaluation import CityscapesInstanceEvaluator

    monkeypatch.chdir(tmp_path)  # the v0.6 evaluator dumps matches.json into the cwd
    name = "loco_synth_cityscapes_instance_seg_val"
    dicts = [{"file_name": d["file_name"]} for d in DatasetCatalog.get(name)]
    evaluator = CityscapesInstanceEvaluator(name)
    evaluator.reset()
    evaluator.process(dicts, _perfect_cityscapes_outputs(dicts, MetadataCatalog.get(name)))
    result = evaluator.evaluate()
    assert result["segm"]["AP"] == pytest.approx(100.0)
    assert result["segm"]["AP50"] == pytest.approx(100.0)


def test_coco_evaluator_gives_ap_100_on_perfect_predictions(synth_env, tmp_path):
    import pycocotools.mask as mask_util
    from detectron2.evaluation import COCOEvaluator

    name = "loco_synth_coco_val"
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == SYNTH_VAL
    evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False,
                              output_dir=str(tmp_path), use_fast_impl=False)
    evaluator.reset()
    outputs = []
    for d in dicts:
        h, w = d["height"], d["width"]
        anns = d["annotations"]
        inst = Instances((h, w))
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)  # XYWH_ABS
        boxes[:, 2:] += boxes[:, :2]
        inst.pred_boxes = Boxes(boxes)
        inst.pred_masks = torch.from_numpy(np.stack([
            mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w)))
            for a in anns]).astype(bool))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns])  # contiguous already
        inst.scores = torch.ones(len(anns))
        outputs.append({"instances": inst})
    evaluator.process([{"image_id": d["image_id"]} for d in dicts], outputs)
    result = evaluator.evaluate()
    for task in ("bbox", "segm"):
        assert result[task]["AP"] == pytest.approx(100.0), (task, result[task])


def test_coco_subsets_are_registered_by_file_name(tmp_path):
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    from loco_det import coco_subset

    ann = tmp_path / "coco" / "annotations"
    ann.mkdir(parents=True)
    coco = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 8, "width": 8}
                       for i in range(1, 11)],
            "annotations": [],
            "categories": [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES
                           if c["isthing"]]}
    (ann / "instances_train2017.json").write_text(json.dumps(coco))
    coco_subset.write_subset(str(ann / "instances_train2017.json"), 3, 7)
    # a 2000-image split is named "2k" (faked here by renaming a small file)
    coco_subset.write_subset(str(ann / "instances_train2017.json"), 5, 1,
                             str(ann / "instances_train2017_2000_seed1.json"))
    try:
        datasets.register_all(str(tmp_path))
        names = DatasetCatalog.list()
        assert "coco_2017_train_3_seed7" in names
        assert "coco_2017_train_2k_seed1" in names
        meta = MetadataCatalog.get("coco_2017_train_3_seed7")
        assert meta.evaluator_type == "coco"
        assert meta.image_root == os.path.join(str(tmp_path), "coco", "train2017")
        with pytest.raises(LocoError, match="train2017"):
            DatasetCatalog.get("coco_2017_train_3_seed7")
        (tmp_path / "coco" / "train2017").mkdir()
        assert len(DatasetCatalog.get("coco_2017_train_3_seed7")) == 3
    finally:
        datasets.register_all()
    # re-pointing the root forgets subsets that are not there
    assert "coco_2017_train_3_seed7" not in DatasetCatalog.list()
