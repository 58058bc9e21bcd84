"""Checkpoints from elsewhere through every benchmark.

The readouts (linear and kNN) take any checkpoint the converter accepts, written here by the
libraries themselves: a torchvision state dict, timm's own CheckpointSaver (with an EMA copy, so
two encoders: --take picks one, no --take is the converter's ambiguity error) and a PyTorch
Lightning Trainer. The encoder they read is the one the converter converts, and both record the
same fingerprint. A grid's `external` entry runs readout, kNN, conversion and detection like a
pretrained row, through its reduced profile, end to end, and the report labels it external.
"""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
import yaml

from loco_det import fingerprint
from loco_det.weights import convert
from loco_det.pretrain.readout import read_checkpoint
from loco_det.utils import LocoError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import knn_readout  # noqa: E402  (tools/knn_readout.py)
import linear_readout  # noqa: E402  (tools/linear_readout.py)

FAST = ["--image-size", "32", "--workers", "0", "--no-progress"]


def _resnet18(seed):
    """A ResNet-18 whose BN statistics are not the defaults, so that a layer read from the wrong
    place (or left at its init) shows in the comparisons."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: (path, options, expected encoder state, layout substring)}."""
    import timm
    import timm.utils

    folder = tmp_path_factory.mktemp("external")
    tv = _resnet18(3)
    torch.save(tv.state_dict(), folder / "r18_torchvision.pth")

    model = timm.create_model("resnet18")
    model.load_state_dict(_resnet18(4).state_dict())
    ema = timm.utils.ModelEmaV3(model)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(0.5)
    saver = timm.utils.CheckpointSaver(
        model, torch.optim.SGD(model.parameters(), lr=0.1),
        args=argparse.Namespace(model="resnet18"), model_ema=ema,
        checkpoint_dir=str(folder / "timm"), recovery_dir=str(folder / "timm"))
    os.makedirs(folder / "timm")
    saver.save_checkpoint(epoch=0, metric=1.0)

    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self, lr=0.01, arch="resnet18"):
            super().__init__()
            self.save_hyperparameters()
            self.backbone = _resnet18(5)
            self.backbone.fc = torch.nn.Identity()
            self.projector = torch.nn.Linear(512, 16)

        def training_step(self, batch, _):
            return self.projector(self.backbone(batch[0])).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    module = Module()
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(folder))
    trainer.fit(module, torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32)), batch_size=2))
    trainer.save_checkpoint(str(folder / "last.ckpt"))

    def state(m):
        return {k: v.detach().clone() for k, v in m.state_dict().items()
                if not k.startswith("fc.")}

    return {
        "torchvision": (folder / "r18_torchvision.pth", [], state(tv), "plain state dict"),
        "timm": (folder / "timm" / "last.pth.tar", ["--take", "state_dict"], state(model),
                 "timm training checkpoint"),
        "timm_ema": (folder / "timm" / "last.pth.tar", ["--take", "state_dict_ema"],
                     state(ema.module), "timm training checkpoint"),
        "lightning": (folder / "last.ckpt", [], state(module.backbone), "PyTorch Lightning"),
    }


def _options(opts):
    return dict(zip([o[2:] for o in opts[::2]], opts[1::2]))


