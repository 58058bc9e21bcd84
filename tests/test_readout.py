"""Linear readout: runs on the embedded data for a checkpoint and for a random init, writes
readout.json as in docs/formats.md, and fails with one line on bad input."""
import json
import os
import sys

import pytest
import torch

from loco_det.pretrain.config import load_config
from loco_det.pretrain.engine import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import linear_readout  # noqa: E402  (tools/linear_readout.py)

FAST = ["--epochs", "3", "--image-size", "32", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_checkpoint(synth_root, tmp_path_factory):
    """One epoch of e2e on the embedded train split (24 images, batch 8, 32 px)."""
    out = tmp_path_factory.mktemp("readout_pretrain")
    cfg = load_config(None, [f"DATA.ROOT={synth_root / 'imagefolder' / 'train'}", "SEED=0",
                             "MODEL.METHOD=e2e", "MODEL.ARCH=resnet18", "DATA.IMAGE_SIZE=32",
                             "OPTIM.BATCH_SIZE=8", "OPTIM.EPOCHS=1", "OPTIM.WARMUP_EPOCHS=0",
                             "DATA.NUM_WORKERS=0"])
    train(cfg, str(out))
    return out / "checkpoint_last.pth"


def check_readout_json(path, method, train_images, val_images):
    r = json.loads(path.read_text())
    assert r["kind"] == "readout" and r["method"] == method and r["arch"] == "resnet18"
    assert set(r["top1"]) == {"res2", "res3", "res4", "res5"}
    assert all(0.0 <= v <= 100.0 for v in r["top1"].values())
    p = r["protocol"]
    for key in ("epochs", "lr", "batch_size", "train_images", "val_images", "image_size"):
        assert key in p
    assert (p["epochs"], p["image_size"], p["name"]) == (3, 32, "small")
    assert (p["train_images"], p["val_images"]) == (train_images, val_images)
    return r


def test_readout_of_checkpoint_finds_data_next_to_its_train_split(tiny_checkpoint, synth_root,
                                                                  tmp_path, capsys):
    rc = linear_readout.main(["--checkpoint", str(tiny_checkpoint), "--output-dir",
                              str(tmp_path), "--seed", "1", *FAST])
    out = capsys.readouterr().out
    assert rc == 0
    r = check_readout_json(tmp_path / "readout.json", "e2e", 24, 8)
    assert r["checkpoint"] == str(tiny_checkpoint)
    assert r["protocol"]["data_dir"] == str(synth_root / "imagefolder")
    for stage in ("res2", "res3", "res4", "res5"):
        assert f"{stage}  top-1" in out


def test_readout_random_init_is_seeded(synth_root, tmp_path, capsys):
    args = ["--random-init", "--arch", "resnet18", "--data", str(synth_root / "imagefolder"),
            "--seed", "5", *FAST]
    assert linear_readout.main(args + ["--output-dir", str(tmp_path / "a")]) == 0
    assert linear_readout.main(args + ["--output-dir", str(tmp_path / "b")]) == 0
    a = check_readout_json(tmp_path / "a" / "readout.json", "random", 24, 8)
    b = json.loads((tmp_path / "b" / "readout.json").read_text())
    assert a["checkpoint"] is None and a["protocol"]["seed"] == 5
    assert set(a["top1_stderr"]) == set(a["top1"])
    assert a["top1"] == b["top1"]


def test_readout_bad_input_is_one_line(synth_root, tmp_path, capsys):
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pth")], str(tmp_path / "missing.pth")),
        (["--random-init", "--arch", "resnet18", "--data", str(tmp_path)],
         str(tmp_path / "train")),
    ]
    for args, expect in cases:
        rc = linear_readout.main(args + ["--output-dir", str(tmp_path / "o"), *FAST])
        errors = [line for line in capsys.readouterr().err.splitlines()
                  if line.startswith("error:")]
        assert rc == 1 and len(errors) == 1 and expect in errors[0], errors
        assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        linear_readout.main(["--random-init", "--output-dir", str(tmp_path / "o")])


def test_random_init_equals_initial_encoder_of_pretraining_run():
    import torch
    from loco_det.pretrain.engine import seed_everything
    from loco_det.pretrain.model import build_model
    from loco_det.pretrain.readout import load_encoder

    seed_everything(11)
    initial = build_model("loco", "resnet18").encoder.state_dict()
    random_init = load_encoder(None, "resnet18", seed=11)[0].state_dict()
    assert all(torch.equal(initial[k], random_init[k]) for k in initial)


def test_pooled_features_follow_the_encoders_layout():
    """An encoder laid out channels_last (as in CUDA training, or after inference_setup there)
    gets channels_last images and gives the same features as the contiguous one."""
    import torchvision

    from loco_det.pretrain.readout import pooled_features

    torch.manual_seed(0)
    encoder = torchvision.models.resnet18().eval()
    images = torch.randn(2, 3, 64, 64)
    plain = pooled_features(encoder, images)
    encoder.to(memory_format=torch.channels_last)
    seen = []
    encoder.conv1.register_forward_pre_hook(lambda m, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last)))
    for a, b in zip(pooled_features(encoder, images), plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert seen == [True]
