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
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import loco_det.detection.compat  # noqa: F401  (before detectron2)
from loco_det.weights import convert as conv
from loco_det.weights import verify as ver
from loco_det.weights.safe_load import load_pkl as safe_load_pkl
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
    """--verify: Detectron2's ResNet-50 (its own builder, the conventions of
    docs/benchmarks.md) gives
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
    err = ver.verify(out, image_size=64)  # torchvision weights rebuilt from the .pkl alone
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
        ver.verify(bad, model.state_dict(), image_size=64)


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
    obj = {f"net_a.{k}": v for k, v in state.items()}
    obj.update({f"net_b.{k}": v for k, v in state.items()})
    with pytest.raises(LocoError, match=r"2 candidate encoders: 'net_a.' \(120 tensors\), 'net_b.' "
                                        r"\(120 tensors\); choose one with --take net_a or --take net_b"):
        conv.extract_encoder(obj, "ckpt")
    with pytest.raises(LocoError, match="prefix 'nope.'"):
        conv.extract_encoder(obj, "ckpt", "nope.")
    found, dropped, info = conv.extract_encoder(obj, "ckpt", "net_b.")
    assert info["prefix"] == "net_b." and "layer4.1.conv2.weight" in found
    assert "net_a.* (another ResNet, 120 tensors)" in dropped
    assert conv.extract_encoder(obj, "ckpt", take="net_a")[2]["prefix"] == "net_a."


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
    nan = tmp_path / "nan.pth"
    state = randomised_resnet(18).state_dict()
    state["bn1.weight"] = torch.full_like(state["bn1.weight"], float("nan"))
    torch.save(state, nan)
    cases = [[str(truncated), str(tmp_path / "a.pkl")],
             [str(corrupt), str(tmp_path / "b.pkl")],
             [str(tmp_path / "missing.pth"), str(tmp_path / "c.pkl")],
             [str(good), str(existing)],
             [str(good), str(tmp_path / "d.pth")],
             [str(nan), str(existing), "--verify"]]
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
    assert len(lines) == 5, proc.stdout
    for line, name in zip(lines, ["corrupt.pth", "missing.pth", "good.pth", "d.pth", "nan.pth"]):
        rc, err = line.split(" ", 1)
        err = eval(err)
        assert rc == "1" and err.startswith("error: ") and err.count("\n") == 1, line
        assert name in err, line
    assert "not found" in lines[1] and "not a torchvision ResNet" in lines[2]
    assert "must end in .pkl" in lines[3]
    assert "non-finite (NaN/Inf) values in 1 encoder tensor: bn1.weight (64 of 64)" in lines[4]
    for name in "abc":
        assert not (tmp_path / f"{name}.pkl").exists()
    assert not (tmp_path / "d.pth").exists()
    assert existing.read_bytes() == b"previous conversion"
    assert not glob.glob(str(tmp_path / ".tmp_*"))


def test_cli_help_has_examples():
    rc, out, _ = _run_cli("--help")
    assert rc == 0 and "examples:" in out and "--verify" in out and "--prefix" in out


def test_conversion_is_byte_identical_when_repeated(tmp_path):
    """Same input -> same bytes (what a resumed or repeated conversion must give)."""
    src = tmp_path / "r18.pth"
    torch.save(randomised_resnet(18, seed=5).state_dict(), src)
    conv.convert(src, tmp_path / "a.pkl")
    conv.convert(src, tmp_path / "b.pkl")
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()


def test_overflowing_weights_are_not_blamed_on_the_conversion(tmp_path):
    state = randomised_resnet(18, seed=6).state_dict()
    state["layer3.0.conv1.weight"] = torch.full_like(state["layer3.0.conv1.weight"], 3e38)
    src = tmp_path / "huge.pth"
    torch.save(state, src)
    with pytest.raises(LocoError, match="torchvision's own ResNet gives non-finite layer3 features"):
        conv.convert(src, tmp_path / "o.pkl", verify=True, verify_image_size=64)
    assert not (tmp_path / "o.pkl").exists()


def test_failed_verify_leaves_existing_output(tmp_path, monkeypatch):
    model = randomised_resnet(18, seed=2)
    src, out = tmp_path / "r18.pth", tmp_path / "out.pkl"
    torch.save(model.state_dict(), src)
    out.write_bytes(b"previous")
    monkeypatch.setattr(ver, "stage_errors", lambda *a: {"res2": 1.0, "res3": 0, "res4": 0, "res5": 0})
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
    errors = ver.stage_errors(ours, r50["model"], tv_input)
    print("real-config feature errors:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert set(errors) == {"res2", "res3", "res4", "res5"}
    assert max(errors.values()) <= 1e-4, errors


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts of other libraries. Each fixture is built from the library's documented
# layout (where its encoder sits, what else the file holds); objects of classes that the
# converter must not import are pickled through `foreign_class`, so loading them cannot import
# anything. Two encoders with different weights are always told apart by the values converted.


@contextlib.contextmanager
def foreign_module(name):
    """A module that exists only while a fixture is being pickled (it cannot be imported later)."""
    import types

    parts = name.split(".")
    created = [".".join(parts[:i]) for i in range(1, len(parts) + 1)
               if ".".join(parts[:i]) not in sys.modules]
    for full in created:
        sys.modules[full] = types.ModuleType(full)
    try:
        yield sys.modules[name]
    finally:
        for full in created:
            del sys.modules[full]


def save_with_foreign(obj_factory, path, classes):
    """torch.save `obj_factory(made)` where `made[qualname]` are classes living in throw-away
    modules named after the real libraries' (argparse is real and importable: used as is)."""
    made = {}
    with contextlib.ExitStack() as stack:
        for full, base in classes.items():
            mod_name, cls_name = full.rsplit(".", 1)
            module = sys.modules.get(mod_name) or stack.enter_context(foreign_module(mod_name))
            cls = type(cls_name, (base,), {"__module__": mod_name})
            setattr(module, cls_name, cls)
            made[cls_name] = cls
        torch.save(obj_factory(made), path)


