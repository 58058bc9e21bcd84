"""Safe loading of detection weights (loco_det/detection/checkpoint.py).

Covers: the restricted unpickler refuses code-running pickles before anything runs; corrupt and
truncated files are one-line errors; converted weights load into real Detectron2 models (FPN
and C4, where res5 lives in the ROI head); a missing backbone weight is an error; metadata that
disagrees with the config is an error naming both values; Detectron2's own model_final.pth
still resumes (trainer, optimizer, scheduler state) through torch.load(weights_only=True).
"""
import itertools
import logging
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision

import loco_det.detection.compat  # noqa: F401  (before detectron2)
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from loco_det.weights import convert as conv
from loco_det.detection.checkpoint import (LocoCheckpointer, backbone_state_keys,
                                           check_weights_metadata, read_weights_metadata)
from loco_det.weights.safe_load import load_pkl as safe_load_pkl, torch_load_weights
from loco_det.utils import LocoError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _RunsCode:
    """Unpickling this calls `fn(*args)`: the classic malicious-pickle payload."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _r18_fpn_cfg(**overrides):
    """A minimal Detectron2 R18-FPN Mask R-CNN config with the self-supervised conventions."""
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.MODEL.PIXEL_MEAN = list(conv.TORCHVISION_PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(conv.TORCHVISION_PIXEL_STD)
    cfg.INPUT.FORMAT = "RGB"
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A converted random ResNet-18 (real weights on disk) and its torchvision state dict."""
    root = tmp_path_factory.mktemp("r18")
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    src, pkl = root / "r18.pth", root / "r18.pkl"
    torch.save({"encoder": model.state_dict(), "method": "loco", "arch": "resnet18"}, src)
    conv.convert(src, pkl)
    return {"state": model.state_dict(), "pkl": pkl, "root": root}


# --- safe_load_pkl -------------------------------------------------------------------------------

def test_code_running_pkl_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payloads = {
        "os.system": _RunsCode(os.system, f"touch {marker}"),
        "eval": _RunsCode(eval, f"open({str(marker)!r}, 'w').write('x')"),
        "nested in model": {"model": {"w": np.zeros(2), "x": _RunsCode(os.system, f"touch {marker}")},
                            "__author__": "x", "matching_heuristics": True},
    }
    for name, payload in payloads.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pkl"
        for protocol in (0, 2, 4):
            path.write_bytes(pickle.dumps(payload, protocol=protocol))
            with pytest.raises(LocoError) as info:
                safe_load_pkl(path)
            message = str(info.value)
            assert str(path) in message and "\n" not in message
            assert "system" in message or "eval" in message
            assert not marker.exists(), name
    # the same refusal through the metadata reader and Detectron2's checkpointer path
    evil = tmp_path / "nested_in_model.pkl"
    with pytest.raises(LocoError, match="refusing to load"):
        read_weights_metadata(str(evil))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(LocoError, match="refusing to load"):
        LocoCheckpointer(model).load(str(evil))
    assert not marker.exists()


def test_safe_load_accepts_weights_pickles(tmp_path):
    data = {"model": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.int64)},
            "__author__": "x", "matching_heuristics": True,
            "meta": {"t": (1, 2.5, None, True), "s": "str", "b": b"\x00\xff", "n": np.float32(1.5),
                     "i": np.int64(3), "c": 1 + 2j, "big": 2 ** 80}}
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        back = safe_load_pkl(path)
        np.testing.assert_array_equal(back["model"]["a"], data["model"]["a"])
        assert back["meta"] == data["meta"]


@pytest.mark.parametrize("content,match", [
    (b"", "empty or truncated"),
    (b"\x80\x04\x95\x10\x00\x00", "empty or truncated"),
    (b"this is not a pickle", "corrupt"),
])
def test_corrupt_pkl_is_one_line_error(tmp_path, content, match):
    path = tmp_path / "w.pkl"
    path.write_bytes(content)
    with pytest.raises(LocoError, match=match) as info:
        safe_load_pkl(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_converted_pkl_and_missing(r18, tmp_path):
    raw = r18["pkl"].read_bytes()
    path = tmp_path / "cut.pkl"
    path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(LocoError, match="cut.pkl.*(truncated|corrupt)"):
        safe_load_pkl(path)
    with pytest.raises(LocoError, match="not found: .*nothere.pkl"):
        LocoCheckpointer(torch.nn.Linear(1, 1)).load(str(tmp_path / "nothere.pkl"))
    with pytest.raises(LocoError, match="not found"):
        read_weights_metadata(str(tmp_path / "nothere.pkl"))


def test_corrupt_pth_is_one_line_error(tmp_path):
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"w": torch.zeros(100)}}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LocoError, match="model_final.pth.*truncated") as info:
        LocoCheckpointer(torch.nn.Linear(1, 1)).load(str(path))
    assert "\n" not in str(info.value)
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": _RunsCode(os.getcwd)}, evil)
    with pytest.raises(LocoError, match="weights_only=True.*getcwd"):
        torch_load_weights(evil)


