"""The report's VOC, semantic-segmentation and kNN sections on fixture runs with known numbers:
each benchmark in its own table (never in the Mask R-CNN table or its AP plot), mean +- std
over seeds, kNN per stage and k grouped by its protocol."""
import json
import os
import statistics

import yaml

from loco_det.report import write_report


def _json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def make_task_run(d, label, config, benchmark, seed, bbox=None, sem_seg=None):
    _json(f"{d}/run_info.json", {"kind": "detection", "world_size": 1})
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/config.yaml", "w") as f:
        yaml.safe_dump({"SEED": seed, "DATASETS": {"TRAIN": ["loco_synth_voc_train"]},
                        "SOLVER": {"MAX_ITER": 100, "IMS_PER_BATCH": 4}}, f)
    res = {"kind": "detection", "finished": True, "bbox": bbox, "segm": None, "metrics": {},
           "method": label,
           "protocol": {"config_name": config, "benchmark": benchmark, "max_iter": 100,
                        "frozen": True, "freeze_at": 5, "world_size": 1, "global_batch": 4,
                        "seed": seed}}
    if sem_seg is not None:
        res["sem_seg"] = sem_seg
    _json(f"{d}/results.json", res)


def make_readout_with_knn(d, method, knn_top1, image_size=64):
    _json(f"{d}/readout.json", {
        "kind": "readout", "checkpoint": None, "method": method, "arch": "resnet18",
        "top1": {s: 30.0 for s in ("res2", "res3", "res4", "res5")},
        "protocol": {"epochs": 10, "lr": 0.1, "batch_size": 64, "train_images": 100,
                     "val_images": 50, "image_size": 64, "seed": 0}})
    _json(f"{d}/knn.json", {
        "kind": "knn", "method": method, "arch": "resnet18", "top1": knn_top1,
        "protocol": {"ks": [20, 200], "temperature": 0.07, "image_size": image_size,
                     "train_images": 100, "val_images": 50}})


def test_voc_semseg_and_knn_sections(tmp_path):
    r = str(tmp_path / "runs")
    ap50 = [60.0, 62.0, 61.0, 59.0, 63.0]
    for s, a in enumerate(ap50, start=1):
        make_task_run(f"{r}/det/voc/loco/seed{s}", "loco", "cpu_synth_voc_R18_FPN_frozen", "voc",
                      s, bbox={"AP": a - 30, "AP50": a, "AP75": a - 25})
    make_task_run(f"{r}/det/semseg/loco/seed0", "loco",
                  "cpu_synth_cityscapes_sem_seg_R18_FPN_frozen", "cityscapes_sem_seg", 0,
                  sem_seg={"mIoU": 41.25, "iIoU": 20.5, "mIoU_categories": 50.0})
    knn = {"k20": {"res2": 21.0, "res3": 22.0, "res4": 23.0, "res5": 24.5},
           "k200": {"res2": 11.0, "res3": 12.0, "res4": 13.0, "res5": 14.5}}
    make_readout_with_knn(f"{r}/readout/random", "random", knn)
    md_path, rows = write_report([r], str(tmp_path / "out"))
    md = open(md_path).read()

    mask_rcnn = md.split("## Detection (Mask R-CNN), measured")[1].split("\n## ")[0]
    assert "No detection runs found." in mask_rcnn  # VOC / sem seg rows are not Mask R-CNN

    voc = md.split("## VOC detection (Faster R-CNN), measured")[1].split("\n## ")[0]
    line = next(l for l in voc.splitlines() if l.startswith("| loco |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    header = next(l for l in voc.splitlines() if l.startswith("| method |"))
    col = {name.strip(): i for i, name in enumerate(header.strip("|").split("|"))}
    mean, std = statistics.fmean(ap50), statistics.stdev(ap50)
    assert f"{mean:.2f} ± {std:.2f}" == cells[col["APbb50"]]
    assert f"{mean - 30:.2f} ± {std:.2f}" == cells[col["APbb"]] and cells[col["n"]] == "5"
    assert "### voc: cpu_synth_voc_R18_FPN_frozen" in voc   # the table's protocol heading

    sem = md.split("## Cityscapes semantic segmentation, measured")[1].split("\n## ")[0]
    line = next(l for l in sem.splitlines() if l.startswith("| loco |"))
    assert "| 41.25 | 20.50 |" in line

    kn = md.split("## kNN readout, measured")[1].split("\n## ")[0]
    for k, values in (("20", "| 21.00 | 22.00 | 23.00 | 24.50 |"),
                      ("200", "| 11.00 | 12.00 | 13.00 | 14.50 |")):
        table = kn.split(f"### k = {k}\n")[1].split("\n### ")[0]
        line = next(l for l in table.splitlines() if l.startswith("| random |"))
        assert "T 0.07, 64 px, 100 train / 50 val" in line and values in line

    with open(tmp_path / "out" / "report.csv") as f:
        text = f.read()
    assert "knn/k20/res5" in text and "mIoU" in text