def prefixed(state, prefix, drop_fc=False):
    return {f"{prefix}{k}": v for k, v in state.items() if not (drop_fc and k.startswith("fc."))}


def _heads(prefix, *names):
    return {f"{prefix}{n}": torch.randn(8, 4) for n in names}


def _lightning(state_dict, hparams):
    return {"epoch": 9, "global_step": 900, "pytorch-lightning_version": "2.4.0",
            "state_dict": state_dict, "loops": {"fit_loop": {"state_dict": {}}},
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": torch.tensor(0.5)}},
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": []}],
            "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": hparams}


def build_layout(name, sd, other, path):
    """Write checkpoint `name` holding ResNet state `sd` (the one to convert) and, where the layout
    has a second encoder, `other`; returns (extra convert kwargs, expected layout substring)."""
    import argparse

    if name == "torchvision":
        torch.save(sd, path)
        return {}, "plain state dict"
    if name == "timm":
        import timm

        model = timm.create_model("resnet18")
        model.load_state_dict(sd)
        torch.save(model.state_dict(), path)
        return {}, "plain state dict"
    if name == "timm-safetensors":
        import timm
        from safetensors.torch import save_file

        model = timm.create_model("resnet18")
        model.load_state_dict(sd)
        save_file(model.state_dict(), str(path))
        return {}, "plain state dict"
    if name == "timm-train":  # timm's CheckpointSaver: args Namespace, EMA copy
        torch.save({"epoch": 5, "arch": "resnet", "state_dict": sd, "version": 2,
                    "optimizer": {"state": {}, "param_groups": []}, "metric": 12.5,
                    "args": argparse.Namespace(model="resnet18", lr=0.1),
                    "state_dict_ema": other}, path)
        return {"take": "state_dict"}, "timm training checkpoint"
    if name == "lightning":
        save_with_foreign(lambda c: _lightning(
            {**prefixed(sd, "model."), **_heads("head.", "weight")},
            c["AttributeDict"](lr=0.1, arch="resnet18")), path,
            {"lightning.fabric.utilities.data.AttributeDict": dict})
        return {}, "PyTorch Lightning"
    if name == "solo-learn":
        state_dict = {**prefixed(sd, "backbone.", drop_fc=True),
                      **prefixed(other, "momentum_backbone.", drop_fc=True),
                      **_heads("projector.", "0.weight", "3.weight"),
                      **_heads("momentum_projector.", "0.weight"),
                      **_heads("classifier.", "weight", "bias")}
        hparams = {"cfg": {"method": "byol", "backbone": {"name": "resnet18"}}}
        torch.save(_lightning(state_dict, hparams), path)
        return {}, "solo-learn"
    if name == "mmselfsup":
        def make(c):
            return {"meta": {"mmengine_version": "0.10.4", "epoch": 200, "iter": 1000,
                             "cfg": "model = dict(type='MoCo')", "seed": 0},
                    "state_dict": {**prefixed(sd, "backbone.", drop_fc=True),
                                   **prefixed(other, "momentum_encoder.module.0.", drop_fc=True),
                                   **_heads("neck.mlp.", "0.weight", "2.weight"),
                                   "data_preprocessor.mean": torch.zeros(3, 1, 1)},
                    "message_hub": {"log_scalars": {"train/loss": c["HistoryBuffer"]()},
                                    "runtime_info": {"epoch": 200}},
                    "optimizer": {"state": {}, "param_groups": []}}
        save_with_foreign(make, path, {"mmengine.logging.history_buffer.HistoryBuffer": object})
        return {}, "MMPretrain / mmselfsup"
    if name == "vissl":
        trunk = prefixed(sd, "_feature_blocks.", drop_fc=True)
        torch.save({"phase_idx": 4, "iteration_num": 500, "type": "checkpoint", "loss": {},
                    "classy_state_dict": {
                        "train": True, "optimizer": {"state": {}, "param_groups": []},
                        "base_model": {"model": {"trunk": trunk,
                                                 "heads": _heads("0.clf.0.", "weight", "bias")},
                                       "meta": {}},
                        "loss": {}, "train_phase_idx": 4}}, path)
        return {}, "VISSL"
    if name == "moco-v2":
        state_dict = {**prefixed(prefixed(sd, "", drop_fc=True), "module.encoder_q."),
                      **_heads("module.encoder_q.fc.", "0.weight", "0.bias", "2.weight", "2.bias"),
                      **prefixed(prefixed(other, "", drop_fc=True), "module.encoder_k."),
                      "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1)}
        torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state_dict,
                    "optimizer": {"state": {}, "param_groups": []}}, path)
        return {}, "MoCo v1/v2"
    if name == "moco-v3":
        state_dict = {**prefixed(sd, "module.base_encoder.", drop_fc=True),
                      **_heads("module.base_encoder.fc.", "0.weight", "1.running_mean"),
                      **prefixed(other, "module.momentum_encoder.", drop_fc=True),
                      **_heads("module.predictor.", "0.weight")}
        torch.save({"epoch": 100, "arch": "resnet18", "state_dict": state_dict,
                    "optimizer": {"state": {}, "param_groups": []}, "scaler": {"scale": 1024.0}}, path)
        return {}, "MoCo v3"
    if name in ("dino-teacher", "dino-student", "ibot"):
        wrap = "backbone." if name == "ibot" else "module.backbone."
        head = "head." if name == "ibot" else "module.head."
        teacher, student = (other, sd) if name == "dino-student" else (sd, other)
        torch.save({"student": {**prefixed(student, wrap, drop_fc=True),
                                **_heads(head, "mlp.0.weight", "last_layer.weight_g")},
                    "teacher": {**prefixed(teacher, wrap, drop_fc=True),
                                **_heads(head, "mlp.0.weight", "last_layer.weight_g")},
                    "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
                    "args": argparse.Namespace(arch="resnet18", out_dim=4),
                    "dino_loss": {"center": torch.zeros(1, 4)}}, path)
        return ({"take": "student"} if name == "dino-student" else {}), "DINO / iBOT"
    if name == "swav":
        torch.save({"epoch": 800, "state_dict": {**prefixed(sd, "module.", drop_fc=True),
                                                 **_heads("module.projection_head.", "0.weight"),
                                                 **_heads("module.prototypes.", "weight")},
                    "optimizer": {"state": {}, "param_groups": []}, "amp": {}}, path)
        return {}, "module."
    if name == "byol":
        torch.save({**prefixed(sd, "module.", drop_fc=True),
                    **_heads("module.projector.", "net.0.weight")}, path)
        return {}, "module."
    if name == "loco_det":
        torch.save({"encoder": sd, "decoders": [{"weight": torch.zeros(4, 64)}], "method": "loco",
                    "arch": "resnet18", "config": "method: loco\n", "epoch": 1, "step": 2}, path)
        return {}, "loco_det pretraining checkpoint"
    # Further variants that are not any one library's layout.
    if name == "torch-compile-ddp":
        torch.save({"model": prefixed(sd, "module._orig_mod.")}, path)
        return {}, "wrapped state dict"
    if name == "sequential-children":  # nn.Sequential(*list(resnet.children())[:-2])
        names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
        seq = {}
        for k, v in sd.items():
            head, rest = k.split(".", 1)
            if head in names:
                seq[f"encoder.{names[head]}.{rest}"] = v
        torch.save({**seq, **_heads("projector.", "0.weight")}, path)
        return {}, "wrapped state dict"
    if name == "byol-online-target":
        torch.save({**prefixed(sd, "online_network.encoder."),
                    **prefixed(other, "target_network.encoder.")}, path)
        return {}, "wrapped state dict"
    if name == "pickled-module":
        model = torchvision.models.resnet18()
        model.load_state_dict(sd)
        torch.save(model, path)
        return {}, "pickled model object"
    if name == "mmselfsup-0.x":  # mmcv era: encoder_q = Sequential(backbone, neck), saved twice
        shared = prefixed(sd, "", drop_fc=True)
        torch.save({"meta": {"mmcv_version": "1.3.8", "epoch": 200},
                    "state_dict": {**prefixed(shared, "backbone."), **prefixed(shared, "encoder_q.0."),
                                   **prefixed(prefixed(other, "", drop_fc=True), "encoder_k.0."),
                                   **_heads("encoder_q.1.mlp.", "0.weight"), "queue": torch.zeros(4, 8)},
                    "optimizer": {"state": {}, "param_groups": []}}, path)
        return {}, "MMPretrain / mmselfsup"
    if name == "legacy-serialization":  # torch < 1.6 files (the original MoCo releases)
        state_dict = {**prefixed(prefixed(sd, "", drop_fc=True), "module.encoder_q."),
                      **prefixed(prefixed(other, "", drop_fc=True), "module.encoder_k."),
                      "module.queue": torch.randn(128, 64)}
        torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state_dict,
                    "args": argparse.Namespace(arch="resnet18")}, path,
                   _use_new_zipfile_serialization=False)
        return {}, "MoCo v1/v2"
    if name == "half-precision":
        torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}, path)
        return {}, "plain state dict"
    raise AssertionError(name)