# --- loading into Detectron2 models -------------------------------------------------------------

def test_loads_converted_pkl_into_fpn_model(r18, caplog):
    cfg = _r18_fpn_cfg(**{"MODEL.WEIGHTS": str(r18["pkl"])})
    meta = read_weights_metadata(cfg.MODEL.WEIGHTS)
    assert meta["depth"] == 18 and meta["method"] == "loco"
    check_weights_metadata(cfg, meta)
    model = build_model(cfg)
    checkpointer = LocoCheckpointer(model, allow_missing_backbone=False, cfg=cfg)
    with caplog.at_level(logging.INFO):
        checkpointer.load(cfg.MODEL.WEIGHTS)
    state = model.state_dict()
    for tv_key, value in r18["state"].items():
        if tv_key.startswith("fc.") or tv_key.endswith("num_batches_tracked"):
            continue
        d2_key = "backbone.bottom_up." + conv.rename_key(tv_key)
        torch.testing.assert_close(state[d2_key], value, rtol=0, atol=0, msg=d2_key)
    report = checkpointer.last_load_report
    assert report["backbone_missing"] == []
    assert any(k.startswith("backbone.fpn_") for k in report["missing"])  # new layers: fine
    assert any(k.startswith("roi_heads.") for k in report["missing"])
    # num_batches_tracked is kept (as Detectron2's converter does); FrozenBN has no such buffer
    assert all(k.endswith("num_batches_tracked") for k in report["unused"])
    table = "\n".join(r.getMessage() for r in caplog.records)
    assert "| module" in table and "loaded" in table and "missing" in table and "unused" in table


def test_missing_backbone_param_is_error(r18, tmp_path):
    data = safe_load_pkl(r18["pkl"])
    del data["model"]["res4.1.conv2.weight"]
    path = tmp_path / "incomplete.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    model = build_model(_r18_fpn_cfg())
    with pytest.raises(LocoError) as info:
        LocoCheckpointer(model).load(str(path))
    message = str(info.value)
    assert "backbone.bottom_up.res4.1.conv2.weight" in message and str(path) in message
    assert "FROM_SCRATCH" in message and "\n" not in message
    # training from scratch: allowed, the parameter keeps its initialisation
    before = model.state_dict()["backbone.bottom_up.res4.1.conv2.weight"].clone()
    checkpointer = LocoCheckpointer(model, allow_missing_backbone=True)
    checkpointer.load(str(path))
    assert checkpointer.last_load_report["backbone_missing"] == ["backbone.bottom_up.res4.1.conv2.weight"]
    torch.testing.assert_close(model.state_dict()["backbone.bottom_up.res4.1.conv2.weight"], before)


def test_wrong_depth_weights_are_refused(r18):
    """R18 weights into an R50 model: shapes differ, nothing of the backbone loads -> error
    (the metadata check would already refuse it; this is the checkpointer's own guard)."""
    cfg = _r18_fpn_cfg(**{"MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.RES2_OUT_CHANNELS": 256})
    with pytest.raises(LocoError, match="DEPTH is 50 in the config but 18"):
        check_weights_metadata(cfg, read_weights_metadata(str(r18["pkl"])))
    model = build_model(cfg)
    with pytest.raises(LocoError, match="backbone parameter backbone.bottom_up.* is missing"):
        LocoCheckpointer(model).load(str(r18["pkl"]))


def test_c4_backbone_keys_include_res5_in_roi_head():
    """In C4 models res5 lives in the ROI head: its blocks are backbone weights too."""
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 50
    model = build_model(cfg)
    keys = backbone_state_keys(model)
    assert "roi_heads.res5.2.conv3.weight" in keys and "backbone.stem.conv1.weight" in keys
    assert "backbone.res4.5.conv3.norm.running_var" in keys
    assert not any(k.startswith(("roi_heads.box_predictor", "proposal_generator")) for k in keys)


# --- metadata -----------------------------------------------------------------------------------

