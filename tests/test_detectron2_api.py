"""Detectron2's own public API in the environment `make` builds, used the way a Detectron2 user's
existing script does: configs from the model zoo, `default_setup`, `DefaultTrainer`,
`COCOEvaluator` with its defaults, `inference_on_dataset`, `DefaultPredictor` and Detectron2's
own `DetectionCheckpointer` loading converted weights. The script imports nothing of loco_det
but `loco_det.detection` (which registers its components), and runs in a fresh process.
"""
import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import json, os, sys
import loco_det.detection  # noqa: F401  (the only loco_det import)

import numpy as np
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultPredictor, DefaultTrainer, default_argument_parser, default_setup
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.structures import PolygonMasks
from detectron2.utils.collect_env import collect_env_info

root, out, weights = sys.argv[1:4]
for split in ("train", "val"):
    register_coco_instances(f"plain_{split}", {}, f"{root}/coco/annotations/instances_{split}.json",
                            f"{root}/coco/{split}")
cfg = get_cfg()
cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
assert model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml").MODEL.MASK_ON
assert "roi_heads" in model_zoo.get_config("common/models/mask_rcnn_fpn.py").model  # LazyConfig
cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights,
                     "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                     "MODEL.RESNETS.STRIDE_IN_1X1", "False", "INPUT.FORMAT", "RGB",
                     "MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]",
                     "MODEL.PIXEL_STD", "[58.395, 57.12, 57.375]",
                     "MODEL.ROI_HEADS.NUM_CLASSES", "6", "MODEL.FPN.OUT_CHANNELS", "32",
                     "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
                     "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
                     "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
                     "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
                     "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST", "96",
                     "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.BASE_LR", "0.001",
                     "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
                     "DATASETS.TRAIN", "('plain_train',)", "DATASETS.TEST", "('plain_val',)",
                     "OUTPUT_DIR", out])
args = default_argument_parser().parse_args([])
default_setup(cfg, args)          # calls collect_env_info
assert "PyTorch" in collect_env_info()
assert bool(PolygonMasks([[np.array([0, 0, 4, 0, 4, 4.0])]]).nonempty()[0])   # np.bool
trainer = DefaultTrainer(cfg)
trainer.resume_or_load(resume=False)
trainer.train()
assert os.path.isfile(os.path.join(out, "model_final.pth"))
evaluator = COCOEvaluator("plain_val", output_dir=os.path.join(out, "eval"))  # use_fast_impl=True
results = inference_on_dataset(trainer.model, build_detection_test_loader(cfg, "plain_val"),
                               evaluator)
assert "bbox" in results and "segm" in results, results
import torch
evaluator2 = COCOEvaluator("plain_val", output_dir=os.path.join(out, "eval2"))  # a second one
evaluator2.reset()
batch = next(iter(build_detection_test_loader(cfg, "plain_val")))
trainer.model.eval()
with torch.no_grad():
    evaluator2.process(batch, trainer.model(batch))
assert "bbox" in evaluator2.evaluate()
predictor = DefaultPredictor(cfg.clone())
pred = predictor(np.zeros((96, 128, 3), dtype=np.uint8))
assert "instances" in pred
DetectionCheckpointer(trainer.model).load(weights)
print("RESULT " + json.dumps({"bbox": results["bbox"]["AP"], "segm": results["segm"]["AP"]}))
'''


def test_plain_detectron2_script(tmp_path, synth_root, pkl_r18):
    weights = pkl_r18   # loco_det's conversion of a random ResNet-18 (tests/conftest.py)
    script = tmp_path / "plain_detectron2.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(script), str(synth_root), str(tmp_path / "out"),
                           str(weights)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    assert all(isinstance(result[k], float) for k in ("bbox", "segm")), result
    # the Python COCOeval fallback is announced once, not per evaluation
    assert text.count("uses pycocotools' Python COCOeval") == 1, text[-4000:]
    # converted weights load with Detectron2's own checkpointer without the BN-counter warning
    assert "num_batches_tracked" not in text, text[-4000:]
    assert "CompiledOpsMissing" not in text and "Traceback" not in text