@pytest.mark.parametrize("name", ["torchvision", "timm", "timm_ema", "lightning"])
def test_readouts_take_the_converters_checkpoints(checkpoints, name, synth_root, tmp_path,
                                                  capsys):
    path, opts, expected, layout = checkpoints[name]
    # the encoder read out is the one written, every tensor (fc aside)
    ckpt = read_checkpoint(str(path), **_options(opts))
    assert ckpt["arch"] == "resnet18" and layout in ckpt["source"]["layout"]
    for key, value in expected.items():
        assert torch.equal(ckpt["encoder"][key], value), key
    # both tools write their result file, identified like the converted weights
    data = ["--data", str(synth_root / "imagefolder")]
    out = tmp_path / "ro"
    assert linear_readout.main(["--checkpoint", str(path), *opts, *data, "--epochs", "2",
                                *FAST, "--seed", "0", "--output-dir", str(out)]) == 0
    assert knn_readout.main(["--checkpoint", str(path), *opts, *data, *FAST, "--seed", "0",
                             "--output-dir", str(out)]) == 0
    readout = json.loads((out / "readout.json").read_text())
    knn = json.loads((out / "knn.json").read_text())
    result = convert.convert(path, tmp_path / "w.pkl", **_options(opts))
    weights_fp = fingerprint.weights_fingerprint(result.metadata)
    for r in (readout, knn):
        assert (r["method"], r["arch"]) == ("external", "resnet18")
        assert r["checkpoint_fingerprint"] == weights_fp
        assert r["checkpoint_source"]["prefix"] == result.prefix
    assert weights_fp.startswith("sha256:" + result.metadata["source_sha256"][:16])
    assert set(readout["top1"]) == {"res2", "res3", "res4", "res5"}
    capsys.readouterr()


def test_take_tells_two_encoders_of_one_file_apart(checkpoints, synth_root, tmp_path, capsys):
    """timm's EMA copy: without --take the readouts refuse it with the converter's own message;
    the two encoders of one file get different fingerprints."""
    path = checkpoints["timm"][0]
    with pytest.raises(LocoError) as refused:
        convert.convert(path, tmp_path / "w.pkl")
    assert "--take state_dict or --take state_dict_ema" in str(refused.value)
    data = ["--data", str(synth_root / "imagefolder")]
    for tool in (linear_readout, knn_readout):
        out = tmp_path / tool.__name__
        assert tool.main(["--checkpoint", str(path), *data, *FAST, "--output-dir",
                          str(out)]) == 1
        errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
        assert len(errors) == 1 and str(refused.value) in errors[0], errors
        assert not out.exists()
    a = read_checkpoint(str(path), take="state_dict")["fingerprint"]
    b = read_checkpoint(str(path), take="state_dict_ema")["fingerprint"]
    assert a != b and a.split("@")[0] == b.split("@")[0]
    with pytest.raises(SystemExit):
        linear_readout.main(["--random-init", "--arch", "resnet18", "--take", "teacher",
                             "--output-dir", str(tmp_path / "r")])


def test_prefix_names_the_encoder(checkpoints):
    path, _, expected, _ = checkpoints["lightning"]
    ckpt = read_checkpoint(str(path), prefix="backbone")
    assert ckpt["source"]["prefix"] == "state_dict.backbone."
    assert torch.equal(ckpt["encoder"]["layer4.1.bn2.running_var"],
                       expected["layer4.1.bn2.running_var"])
    with pytest.raises(LocoError, match="no key in .* starts with prefix 'nothing.'"):
        read_checkpoint(str(path), prefix="nothing")


