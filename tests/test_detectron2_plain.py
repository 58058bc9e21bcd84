"""Detectron2 works as itself, with no loco_det import: the pinned v0.6 install is made to work on
this stack by a recorded patch that tools/install_detectron2.py applies to the installed files.

The training test patches a fresh copy of the pinned sources (so it also holds in an environment
whose own copy is not patched yet); the last test checks the environment's own copy.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALLER = os.path.join(REPO, "tools", "install_detectron2.py")

# Detectron2's documented way to train and evaluate: a model-zoo config, a registered COCO-format
# dataset, DefaultTrainer, COCOEvaluator with its defaults (use_fast_impl=True). Nothing of loco_det.
PLAIN_SCRIPT = r'''
import json, os, sys

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.evaluation import COCOEvaluator, inference_on_dataset

root, out = sys.argv[1:3]
for split in ("train", "val"):
    register_coco_instances(f"plain_{split}", {}, f"{root}/coco/annotations/instances_{split}.json",
                            f"{root}/coco/{split}")
cfg = get_cfg()
cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18",
                     "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "BN",
                     "MODEL.ROI_HEADS.NUM_CLASSES", "6", "MODEL.FPN.OUT_CHANNELS", "32",
                     "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
                     "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # predictions after 2 steps
                     "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
                     "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
                     "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
                     "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST", "96",
                     "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.BASE_LR", "0.001",
                     "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
                     "DATASETS.TRAIN", "('plain_train',)", "DATASETS.TEST", "('plain_val',)",
                     "OUTPUT_DIR", out])
default_setup(cfg, default_argument_parser().parse_args([]))
trainer = DefaultTrainer(cfg)
trainer.resume_or_load(resume=False)
trainer.train()
evaluator = COCOEvaluator("plain_val", output_dir=os.path.join(out, "eval"))
results = inference_on_dataset(trainer.model, build_detection_test_loader(cfg, "plain_val"),
                               evaluator)
import detectron2
print("RESULT " + json.dumps({"bbox": results["bbox"]["AP"], "segm": results["segm"]["AP"],
                              "loco_det_imported": any(m.split(".")[0] == "loco_det"
                                                       for m in sys.modules),
                              "detectron2": detectron2.__file__}))
'''


def _installer():
    spec = importlib.util.spec_from_file_location("install_detectron2", INSTALLER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unpatched_copy(tmp_path):
    """A private, unpatched copy of Detectron2: the pinned sdist's package, which `make` leaves
    in the download cache (else the environment's copy, patched or not)."""
    installer = _installer()
    site = tmp_path / "site"
    sdist = os.path.join(installer.CACHE, installer.sdist_name())
    if os.path.isfile(sdist) and installer.sha256_of(sdist) == installer.SHA256:
        top = f"{installer.PACKAGE}-{installer.VERSION}"
        with tarfile.open(sdist) as tar:
            members = list(installer._safe_members(tar, os.path.join(top, "detectron2")))
            tar.extractall(tmp_path / "sdist", members=members)
        site.mkdir()
        shutil.move(tmp_path / "sdist" / top / "detectron2", site / "detectron2")
        return site
    spec = importlib.util.find_spec("detectron2")
    shutil.copytree(list(spec.submodule_search_locations)[0], site / "detectron2",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return site


def _patch(folder):
    return subprocess.run([sys.executable, INSTALLER, "--patch", str(folder)],
                          capture_output=True, text=True, timeout=120)


def _tree(folder):
    """{relative path: bytes} of every file under folder."""
    tree = {}
    for d, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                tree[os.path.relpath(os.path.join(d, f), folder)] = fh.read()
    return tree


def test_plain_detectron2_trains_and_evaluates_without_loco_det(tmp_path, synth_root):
    site = _unpatched_copy(tmp_path)
    proc = _patch(site / "detectron2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    script = tmp_path / "plain_train.py"
    script.write_text(PLAIN_SCRIPT)
    # only the patched copy on the path: loco_det's checkout is not (an editable install of it
    # could still be importable, which is why the script reports what it imported)
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(script), str(synth_root), str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    assert result["loco_det_imported"] is False
    assert result["detectron2"].startswith(str(site)), result
    assert all(isinstance(result[k], float) for k in ("bbox", "segm")), result
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")
    # the default use_fast_impl=True fell back to pycocotools' COCOeval, and said so once
    assert text.count("uses pycocotools' Python COCOeval") == 1, text[-4000:]


def test_patch_is_idempotent_and_refuses_an_unknown_copy(tmp_path):
    site = _unpatched_copy(tmp_path)
    folder = site / "detectron2"
    first = _patch(folder)
    assert first.returncode == 0, first.stderr
    patched = _tree(folder)
    again = _patch(folder)
    assert again.returncode == 0 and "already applied" in again.stdout, again.stdout + again.stderr
    assert _tree(folder) == patched
    installer = _installer()
    status = installer.patch_status(str(folder))
    assert set(status.values()) == {"patched"}
    assert set(status) == set(installer.load_patch()["files"])

    # a copy where one recorded text differs: refused, naming the file, and nothing written
    other = tmp_path / "other"
    shutil.copytree(folder, other / "detectron2")
    masks = other / "detectron2" / "structures" / "masks.py"
    masks.write_text(masks.read_text().replace(".astype(bool)", ".astype(np.bool_)", 1))
    transform = other / "detectron2" / "data" / "transforms" / "transform.py"
    transform.write_text(transform.read_text().replace("interp=Image.BILINEAR, fill=0",
                                                       "interp=Image.LINEAR, fill=0"))
    before = _tree(other)
    bad = _patch(other / "detectron2")
    assert bad.returncode == 1
    assert "structures/masks.py" in bad.stderr and "nothing was changed" in bad.stderr, bad.stderr
    assert _tree(other) == before  # transform.py (patchable on its own) was not touched

    # another Detectron2 version is refused outright
    init = other / "detectron2" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.6"', '__version__ = "0.7"'))
    bad = _patch(other / "detectron2")
    assert bad.returncode == 1 and "Detectron2 0.7" in bad.stderr, bad.stderr


def test_recorded_originals_are_what_the_pinned_sdist_ships(tmp_path):
    """Every recorded original occurs in the pinned sdist's sources exactly as often as recorded
    (checked when the sdist is in the download cache, where `make` leaves it)."""
    installer = _installer()
    patch = installer.load_patch()
    assert patch["detectron2"]["sha256"] == installer.SHA256
    assert patch["detectron2"]["version"] == installer.VERSION
    sdist = os.path.join(installer.CACHE, installer.sdist_name())
    if not os.path.isfile(sdist):
        pytest.skip(f"{sdist} not in the download cache")
    with tarfile.open(sdist) as tar:
        top = f"{installer.PACKAGE}-{installer.VERSION}/detectron2/"
        for name, entries in patch["files"].items():
            text = tar.extractfile(top + name).read().decode("utf-8")
            assert installer._state(text, entries) == "original", name


def test_an_unpatched_detectron2_is_one_line_naming_the_fix(tmp_path):
    """loco_det does not paper over an unpatched install: its tools say how to fix it."""
    installer = _installer()
    if not os.path.isfile(os.path.join(installer.CACHE, installer.sdist_name())):
        pytest.skip("the pinned sdist is not in the download cache")
    site = _unpatched_copy(tmp_path)   # the sdist's own sources
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}")
    # `train` needs Detectron2 (`convert` does not import it: tests/test_weights_no_detectron2.py)
    config = os.path.join(REPO, "det_configs", "cpu_synth_coco_R18_FPN_frozen.yaml")
    proc = subprocess.run([sys.executable, "-m", "loco_det.cli", "train", "--config-file", config,
                           "OUTPUT_DIR", str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: Detectron2 does not import on this stack"), proc.stderr
    assert "tools/install_detectron2.py" in proc.stderr and "Traceback" not in proc.stderr


def test_environment_detectron2_imports_as_itself():
    """The environment's own Detectron2 (what `make` installed and patched), no loco_det."""
    code = ("import sys, detectron2.engine, detectron2.evaluation\n"
            "from detectron2 import model_zoo\n"
            "assert model_zoo.get_config_file('COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml')\n"
            "assert not any(m.split('.')[0] == 'loco_det' for m in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd="/",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stderr[-2000:] + "\n(`make` applies the recorded patch: "
                                  "python tools/install_detectron2.py)")
    check = subprocess.run([sys.executable, INSTALLER, "--check"], capture_output=True, text=True,
                           timeout=120)
    assert check.returncode == 0 and "patched" in check.stdout, check.stdout + check.stderr
