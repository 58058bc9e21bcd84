"""The supervised rule end to end from the command line: cpu_supervised.yaml on the embedded
data -> a checkpoint whose encoder is a torchvision ResNet-18 -> linear readout -> conversion with
--verify -> a (tiny) Mask R-CNN run on the converted weights. Plus its recipes and config checks."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from loco_det.pretrain.config import load_config
from loco_det.pretrain.optim import WarmupStep, build_optimizer, build_scheduler, peak_lr
from loco_det.utils import ConfigError

from test_pretrain_data import make_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
RECIPES = os.path.join(REPO, "pretrain")
# 24 embedded training images, global batch 8 -> 3 steps per epoch; 32 px keeps it seconds.
TINY = ["SEED=0", "DATA.IMAGE_SIZE=32", "OPTIM.BATCH_SIZE=8", "OPTIM.EPOCHS=2",
        "DATA.NUM_WORKERS=0"]


def run_tool(name, *args, env=None, cwd=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(TOOLS, name), *map(str, args)],
                          cwd=cwd or REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_tiny_frozen_mask_rcnn(pkl, det, synth_root, cwd):
    """2 iterations of the COCO-view frozen Mask R-CNN on converted weights `pkl`: the weights
    load into Detectron2 and train."""
    proc = run_tool("train_net.py", "--config-file",
                    os.path.join(REPO, "det_configs", "cpu_synth_coco_R18_FPN_frozen.yaml"),
                    "MODEL.WEIGHTS", pkl, "OUTPUT_DIR", det, "SOLVER.MAX_ITER", "2",
                    "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)",
                    "INPUT.MIN_SIZE_TEST", "96", "SOLVER.WARMUP_ITERS", "1",
                    "SOLVER.CHECKPOINT_PERIOD", "1000", "SEED", "1",
                    env={"DETECTRON2_DATASETS": os.fspath(synth_root.parent)}, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (det / "model_final.pth").exists()


@pytest.fixture(scope="module")
def supervised_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("supervised") / "run"
    proc = run_tool("pretrain.py", "--config", os.path.join(RECIPES, "cpu_supervised.yaml"),
                    "--output-dir", out, f"DATA.ROOT={synth_root / 'imagefolder' / 'train'}",
                    *TINY)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


def test_checkpoint_is_a_torchvision_resnet18(supervised_run, synth_root):
    ckpt = torch.load(supervised_run / "checkpoint_last.pth", map_location="cpu",
                      weights_only=True)
    assert (ckpt["method"], ckpt["arch"], ckpt["step"]) == ("supervised", "resnet18", 6)
    torchvision.models.resnet18().load_state_dict(ckpt["encoder"], strict=True)
    classes = sorted(os.listdir(synth_root / "imagefolder" / "train"))
    assert ckpt["decoders"]["0.fc.weight"].shape == (len(classes), 512)
    # The classifier head and the encoder together are a torchvision classifier.
    full = dict(ckpt["encoder"], **{k[2:]: v for k, v in ckpt["decoders"].items()})
    torchvision.models.resnet18(num_classes=len(classes)).load_state_dict(full, strict=True)
    summary = json.loads((supervised_run / "summary.json").read_text())
    assert summary["finished"] and list(summary["final_losses"]) == ["unit1"]
    assert 0 < summary["final_losses"]["unit1"] < 10


def test_readout_conversion_and_detection(supervised_run, synth_root, tmp_path):
    ckpt = supervised_run / "checkpoint_last.pth"
    proc = run_tool("linear_readout.py", "--checkpoint", ckpt, "--output-dir", tmp_path / "ro",
                    "--data", synth_root / "imagefolder", "--epochs", "2", "--workers", "0",
                    "--seed", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    readout = json.loads((tmp_path / "ro" / "readout.json").read_text())
    assert readout["method"] == "supervised"
    pkl = tmp_path / "supervised_r18.pkl"
    proc = run_tool("convert_to_detectron2.py", ckpt, pkl, "--verify")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert pkl.exists()
    train_tiny_frozen_mask_rcnn(pkl, tmp_path / "det", synth_root, tmp_path)


def test_labels_follow_a_replaced_unreadable_image(tmp_path):
    """An unreadable file is replaced by the next readable one: the label must be the
    replacement's (here the first image of class b replaces the last, bad one of class a)."""
    from loco_det.pretrain.data import TwoViewDataset, simclr_transform

    root = make_folder(tmp_path / "d", n_per_class=2, bad=("a/001.png",))
    cfg = load_config(None, [f"DATA.ROOT={root}", "DATA.IMAGE_SIZE=32", "OPTIM.BATCH_SIZE=2"])
    ds = TwoViewDataset(str(root), simclr_transform(cfg), seed=0)
    _, _, label, bad = ds[(0, 1)]
    assert bad == 1 and ds.samples[2][1] == 1 and label == 1