def test_metadata_mismatch_names_key_and_both_values(r18):
    meta = read_weights_metadata(str(r18["pkl"]))
    cfg = _r18_fpn_cfg()
    check_weights_metadata(cfg, meta)  # matches
    check_weights_metadata(cfg, None)  # no metadata: nothing to check
    cases = [
        ("INPUT.FORMAT", "BGR", "INPUT.FORMAT is 'BGR' in the config but 'RGB'"),
        ("MODEL.PIXEL_STD", [1.0, 1.0, 1.0], "MODEL.PIXEL_STD is [1.0, 1.0, 1.0] in the config but [58.395, 57.12, 57.375]"),
        ("MODEL.PIXEL_MEAN", [103.53, 116.28, 123.675], "MODEL.PIXEL_MEAN is [103.53, 116.28, 123.675] in the config but [123.675, 116.28, 103.53]"),
        ("MODEL.RESNETS.DEPTH", 34, "MODEL.RESNETS.DEPTH is 34 in the config but 18"),
        ("MODEL.RESNETS.RES2_OUT_CHANNELS", 256, "RES2_OUT_CHANNELS is 256 in the config but 64"),
    ]
    for key, value, expected in cases:
        with pytest.raises(LocoError) as info:
            check_weights_metadata(_r18_fpn_cfg(**{key: value}), meta)
        assert expected in str(info.value) and "\n" not in str(info.value)
    # tiny float differences (yaml's 123.675 vs 123.67500000001) are not a mismatch
    check_weights_metadata(_r18_fpn_cfg(**{"MODEL.PIXEL_MEAN": [123.6750001, 116.28, 103.53]}), meta)
    # stride convention: only meaningful for bottleneck ResNets
    r50_meta = dict(meta, depth=50, res2_out_channels=256, arch="resnet50")
    cfg = _r18_fpn_cfg(**{"MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
                          "MODEL.RESNETS.STRIDE_IN_1X1": True})
    with pytest.raises(LocoError, match="STRIDE_IN_1X1 is True in the config but False"):
        check_weights_metadata(cfg, r50_meta)
    # Detectron2's defaults (the MSRA Caffe conventions) report every disagreement at once
    with pytest.raises(LocoError) as info:
        check_weights_metadata(get_cfg(), r50_meta)
    for key in ("INPUT.FORMAT", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "STRIDE_IN_1X1"):
        assert key in str(info.value)


def test_read_weights_metadata_without_record(tmp_path):
    assert read_weights_metadata("") is None
    assert read_weights_metadata(str(tmp_path / "model_final.pth")) is None
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"model": {"a": np.zeros(1)}, "__author__": "torchvision"}))
    assert read_weights_metadata(str(plain)) is None


# --- Detectron2's own checkpoints still resume ---------------------------------------------------

class _TinyDetector(torch.nn.Module):
    """A Detectron2 ResNet backbone with a loss: enough for SimpleTrainer and its hooks."""

    def __init__(self):
        super().__init__()
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.backbone.resnet import build_resnet_backbone

        cfg = get_cfg()
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.RESNETS.NORM = "BN"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        self.backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))

    def forward(self, images):
        return {"loss": self.backbone(images)["res5"].pow(2).mean()}


def _trainer(save_dir):
    from detectron2.engine import SimpleTrainer, hooks
    from detectron2.solver import build_lr_scheduler, build_optimizer

    cfg = get_cfg()
    cfg.SOLVER.MAX_ITER = 3
    cfg.SOLVER.STEPS = (2,)
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.SOLVER.BASE_LR = 0.01
    torch.manual_seed(0)
    model = _TinyDetector()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    data = itertools.repeat(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    trainer = SimpleTrainer(model, data, optimizer)
    # as DefaultTrainer does: the trainer itself (iteration, hooks, optimizer) is checkpointed
    checkpointer = LocoCheckpointer(model, str(save_dir), trainer=trainer)
    trainer.register_hooks([hooks.IterationTimer(), hooks.LRScheduler(optimizer, scheduler),
                            hooks.PeriodicCheckpointer(checkpointer, 100, max_iter=cfg.SOLVER.MAX_ITER)])
    return trainer, checkpointer, model


def test_model_final_pth_resumes_and_evaluates(tmp_path):
    """Detectron2's own model_final.pth (model, trainer iteration, optimizer, scheduler state)
    loads through torch.load(weights_only=True): --resume and --eval-only keep working."""
    trainer, checkpointer, model = _trainer(tmp_path)
    trainer.train(0, 3)
    final = tmp_path / "model_final.pth"
    assert final.is_file() and checkpointer.has_checkpoint()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    optim_state = trainer.optimizer.state_dict()

    # --resume: a fresh trainer picks up weights, iteration, optimizer and scheduler state
    trainer2, checkpointer2, model2 = _trainer(tmp_path)
    extra = checkpointer2.resume_or_load("", resume=True)
    assert trainer2.iter == 2 and extra["iteration"] == 2
    for key, value in saved.items():
        torch.testing.assert_close(model2.state_dict()[key], value, rtol=0, atol=0)
    loaded = trainer2.optimizer.state_dict()
    assert loaded["state"].keys() == optim_state["state"].keys() and optim_state["state"]
    for index, state in optim_state["state"].items():   # the momentum values, not a count
        assert torch.equal(loaded["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert [g["lr"] for g in loaded["param_groups"]] == [g["lr"] for g in optim_state["param_groups"]]
    assert checkpointer2.last_load_report["missing"] == []
    lr_hook = [h for h in trainer2._hooks if type(h).__name__ == "LRScheduler"][0]
    assert lr_hook.scheduler.last_epoch == 3  # stepped after each of the 3 iterations

    # --eval-only: just the model, from the file
    model3 = _TinyDetector()
    LocoCheckpointer(model3, allow_missing_backbone=False).resume_or_load(str(final), resume=False)
    for key, value in saved.items():
        torch.testing.assert_close(model3.state_dict()[key], value, rtol=0, atol=0)