LAYOUTS = ["torchvision", "timm", "timm-safetensors", "timm-train", "lightning", "solo-learn",
           "mmselfsup", "mmselfsup-0.x", "vissl", "moco-v2", "moco-v3", "dino-teacher",
           "dino-student", "ibot", "swav", "byol", "loco_det",
           # further variants, not one library's layout
           "torch-compile-ddp", "sequential-children", "byol-online-target", "pickled-module",
           "legacy-serialization", "half-precision"]


@pytest.fixture(scope="module")
def two_resnets():
    return randomised_resnet(18, seed=11).state_dict(), randomised_resnet(18, seed=12).state_dict()


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_converts_and_verifies(name, two_resnets, tmp_path):
    """Each layout: recognised (reported layout), the right encoder taken (its values, not the
    other encoder's), Detectron2's ResNet-18 features equal torchvision's (--verify <= 1e-4)."""
    sd, other = two_resnets
    src = tmp_path / ("ckpt.safetensors" if "safetensors" in name else "ckpt.pth")
    kwargs, layout = build_layout(name, sd, other, src)
    out = tmp_path / "out.pkl"
    result = conv.convert(src, out, verify=True, verify_image_size=64, **kwargs)
    assert layout in result.layout, result.layout
    assert result.verify_error is not None and result.verify_error <= 1e-4
    data = safe_load_pkl(out)
    assert data["loco_det"]["layout"] == result.layout and data["loco_det"]["depth"] == 18
    expected = conv.convert_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")})
    if name == "half-precision":
        expected = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in expected.items()}
    assert set(data["model"]) == set(expected)
    for key, array in expected.items():
        np.testing.assert_array_equal(data["model"][key], array, err_msg=key)
    assert not any(".fc." in k or k.startswith("fc") for k in data["model"])
    print(f"{name}: {result.layout}, encoder {result.prefix!r}, verify {result.verify_error:.2e}")