def test_recipes():
    cpu = load_config(os.path.join(RECIPES, "cpu_supervised.yaml"))
    e2e = load_config(os.path.join(RECIPES, "cpu_e2e.yaml"))
    assert cpu.MODEL.METHOD == "supervised"
    # Same harness as the contrastive CPU recipes: everything but the method is theirs.
    for key in ("DATA", "OPTIM", "MODEL.ARCH"):
        a, b = cpu, e2e
        for part in key.split("."):
            a, b = a[part], b[part]
        assert a == b, key
    r50 = load_config(os.path.join(RECIPES, "supervised_r50_90ep.yaml"))
    o = r50.OPTIM
    assert (r50.MODEL.METHOD, r50.MODEL.ARCH, o.NAME, o.EPOCHS, o.BATCH_SIZE) == (
        "supervised", "resnet50", "sgd", 90, 256)
    assert peak_lr(r50) == pytest.approx(0.1) and o.MOMENTUM == 0.9 and o.WEIGHT_DECAY == 1e-4
    assert (o.SCHEDULE, tuple(o.LR_STEPS), o.LR_GAMMA, o.WARMUP_EPOCHS) == ("step", (30, 60),
                                                                          0.1, 0)
    d = r50.DATA
    assert (d.IMAGE_SIZE, tuple(d.CROP_SCALE)) == (224, (0.08, 1.0))
    assert d.COLOR_JITTER_PROB == d.GRAYSCALE_PROB == d.BLUR_PROB == 0
    assert r50.LOSS.SUPERVISED_VIEWS == 1


def test_step_schedule_per_optimizer_step():
    f = WarmupStep(warmup_steps=2, milestones=[4, 6], gamma=0.1)
    assert [f(s) for s in range(8)] == pytest.approx([0.5, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    cfg = load_config(os.path.join(RECIPES, "supervised_r50_90ep.yaml"))
    optimizer = build_optimizer(cfg, torch.nn.Linear(2, 2))
    sched = build_scheduler(cfg, optimizer, steps_per_epoch=3)
    lrs = []
    for _ in range(90 * 3):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    assert lrs[0] == lrs[89] == pytest.approx(0.1)
    assert lrs[90] == lrs[179] == pytest.approx(0.01) and lrs[180] == pytest.approx(0.001)


@pytest.mark.parametrize("overrides,words", [
    (["MODEL.METHOD=supervised", "MODEL.DECODER.CONV_BLOCKS=1"],
     ["MODEL.DECODER.CONV_BLOCKS=1", "MODEL.METHOD=supervised"]),
    (["LOSS.SUPERVISED_VIEWS=3"], ["LOSS.SUPERVISED_VIEWS"]),
    (["OPTIM.SCHEDULE=step"], ["OPTIM.LR_STEPS", "strictly increasing"]),
    (["OPTIM.SCHEDULE=step", "OPTIM.EPOCHS=10", "OPTIM.LR_STEPS=[5,3]"], ["OPTIM.LR_STEPS"]),
    (["OPTIM.SCHEDULE=step", "OPTIM.EPOCHS=10", "OPTIM.LR_STEPS=[10]"], ["1..9"]),
    (["OPTIM.LR_STEPS=[3]"], ["OPTIM.SCHEDULE=step only"]),
])
def test_config_errors_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for word in words:
        assert word in str(e.value)


def test_resume_with_other_classes_is_one_line(tmp_path):
    from loco_det.pretrain.engine import train
    from loco_det.utils import LocoError

    two = make_folder(tmp_path / "two", n_per_class=4)
    three = make_folder(tmp_path / "three", n_per_class=4, classes=("a", "b", "c"))
    args = ["MODEL.METHOD=supervised", "MODEL.ARCH=resnet18", "OPTIM.EPOCHS=1",
            "DATA.MAX_IMAGES=8", *TINY]
    out = tmp_path / "run"
    train(load_config(None, [f"DATA.ROOT={two}", *args]), str(out))
    with pytest.raises(LocoError, match="classifier has 2 classes.*has 3"):
        train(load_config(None, [f"DATA.ROOT={three}", *args]), str(out), resume=True)
