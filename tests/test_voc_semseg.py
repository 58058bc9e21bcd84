"""PASCAL VOC detection and Cityscapes semantic segmentation on the embedded data, through
Detectron2's own loaders and evaluators: the views read back, perfect predictions score 100,
and real (few-iteration) training writes numeric VOC AP50 and cityscapesscripts mIoU into
results.json."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import loco_det.detection.compat  # noqa: F401  (before detectron2)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from loco_det import synthetic
from loco_det.detection import datasets
from loco_det.utils import LocoError

from conftest import SYNTH_TRAIN, SYNTH_VAL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
CFG = os.path.join(REPO, "det_configs")
FAST = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST", "96",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "1000", "SEED", "1",
        "LOCO_DET.FROM_SCRATCH", "True", "SOLVER.MAX_ITER", "3"]


def test_train_ids_are_cityscapesscripts(synth_env, tmp_path):
    """The mapping written into *_labelTrainIds.png is cityscapesscripts' own, and the files
    equal what its json2labelImg (the tool behind createTrainIdLabelImgs) draws from the
    polygons."""
    from cityscapesscripts.helpers.labels import id2label
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    assert synthetic.CITYSCAPES_TRAIN_IDS == {
        cs_id: id2label[cs_id].trainId
        for cs_id in [c["cityscapes_id"] for c in synthetic.categories()]
        + [synthetic.BACKGROUND_LABEL[1]]}
    dicts = DatasetCatalog.get("loco_synth_cityscapes_sem_seg_val")
    assert len(dicts) == SYNTH_VAL
    for d in dicts:
        ours = np.asarray(Image.open(d["sem_seg_file_name"]))
        label_ids = np.asarray(Image.open(d["sem_seg_file_name"].replace("TrainIds", "Ids")))
        mapped = np.vectorize(lambda i: id2label[int(i)].trainId)(label_ids)
        assert np.array_equal(ours, mapped)
        official = str(tmp_path / "official_labelTrainIds.png")
        json2labelImg(d["sem_seg_file_name"].replace("labelTrainIds.png", "polygons.json"),
                      official, "trainIds")
        assert (np.asarray(Image.open(official)) == ours).mean() > 0.99


def test_voc_view_matches_coco_view(synth_env):
    """Detectron2's load_voc_instances reads the VOC view; its boxes are the COCO view's."""
    meta = MetadataCatalog.get("loco_synth_voc_train")
    assert (meta.evaluator_type, meta.year, meta.split) == ("pascal_voc", 2007, "train")
    assert meta.thing_classes == [c["name"] for c in synthetic.categories()]
    voc = DatasetCatalog.get("loco_synth_voc_train")
    coco = DatasetCatalog.get("loco_synth_coco_train")
    assert len(voc) == len(coco) == SYNTH_TRAIN
    for v, c in zip(voc, coco):
        assert v["file_name"].endswith(".jpg") and (v["height"], v["width"]) == (c["height"],
                                                                                 c["width"])
        vb = sorted((a["category_id"], *a["bbox"]) for a in v["annotations"])
        cb = sorted((a["category_id"], a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                     a["bbox"][1] + a["bbox"][3]) for a in c["annotations"])
        assert vb == cb
        assert np.asarray(Image.open(v["file_name"])).shape == (v["height"], v["width"], 3)


def test_missing_voc_and_sem_seg_data_name_the_path(tmp_path):
    datasets.register_all(str(tmp_path))
    try:
        with pytest.raises(LocoError, match=r"VOC2007"):
            DatasetCatalog.get("loco_synth_voc_val")
        with pytest.raises(LocoError, match=r"leftImg8bit[/\\]val"):
            DatasetCatalog.get("loco_synth_cityscapes_sem_seg_val")
    finally:
        datasets.register_all()


def test_voc_evaluator_gives_100_on_perfect_predictions(synth_env):
    from loco_det.detection import train  # noqa: F401  (numpy aliases Detectron2 v0.6 needs)
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    name = "loco_synth_voc_val"
    dicts = DatasetCatalog.get(name)
    evaluator = PascalVOCDetectionEvaluator(name)
    evaluator.reset()
    outputs = []
    for d in dicts:
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in d["annotations"]]))  # XYXY
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        inst.scores = torch.ones(len(d["annotations"]))
        outputs.append({"instances": inst})
    evaluator.process([{"image_id": d["image_id"]} for d in dicts], outputs)
    result = evaluator.evaluate()["bbox"]
    for key in ("AP", "AP50", "AP75"):
        assert result[key] == pytest.approx(100.0), result
    # and a box shifted by half its width is no longer a match at IoU 0.5
    evaluator.reset()
    for out in outputs:
        t = out["instances"].pred_boxes.tensor
        t[:, [0, 2]] += (t[:, 2] - t[:, 0]).unsqueeze(1) * 0.6
    evaluator.process([{"image_id": d["image_id"]} for d in dicts], outputs)
    assert evaluator.evaluate()["bbox"]["AP50"] < 50.0


def test_sem_seg_evaluator_gives_100_on_perfect_predictions(synth_env, tmp_path, monkeypatch):
    from detectron2.evaluation import CityscapesSemSegEvaluator

    monkeypatch.chdir(tmp_path)
    name = "loco_synth_cityscapes_sem_seg_val"
    dicts = DatasetCatalog.get(name)
    evaluator = CityscapesSemSegEvaluator(name)
    evaluator.reset()
    outputs = []
    for d in dicts:
        train_ids = torch.from_numpy(np.asarray(Image.open(d["sem_seg_file_name"])).astype(int))
        logits = torch.nn.functional.one_hot(train_ids, 19).permute(2, 0, 1).float()
        outputs.append({"sem_seg": logits})
    evaluator.process([{"file_name": d["file_name"]} for d in dicts], outputs)
    result = evaluator.evaluate()["sem_seg"]
    assert result["IoU"] == pytest.approx(100.0) and result["iIoU"] == pytest.approx(100.0)
    assert not os.listdir(tmp_path)  # nothing written into the working directory


def _train_net(args, synth_root, cwd):
    env = dict(os.environ, DETECTRON2_DATASETS=os.fspath(synth_root.parent))
    env.setdefault("OMP_NUM_THREADS", "2")
    return subprocess.run([sys.executable, TRAIN_NET, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _numeric(x):
    return isinstance(x, float) and np.isfinite(x)


def test_voc_training_writes_numeric_ap50(synth_root, tmp_path):
    out = tmp_path / "out"
    proc = _train_net(["--config-file", os.path.join(CFG, "cpu_synth_voc_R18_FPN_frozen.yaml"),
                       "OUTPUT_DIR", str(out), *FAST], synth_root, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert all(_numeric(res["bbox"][k]) for k in ("AP", "AP50", "AP75")), res["bbox"]
    assert res["segm"] is None and res["evaluators"] == {"bbox": "pascal_voc"}
    assert res["protocol"]["benchmark"] == "voc" and res["protocol"]["frozen"] is True
    assert list(res["metrics"]) == ["loco_synth_voc_val"]


def test_sem_seg_training_writes_numeric_miou(synth_root, tmp_path):
    out = tmp_path / "out"
    proc = _train_net(["--config-file",
                       os.path.join(CFG, "cpu_synth_cityscapes_sem_seg_R18_FPN_finetune.yaml"),
                       "OUTPUT_DIR", str(out), *FAST], synth_root, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert _numeric(res["sem_seg"]["mIoU"]) and 0.0 <= res["sem_seg"]["mIoU"] <= 100.0
    assert res["bbox"] is None and res["segm"] is None
    assert res["evaluators"] == {"sem_seg": "cityscapes"}
    p = res["protocol"]
    assert p["benchmark"] == "cityscapes_sem_seg" and p["frozen"] is False and p["freeze_at"] == 0
    assert "Score Average" in proc.stdout  # cityscapesscripts' own table
    assert sorted(os.listdir(tmp_path)) == ["out"]