@pytest.mark.parametrize("name", ["vissl", "dino-teacher"])
def test_layout_r50(name, r50, tmp_path):
    """The same for ResNet-50 (bottleneck blocks, stride in the 3x3 conv) in two nested layouts."""
    sd = r50["model"].state_dict()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    src = tmp_path / "ckpt.pth"
    kwargs, layout = build_layout(name, sd, other, src)
    result = conv.convert(src, tmp_path / "o.pkl", verify=True, verify_image_size=64, **kwargs)
    assert layout in result.layout and result.depth == 50 and result.verify_error <= 1e-4
    data = safe_load_pkl(tmp_path / "o.pkl")["model"]
    np.testing.assert_array_equal(data["res5.2.conv3.norm.running_var"],
                                  sd["layer4.2.bn3.running_var"].numpy())
    print(f"R50 {name}: verify {result.verify_error:.2e} {result.stage_errors}")


def test_lightning_hparams_never_imported(two_resnets, tmp_path):
    """The file names classes (Lightning's AttributeDict) that do not exist here: torch's
    weights-only load refuses, the placeholder load reads the weights without importing them."""
    sd, _ = two_resnets
    src = tmp_path / "l.ckpt"
    build_layout("lightning", sd, None, src)
    with pytest.raises(LocoError, match="weights_only"):
        from loco_det.weights.safe_load import torch_load_weights

        torch_load_weights(src)
    obj, placeholders = conv.load_checkpoint(str(src))
    assert placeholders == ["lightning.fabric.utilities.data.AttributeDict"]
    assert "lightning" not in sys.modules and "lightning.fabric.utilities.data" not in sys.modules
    assert torch.equal(obj["state_dict"]["model.conv1.weight"], sd["conv1.weight"])


