"""Conversion of torchvision-style ResNets to Detectron2 weights (tools/convert_to_detectron2.py).

The reference is Detectron2's own converter script; the feature checks run Detectron2's own
ResNet (and the real det_configs) against torchvision's on randomised BatchNorm statistics,
so a rename, stride or normalisation mistake shows up as a numeric difference.
"""
import contextlib
import glob
import io
import os
import pickle
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import loco_det.detection.compat  # noqa: F401  (before detectron2)
from loco_det.detection import convert as conv
from loco_det.detection.checkpoint import safe_load_pkl
from loco_det.utils import LocoError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "tools", "convert_to_detectron2.py")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def d2_converter_script():
    """Detectron2's tools/convert-torchvision-to-d2.py as installed by tools/install_detectron2.py."""
    path = os.path.join(sys.prefix, "share", "detectron2", "tools", "convert-torchvision-to-d2.py")
    if not os.path.isfile(path):
        pytest.fail(f"Detectron2's converter script is missing at {path}; run tools/install_detectron2.py")
    return path


def randomised_resnet(depth, seed=0):
    """A torchvision ResNet whose BN layers are far from identity, so that BN handling matters."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.num_batches_tracked.fill_(1234)
    return model.eval()


def meta_state(depth_or_name):
    """Shapes-only state dict (meta device): enough for prefix and depth inference, and free."""
    name = depth_or_name if isinstance(depth_or_name, str) else f"resnet{depth_or_name}"
    with torch.device("meta"):
        return getattr(torchvision.models, name)().state_dict()


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """One randomised ResNet-50 state dict on disk plus our conversion of it (with --verify)."""
    root = tmp_path_factory.mktemp("r50")
    model = randomised_resnet(50)
    pth = root / "r50.pth"
    torch.save(model.state_dict(), pth)
    pkl = root / "r50.pkl"
    result = conv.convert(str(pth), str(pkl), verify=True, verify_image_size=96)
    return {"model": model, "pth": pth, "pkl": pkl, "result": result, "root": root}


def test_conversion_equals_detectron2_script(r50):
    """Conversion equals Detectron2's own: same arrays under the same names, key by key."""
    theirs_path = r50["root"] / "theirs.pkl"
    argv = sys.argv
    sys.argv = [d2_converter_script(), str(r50["pth"]), str(theirs_path)]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = argv
    theirs = safe_load_pkl(theirs_path)["model"]  # their output is safe-loadable too
    ours = safe_load_pkl(r50["pkl"])
    assert ours["__author__"] == "loco_det" and ours["matching_heuristics"] is True
    # Their script renames fc too (stem.fc.*); we drop it as it is not part of the backbone.
    assert set(theirs) - set(ours["model"]) == {"stem.fc.weight", "stem.fc.bias"}
    assert set(ours["model"]) <= set(theirs)
    for key, array in ours["model"].items():
        assert isinstance(array, np.ndarray)
        assert array.dtype == theirs[key].dtype and array.shape == theirs[key].shape, key
        np.testing.assert_array_equal(array, theirs[key], err_msg=key)
    assert r50["result"].dropped == ["fc.weight", "fc.bias"]


def test_metadata_record(r50):
    meta = safe_load_pkl(r50["pkl"])["loco_det"]
    assert meta["arch"] == "resnet50" and meta["depth"] == 50
    assert meta["input_format"] == "RGB" and meta["stride_in_1x1"] is False
    assert meta["pixel_mean"] == [123.675, 116.28, 103.53]
    assert meta["pixel_std"] == [58.395, 57.12, 57.375]
    assert meta["res2_out_channels"] == 256
    assert meta["source"] == os.path.abspath(r50["pth"])
    assert meta["method"] is None
    import hashlib

    assert meta["source_sha256"] == hashlib.sha256(r50["pth"].read_bytes()).hexdigest()