def _grid(checkpoint):
    """An external checkpoint beside the random-init baseline, with a reduced profile."""
    data_cmd = ["python", "tools/make_synthetic_data.py", "--out", "{data}", "--no-progress"]
    return {
        "name": "external",
        "vars": {"datasets": "{out}/datasets", "data": "{datasets}/loco_synth"},
        "env": {"DETECTRON2_DATASETS": "{datasets}"},
        "data": [{"name": "loco_synth", "command": data_cmd, "creates": "{data}/meta.json"}],
        "readout": {"args": ["--data", "{data}/imagefolder", "--seed", "{seed}", "--workers",
                             "0", "--no-progress"], "random_init": {"arch": "resnet18"}},
        "knn": {"args": ["--data", "{data}/imagefolder", "--seed", "{seed}", "--workers", "0",
                         "--no-progress"]},
        "external": [{"label": "r18_timm", "path": str(checkpoint), "take": "state_dict",
                      "layout": "timm"}],
        "detection": {"supervised_weights": None,
                      "configs": [{"config": "cpu_synth_coco_R18_FPN_frozen.yaml",
                                   "seeds": [0]}]},
        "profiles": {"reduced": {
            "data.0.command": data_cmd + ["--num-train", "24", "--num-val", "8", "--size",
                                          "96x128"],
            "readout.args": ["--data", "{data}/imagefolder", "--seed", "{seed}", "--epochs", "3",
                             "--image-size", "32", "--workers", "0", "--no-progress"],
            "knn.args": ["--data", "{data}/imagefolder", "--seed", "{seed}", "--image-size",
                         "32", "--workers", "0", "--no-progress"],
            "detection.overrides": {"SOLVER.MAX_ITER": 2, "SOLVER.STEPS": "(1,)",
                                    "SOLVER.WARMUP_ITERS": 1, "SOLVER.IMS_PER_BATCH": 2,
                                    "SOLVER.CHECKPOINT_PERIOD": 1000,
                                    "INPUT.MIN_SIZE_TRAIN": "(96,)",
                                    "INPUT.MIN_SIZE_TEST": 96}}},
    }


@pytest.mark.slow
def test_grid_runs_an_external_checkpoint_end_to_end(checkpoints, tmp_path):
    path = checkpoints["timm"][0]
    grid = tmp_path / "external.yaml"
    grid.write_text(yaml.safe_dump(_grid(path)))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "tools/run_benchmark.py", str(grid), "--profile",
                          "reduced", "--out", str(out), "-q"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "summary: 9 jobs" in res.stdout and "0 failed" in res.stdout
    ro = out / "readout" / "external" / "r18_timm"
    readout = json.loads((ro / "readout.json").read_text())
    knn = json.loads((ro / "knn.json").read_text())
    det = json.loads((out / "det" / "cpu_synth_coco_R18_FPN_frozen" / "external_r18_timm" /
                      "seed0" / "results.json").read_text())
    # one identity through readout, kNN, conversion and detection: the file and its encoder
    ext_fp = read_checkpoint(str(path), take="state_dict")["fingerprint"]
    assert readout["checkpoint_fingerprint"] == knn["checkpoint_fingerprint"] == ext_fp
    assert det["finished"] is True and det["weights_fingerprint"] == ext_fp
    assert det["method"] == "r18_timm (external)"
    report = (out / "report.md").read_text()
    assert report.count("r18_timm (external)") >= 2   # its readout and its detection rows
    manifest = json.loads((out / "benchmark.json").read_text())
    labels = {j["id"]: j["label"] for j in manifest["jobs"] if j.get("id")}
    assert labels["readout/external/r18_timm"] == "r18_timm (external)"
    assert labels["det/cpu_synth_coco_R18_FPN_frozen/external_r18_timm/seed0"] == \
        "r18_timm (external)"


def test_external_entries_are_checked_before_anything_runs(checkpoints, tmp_path):
    path = checkpoints["timm"][0]
    spec = _grid(path)
    spec["external"] = [{"label": "a", "path": str(path)},                       # ambiguous
                        {"label": "b", "path": str(path), "take": "state_dict",
                         "layout": "lightning"},                                  # wrong layout
                        {"label": "c", "path": str(tmp_path / "missing.pth")}]   # absent
    grid = tmp_path / "bad.yaml"
    grid.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "tools/run_benchmark.py", str(grid), "--dry-run",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert res.returncode == 1 and not out.exists()
    assert any(l.startswith("error: external[0] a:") and "--take state_dict or --take "
               "state_dict_ema" in l for l in errors), errors
    assert any(l.startswith("error: external[1] b:") and "the grid says layout 'lightning'" in l
               for l in errors), errors
    assert any(f"input {tmp_path / 'missing.pth'} does not exist" in l for l in errors), errors
    assert errors[-1].endswith("3 problem(s); nothing was run")