def test_dino_teacher_by_default_student_on_request(two_resnets, tmp_path):
    sd, other = two_resnets
    src = tmp_path / "dino.pth"
    build_layout("dino-teacher", sd, other, src)
    obj, _ = conv.load_checkpoint(str(src))
    state, dropped, info = conv.extract_encoder(obj, "dino")
    assert info["prefix"] == "teacher.module.backbone."
    assert torch.equal(state["conv1.weight"], sd["conv1.weight"])
    assert "student.module.backbone.* (another ResNet, 120 tensors)" in dropped
    assert "args" not in " ".join(dropped)  # the Namespace holds no tensors
    state, _, info = conv.extract_encoder(obj, "dino", take="student")
    assert info["prefix"] == "student.module.backbone."
    assert torch.equal(state["conv1.weight"], other["conv1.weight"])


def test_timm_ema_is_ambiguous_without_take(two_resnets, tmp_path):
    sd, other = two_resnets
    src = tmp_path / "timm.pth"
    build_layout("timm-train", sd, other, src)
    with pytest.raises(LocoError, match=r"2 candidate encoders: 'state_dict.' \(120 tensors\), "
                                        r"'state_dict_ema.' \(120 tensors\); choose one with "
                                        r"--take state_dict or --take state_dict_ema"):
        conv.convert(src, tmp_path / "o.pkl")
    result = conv.convert(src, tmp_path / "o.pkl", take="state_dict_ema")
    assert result.prefix == "state_dict_ema."
    np.testing.assert_array_equal(safe_load_pkl(tmp_path / "o.pkl")["model"]["stem.conv1.weight"],
                                  other["conv1.weight"].numpy())