def test_verify_r50_random_bn_stats(r50):
    """--verify: Detectron2's ResNet-50 (its own builder, REFERENCE conventions) gives
    torchvision's features at res2..res5 on random input."""
    assert r50["result"].verify_error is not None and r50["result"].verify_error < 1e-4
    assert set(r50["result"].stage_errors) == {"res2", "res3", "res4", "res5"}
    print(f"R50 verify max relative error: {r50['result'].verify_error:.3e}")


def test_verify_r18_via_cli_and_loco_checkpoint(tmp_path, capsys):
    """A loco_det pretraining checkpoint -> encoder converted, decoders/fc dropped and listed,
    method recorded; --verify passes for ResNet-18 with randomised BN statistics."""
    sys.path.insert(0, os.path.dirname(CLI))
    try:
        import convert_to_detectron2 as cli
    finally:
        sys.path.pop(0)
    model = randomised_resnet(18, seed=1)
    ckpt = {"encoder": model.state_dict(), "decoders": [{"weight": torch.zeros(4, 64)}],
            "config": "method: loco\n", "method": "loco", "arch": "resnet18", "epoch": 3,
            "step": 30, "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                      "param_groups": []}, "rng": {"torch": torch.zeros(4)}}
    src, out = tmp_path / "checkpoint_last.pth", tmp_path / "r18.pkl"
    torch.save(ckpt, src)
    assert cli.main([str(src), str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "ResNet-18" in printed and "verify: max relative error" in printed
    for dropped in ("decoders.0.weight", "encoder.fc.weight", "encoder.fc.bias", "optimizer (training state"):
        assert dropped in printed
    data = safe_load_pkl(out)
    assert data["loco_det"]["method"] == "loco" and data["loco_det"]["depth"] == 18
    assert data["loco_det"]["res2_out_channels"] == 64
    assert not any(k.startswith(("stem.fc", "fc")) for k in data["model"])
    err = conv.verify(out, image_size=64)  # torchvision weights rebuilt from the .pkl alone
    assert err < 1e-4
    print(f"R18 verify max relative error: {err:.3e}")


def test_verify_detects_wrong_weights(tmp_path):
    """The check has teeth: one altered array makes verify fail with the stage errors."""
    model = randomised_resnet(18, seed=3)
    src, out = tmp_path / "r18.pth", tmp_path / "r18.pkl"
    torch.save(model.state_dict(), src)
    conv.convert(src, out)
    data = safe_load_pkl(out)
    data["model"]["res4.0.conv2.weight"] = data["model"]["res4.0.conv2.weight"] * 1.01
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps(data, protocol=4))
    with pytest.raises(LocoError, match=r"verification failed .*res4 .*res5"):
        conv.verify(bad, model.state_dict(), image_size=64)


@pytest.mark.parametrize("wrap", ["module.", "module.encoder_q.", "encoder.", "state_dict",
                                  "model", "custom"])
def test_prefix_handling(wrap):
    state = meta_state(18)
    if wrap == "module.encoder_q.":  # MoCo: two encoders, an MLP head, a queue
        inner = {f"module.encoder_q.{k}": v for k, v in state.items() if not k.startswith("fc.")}
        inner.update({f"module.encoder_k.{k}": v for k, v in state.items() if not k.startswith("fc.")})
        inner.update({"module.encoder_q.fc.0.weight": torch.empty(512, 512, device="meta"),
                      "module.queue": torch.empty(128, 65536, device="meta")})
        obj, prefix = {"state_dict": inner, "epoch": 200, "arch": "resnet18"}, None
        expect_dropped = {"state_dict.module.encoder_q.fc.0.weight", "state_dict.module.queue",
                          "state_dict.module.encoder_k.* (another ResNet, 120 tensors)"}
    elif wrap in ("state_dict", "model"):
        obj, prefix = {wrap: {f"module.{k}": v for k, v in state.items()}, "epoch": 1}, None
        expect_dropped = {f"{wrap}.module.fc.weight", f"{wrap}.module.fc.bias"}
    elif wrap == "custom":
        obj = {f"student.backbone.{k}": v for k, v in state.items()}
        obj["teacher.backbone.conv1.weight"] = state["conv1.weight"]
        obj["student.head.weight"] = torch.empty(3, device="meta")
        prefix = "student.backbone."
        expect_dropped = {"teacher.backbone.conv1.weight", "student.head.weight",
                          "student.backbone.fc.weight", "student.backbone.fc.bias"}
    else:
        obj = {f"{wrap}{k}": v for k, v in state.items()}
        obj[f"{wrap}projection.0.weight"] = torch.empty(128, 512, device="meta")
        prefix = None
        expect_dropped = {f"{wrap}fc.weight", f"{wrap}fc.bias", f"{wrap}projection.0.weight"}
    found, dropped, info = conv.extract_encoder(obj, "ckpt", prefix)
    assert set(found) == {k for k in state if not k.startswith("fc.")}
    assert set(dropped) == expect_dropped
    assert conv.infer_resnet(found, "ckpt") == 18


def test_custom_prefix_required_when_ambiguous():
    state = meta_state(18)
    obj = {f"student.{k}": v for k, v in state.items()}
    obj.update({f"teacher.{k}": v for k, v in state.items()})
    with pytest.raises(LocoError, match="several ResNets.*--prefix"):
        conv.extract_encoder(obj, "ckpt")
    with pytest.raises(LocoError, match="prefix 'nope.'"):
        conv.extract_encoder(obj, "ckpt", "nope.")
    found, _, info = conv.extract_encoder(obj, "ckpt", "teacher.")
    assert info["prefix"] == "teacher." and "layer4.1.conv2.weight" in found


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_depth_detection(depth):
    state = {k: v for k, v in meta_state(depth).items() if not k.startswith("fc.")}
    assert conv.infer_resnet(state, "ckpt") == depth


@pytest.mark.parametrize("name,match", [
    ("resnext50_32x4d", "grouped or wide"),
    ("wide_resnet50_2", "grouped or wide"),
    ("vgg11", "not a torchvision ResNet"),
])
def test_not_a_resnet_is_refused(name, match):
    with pytest.raises(LocoError, match=match):
        state, _, _ = conv.extract_encoder(meta_state(name), "ckpt")
        conv.infer_resnet(state, "ckpt")


def test_incomplete_resnet_and_arch_mismatch():
    state = {k: v for k, v in meta_state(50).items() if not k.startswith("fc.")}
    del state["layer3.2.bn2.running_var"]
    with pytest.raises(LocoError, match=r"ResNet-50 weight layer3.2.bn2.running_var is missing"):
        conv.infer_resnet(state, "ckpt")
    state = {k: v for k, v in meta_state(18).items() if not k.startswith("fc.")}
    with pytest.raises(LocoError, match="says arch 'resnet50'"):
        conv.infer_resnet(state, "ckpt", arch_hint="resnet50")


def _run_cli(*args):
    proc = subprocess.run([sys.executable, CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_help_and_bad_inputs(tmp_path):
    """Corrupt / truncated / missing input: one `error:` line naming the file, exit 1, no output
    file, and an existing output is left intact. (One subprocess: the real exit code and stderr.)"""
    good = tmp_path / "good.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, good)  # valid file, not a ResNet
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(raw[: len(raw) // 2])
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all" * 10)
    existing = tmp_path / "existing.pkl"
    existing.write_bytes(b"previous conversion")
    cases = [[str(truncated), str(tmp_path / "a.pkl")],
             [str(corrupt), str(tmp_path / "b.pkl")],
             [str(tmp_path / "missing.pth"), str(tmp_path / "c.pkl")],
             [str(good), str(existing)],
             [str(good), str(tmp_path / "d.pth")]]
    # One process (imports are slow here): the first case writes to the real stderr and gives
    # the exit code; the others report through stdout.
    script = (
        f"import sys; sys.path.insert(0, {os.path.dirname(CLI)!r}); import convert_to_detectron2 as c\n"
        "import contextlib, io\n"
        f"cases = {cases!r}\n"
        "first = c.main(cases[0])\n"
        "for args in cases[1:]:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err): rc = c.main(args)\n"
        "    print(rc, repr(err.getvalue()))\n"
        "sys.exit(first)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "truncated.pth" in proc.stderr and "truncated" in proc.stderr.split("truncated.pth")[1]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4, proc.stdout
    for line, name in zip(lines, ["corrupt.pth", "missing.pth", "good.pth", "d.pth"]):
        rc, err = line.split(" ", 1)
        err = eval(err)
        assert rc == "1" and err.startswith("error: ") and err.count("\n") == 1, line
        assert name in err, line
    assert "not found" in lines[1] and "not a torchvision ResNet" in lines[2]
    assert "must end in .pkl" in lines[3]
    for name in "abc":
        assert not (tmp_path / f"{name}.pkl").exists()
    assert not (tmp_path / "d.pth").exists()
    assert existing.read_bytes() == b"previous conversion"
    assert not glob.glob(str(tmp_path / ".tmp_*"))


def test_cli_help_has_examples():
    rc, out, _ = _run_cli("--help")
    assert rc == 0 and "examples:" in out and "--verify" in out and "--prefix" in out


def test_failed_verify_leaves_existing_output(tmp_path, monkeypatch):
    model = randomised_resnet(18, seed=2)
    src, out = tmp_path / "r18.pth", tmp_path / "out.pkl"
    torch.save(model.state_dict(), src)
    out.write_bytes(b"previous")
    monkeypatch.setattr(conv, "stage_errors", lambda *a: {"res2": 1.0, "res3": 0, "res4": 0, "res5": 0})
    with pytest.raises(LocoError, match="verification failed"):
        conv.convert(src, out, verify=True, verify_image_size=32)
    assert out.read_bytes() == b"previous"
    assert not glob.glob(str(tmp_path / ".tmp_*"))


def test_features_through_real_config(r50):
    """Features through the real configs: converted R50 weights loaded through
    det_configs/coco_R50_FPN_1x_frozen.yaml; Detectron2's own preprocessing of an RGB uint8 image
    followed by the bottom-up backbone equals torchvision's ResNet on the same image normalised
    the torchvision way, at res2..res5."""
    from detectron2.modeling import build_model

    from loco_det.detection.checkpoint import (LocoCheckpointer, check_weights_metadata,
                                               read_weights_metadata)
    from loco_det.detection.config import apply_single_process_norm, setup_cfg

    config = os.path.join(REPO, "det_configs", "coco_R50_FPN_1x_frozen.yaml")
    cfg = setup_cfg(config, ["MODEL.WEIGHTS", str(r50["pkl"]), "MODEL.DEVICE", "cpu"])
    apply_single_process_norm(cfg, 1)
    check_weights_metadata(cfg, read_weights_metadata(cfg.MODEL.WEIGHTS))
    model = build_model(cfg).eval()
    LocoCheckpointer(model, allow_missing_backbone=False).load(cfg.MODEL.WEIGHTS)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)  # H, W, RGB
    with torch.no_grad():
        chw = torch.as_tensor(image.transpose(2, 0, 1).astype("float32"))
        images = model.preprocess_image([{"image": chw, "height": 96, "width": 128}])
        ours = model.backbone.bottom_up(images.tensor)
        tv_input = torchvision.transforms.functional.normalize(
            torch.as_tensor(image).permute(2, 0, 1).float().div(255.0),
            mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]).unsqueeze(0)
    errors = conv.stage_errors(ours, r50["model"], tv_input)
    print("real-config feature errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert set(errors) == {"res2", "res3", "res4", "res5"}
    assert max(errors.values()) <= 1e-4, errors