# ---------------------------------------------------------------------------------------------
# Bad inputs: one `error:` line naming the file or key, exit 1, no traceback, every file that
# existed before byte-identical afterwards, no temporary file left.


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _HostileEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def _bad_case(name, root, sd):
    """Create the inputs of case `name` under root; return (argv, regex of the error line)."""
    good = root / "good.pth"
    out = root / "existing.pkl"
    if name == "missing input":
        return [root / "nope.pth", out], r"input checkpoint not found: .*nope\.pth"
    if name == "input is a directory":
        (root / "adir").mkdir()
        return [root / "adir", out], r"directory, not a file: .*adir"
    if name == "empty input":
        (root / "empty.pth").write_bytes(b"")
        return [root / "empty.pth", out], r"empty.*empty\.pth|empty\.pth.*empty"
    if name == "truncated input":
        raw = good.read_bytes()
        (root / "trunc.pth").write_bytes(raw[: len(raw) // 3])
        return [root / "trunc.pth", out], r"trunc\.pth.*(truncated|corrupt)"
    if name == "corrupt input":
        (root / "junk.pth").write_bytes(b"\x80\x04junk" * 50)
        return [root / "junk.pth", out], r"junk\.pth.*corrupt"
    if name == "not a resnet":
        torch.save(meta_free_state("squeezenet1_0"), root / "sq.pth")
        return [root / "sq.pth", out], r"sq\.pth is not a torchvision ResNet checkpoint.*--prefix"
    if name == "resnext":
        torch.save(meta_free_state("resnext50_32x4d"), root / "rx.pth")
        return [root / "rx.pth", out], r"rx\.pth: layer1\.0\.conv1\.weight has shape .*grouped or wide"
    if name == "deep stem":
        import timm

        torch.save(timm.create_model("resnet18d").state_dict(), root / "r18d.pth")
        return [root / "r18d.pth", out], r"r18d\.pth: the encoder has a deep stem"
    if name == "cifar stem":
        bad = dict(sd)
        bad["conv1.weight"] = torch.zeros(64, 3, 3, 3)
        torch.save(bad, root / "cifar.pth")
        return [root / "cifar.pth", out], r"cifar\.pth: conv1\.weight has shape \(64, 3, 3, 3\)"
    if name == "arch says otherwise":
        torch.save({"state_dict": sd, "arch": "resnet50"}, root / "arch.pth")
        return [root / "arch.pth", out], r"arch\.pth: checkpoint says arch 'resnet50'"
    if name == "not a dict":
        torch.save([sd], root / "list.pth")
        return [root / "list.pth", out], r"list\.pth holds a list"
    if name == "output not pkl":
        return [good, root / "out.pth"], r"out\.pth must end in \.pkl"
    if name == "output is input":
        return [out, out], r"existing\.pkl is the input file"
    if name == "output is a directory":
        (root / "d.pkl").mkdir()
        return [good, root / "d.pkl"], r"d\.pkl is a directory"
    if name == "output parent is a file":
        return [good, good / "x.pkl"], r"cannot write .*good\.pth/x\.pkl: .*good\.pth is not a directory"
    if name == "already converted":
        (root / "conv.pkl").write_bytes(out.read_bytes())
        return [root / "conv.pkl", out], (r"conv\.pkl is already in Detectron2's weights format "
                                          r"\(converted by loco_det from .*good\.pth, resnet18\)")
    if name == "detectron2 model_final":
        torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(1),
                              "backbone.bottom_up.res2.0.conv1.weight": torch.zeros(1)},
                    "iteration": 10}, root / "model_final.pth")
        return [root / "model_final.pth", out], r"model_final\.pth already has Detectron2's names"
    if name in ("nan weights", "inf weights --verify"):
        bad = dict(sd)
        bad["layer2.0.bn1.running_var"] = sd["layer2.0.bn1.running_var"].clone()
        bad["layer2.0.bn1.running_var"][:3] = float("nan") if name == "nan weights" else float("inf")
        bad["layer4.1.conv2.weight"] = sd["layer4.1.conv2.weight"].clone()
        bad["layer4.1.conv2.weight"][0, 0, 0, 0] = float("nan")
        torch.save({"state_dict": bad}, root / "nan.pth")
        argv = [root / "nan.pth", out] + (["--verify"] if "verify" in name else [])
        return argv, (r"nan\.pth: non-finite \(NaN/Inf\) values in 2 encoder tensors: "
                      r"layer2\.0\.bn1\.running_var \(3 of 128\), layer4\.1\.conv2\.weight \(1 of 2359296\)")
    if name == "two unrelated encoders":
        shifted = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
        torch.save({**prefixed(sd, "net_a."), **prefixed(shifted, "net_b.")}, root / "two.pth")
        return [root / "two.pth", out], r"two\.pth holds 2 candidate encoders: .*--take net_a or --take net_b"
    if name == "--take names nothing":
        torch.save({"teacher": sd, "student": sd}, root / "ts.pth")
        return [root / "ts.pth", out, "--take ema"], (r"--take ema: none of the encoders in .*ts\.pth "
                                                      r".*--take student or --take teacher")
    if name == "--prefix names nothing":
        return [good, out, "--prefix", "nope."], r"no key in .*good\.pth starts with prefix 'nope\.'"
    if name == "--prefix incomplete resnet":
        torch.save({**prefixed(sd, "a."), "b.layer1.0.conv1.weight": torch.zeros(1)}, root / "p.pth")
        return [root / "p.pth", out, "--prefix", "b."], r"p\.pth is not a complete ResNet: no weights for layer2"
    if name == "--take with --prefix":
        return [good, out, "--take teacher", "--prefix", "x."], r"either --take or --prefix, not both"
    if name == "hostile pickle (os.system)":
        torch.save({"state_dict": sd, "x": _Hostile(root / "PWNED")}, root / "evil.pth")
        return [root / "evil.pth", out], r"refusing to load .*evil\.pth: it asks to import posix\.system"
    if name == "hostile pickle (eval)":
        torch.save({"state_dict": sd, "x": _HostileEval()}, root / "evil2.pth")
        return [root / "evil2.pth", out], (r"refusing to load .*evil2\.pth: it asks to import "
                                           r"__builtin__\.eval")
    if name == "torchscript archive":
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(root / "ts.pt"))
        return [root / "ts.pt", out], r"ts\.pt is a TorchScript archive .*state_dict\(\)"
    if name == "caffe2 blobs pickle":
        with open(root / "R-50.pkl", "wb") as f:
            pickle.dump({"blobs": {"conv1_w": np.zeros((64, 3, 7, 7), np.float32)}}, f, protocol=2)
        return [root / "R-50.pkl", out], r"R-50\.pkl is already in Detectron2's weights format"
    if name == "corrupt safetensors":
        (root / "bad.safetensors").write_bytes((40).to_bytes(8, "little") + b"{" + b"x" * 20)
        return [root / "bad.safetensors", out], r"bad\.safetensors: corrupt safetensors file"
    raise AssertionError(name)


def meta_free_state(name):
    """A real (zero-filled, cheap) state dict of torchvision model `name`."""
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in meta_state(name).items()}


BAD_CASES = ["missing input", "input is a directory", "empty input", "truncated input",
             "corrupt input", "not a resnet", "resnext", "deep stem", "cifar stem",
             "arch says otherwise", "not a dict", "output not pkl", "output is input",
             "output is a directory", "output parent is a file", "already converted",
             "detectron2 model_final", "nan weights", "inf weights --verify",
             "two unrelated encoders", "--take names nothing", "--prefix names nothing",
             "--prefix incomplete resnet", "--take with --prefix", "hostile pickle (os.system)",
             "hostile pickle (eval)", "torchscript archive", "caffe2 blobs pickle",
             "corrupt safetensors"]


def _snapshot(root):
    files = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                files[p] = f.read()
    return files


@pytest.fixture(scope="module")
def cli_module():
    sys.path.insert(0, os.path.dirname(CLI))
    try:
        import convert_to_detectron2 as cli
    finally:
        sys.path.pop(0)
    return cli


@pytest.fixture(scope="module")
def good_files(two_resnets, tmp_path_factory):
    """Bytes of a good checkpoint and of its conversion (written into each case's folder)."""
    root = tmp_path_factory.mktemp("good")
    torch.save(two_resnets[0], root / "good.pth")
    conv.convert(root / "good.pth", root / "existing.pkl")
    return (root / "good.pth").read_bytes(), (root / "existing.pkl").read_bytes()


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_table(case, tmp_path, capsys, cli_module, two_resnets, good_files):
    sd = two_resnets[0]
    (tmp_path / "good.pth").write_bytes(good_files[0])
    (tmp_path / "existing.pkl").write_bytes(good_files[1])  # a previous conversion: must survive
    argv, pattern = _bad_case(case, tmp_path, sd)
    argv = [str(a) for a in argv]
    argv = [p for a in argv for p in (a.split(" ") if a.startswith("--take ") else [a])]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    rc = cli_module.main(argv)  # an exception here is a traceback: the test fails
    captured = capsys.readouterr()
    assert rc == 1, captured
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert re.search(pattern, captured.err), (pattern, captured.err)
    assert _snapshot(tmp_path) == before  # nothing written, nothing changed, no temp file
    assert not (tmp_path / "PWNED").exists()



def test_real_lightning_checkpoint(tmp_path):
    """A checkpoint written by PyTorch Lightning itself (Trainer.fit, one step, then
    save_checkpoint) converts with --verify, and the values are the trained backbone's."""
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self, lr=0.01, arch="resnet18"):
            super().__init__()
            self.save_hyperparameters()
            self.backbone = randomised_resnet(18, seed=21)
            self.backbone.fc = torch.nn.Identity()
            self.projector = torch.nn.Linear(512, 16)

        def training_step(self, batch, _):
            return self.projector(self.backbone(batch[0])).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32))
    module = Module()
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    src = tmp_path / "last.ckpt"
    trainer.save_checkpoint(str(src))
    result = conv.convert(src, tmp_path / "pl.pkl", verify=True, verify_image_size=64)
    assert result.layout == "PyTorch Lightning" and result.prefix == "state_dict.backbone."
    assert result.verify_error <= 1e-4
    assert "state_dict.projector.weight" in result.dropped
    trained = module.backbone.state_dict()
    data = safe_load_pkl(tmp_path / "pl.pkl")["model"]
    for key, value in trained.items():
        np.testing.assert_array_equal(data[conv.rename_key(key)], value.numpy(), err_msg=key)
    print(f"Lightning {pl.__version__}: placeholders {result.placeholders}, "
          f"verify {result.verify_error:.2e}")
