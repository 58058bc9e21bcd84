"""Run identity (loco_det/fingerprint.py): what changes a fingerprint and what does not, and that
converted weights carry their checkpoint's fingerprint and seed through to Detectron2."""
import os

import torch
import torchvision

from loco_det import fingerprint as fp
from loco_det.pretrain.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(*overrides):
    return load_config(os.path.join(REPO, "pretrain", "cpu_loco.yaml"), list(overrides))


def test_pretrain_fingerprint_ignores_exactly_the_run_only_keys():
    base = fp.pretrain_fingerprint(cfg("SEED=0"))
    for override in ("SEED=5", "DATA.NUM_WORKERS=7", "RUN.LOG_PERIOD=3", "RUN.CHECKPOINT_PERIOD=9",
                     "RUN.CHANNELS_LAST=False", "MODEL.LOCO_SCHEDULE=recompute",
                     "DATA.MAX_BAD_FRACTION=0.5", "RUN.KNN_PERIOD=2", "DATA.PREFETCH_FACTOR=5",
                     "DATA.AUGMENT_DEVICE=cpu"):
        assert fp.pretrain_fingerprint(cfg("SEED=0", override)) == base, override
    for override in ("LOSS.TEMPERATURE=0.5", "MODEL.DECODER.CONV_BLOCKS=1", "OPTIM.BASE_LR=0.1",
                     "DATA.COLOR_JITTER=0.1", "OPTIM.EPOCHS=3", "MODEL.METHOD=gim",
                     "DATA.ROOT=/elsewhere", "RUN.AMP=True", "DATA.AUGMENT_DEVICE=cuda"):
        assert fp.pretrain_fingerprint(cfg("SEED=0", override)) != base, override
    # the checkpoint's YAML string gives the same fingerprint as the live config
    c = cfg("SEED=0")
    assert fp.pretrain_fingerprint(c.dump()) == fp.pretrain_fingerprint(c) == base
    assert set(fp.PRETRAIN_RUN_ONLY) <= set(fp.flatten(fp.plain(c)))   # no stale names


def test_detection_fingerprint_generalises_the_split_and_ignores_run_only_keys():
    from loco_det.detection.config import setup_cfg

    path = os.path.join(REPO, "det_configs", "coco10k_R50_FPN_finetune.yaml")
    a = setup_cfg(path, ["DATASETS.TRAIN", "('coco_2017_train_10k_seed1',)", "SEED", "1",
                         "OUTPUT_DIR", "/a"])
    b = setup_cfg(path, ["DATASETS.TRAIN", "('coco_2017_train_10k_seed4',)", "SEED", "4",
                         "OUTPUT_DIR", "/b", "DATALOADER.NUM_WORKERS", "1",
                         "LOCO_DET.LABEL", "other"])
    c = setup_cfg(path, ["SOLVER.BASE_LR", "0.05"])
    assert fp.detection_fingerprint(a, "w1") == fp.detection_fingerprint(b, "w1")
    assert fp.detection_fingerprint(a, "w1") != fp.detection_fingerprint(a, "w2")
    assert fp.detection_fingerprint(a, "w1") != fp.detection_fingerprint(c, "w1")
    names = set(fp.flatten(fp.plain(a)))
    assert set(fp.DETECTION_RUN_ONLY) <= names   # every listed run-only key exists


def test_changed_keys_names_both_values():
    old = fp.pretrain_identity(cfg("SEED=0"))
    new = fp.pretrain_identity(cfg("SEED=1", "LOSS.TEMPERATURE=0.3", "RUN.LOG_PERIOD=1"))
    assert fp.changed_keys(old, new, fp.PRETRAIN_RUN_ONLY) == [("LOSS.TEMPERATURE", 0.2, 0.3)]


def test_converted_weights_carry_the_checkpoint_fingerprint_and_seed(tmp_path):
    from loco_det.weights import convert
    from loco_det.detection.checkpoint import read_weights_metadata

    c = cfg("SEED=3", "MODEL.ARCH=resnet18")
    ckpt = {"format": 1, "encoder": torchvision.models.resnet18().state_dict(), "decoders": {},
            "config": c.dump(), "fingerprint": fp.pretrain_fingerprint(c), "method": "loco",
            "arch": "resnet18"}
    torch.save(ckpt, tmp_path / "checkpoint_last.pth")
    convert.convert(tmp_path / "checkpoint_last.pth", tmp_path / "w.pkl")
    meta = read_weights_metadata(str(tmp_path / "w.pkl"))
    assert meta["fingerprint"] == fp.pretrain_fingerprint(c) and meta["seed"] == 3
    assert fp.weights_fingerprint(meta) == fp.pretrain_fingerprint(c)
    # torchvision weights (published): no fingerprint; identified by the source's sha256
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    convert.convert(tmp_path / "tv.pth", tmp_path / "tv.pkl")
    meta = read_weights_metadata(str(tmp_path / "tv.pkl"))
    assert meta["fingerprint"] is None and meta["seed"] is None
    assert fp.weights_fingerprint(meta) == "sha256:" + meta["source_sha256"][:16]
    assert fp.weights_fingerprint(None, from_scratch=True) == fp.RANDOM_INIT


def test_new_data_keys_keep_recorded_runs_fingerprints():
    """DATA.AUGMENT_DEVICE at "cpu" and DATA.PREFETCH_FACTOR (run-only) leave a run recorded
    before they existed with its fingerprint; "cuda" (float, not uint8 rounding) is another."""
    import yaml

    now = cfg("SEED=0")
    before = yaml.safe_load(now.dump())
    del before["DATA"]["AUGMENT_DEVICE"]
    del before["DATA"]["PREFETCH_FACTOR"]
    assert fp.pretrain_identity(before) == fp.pretrain_identity(now)
    assert fp.pretrain_fingerprint(before) == fp.pretrain_fingerprint(now)
    assert fp.pretrain_fingerprint(cfg("SEED=0", "DATA.AUGMENT_DEVICE=cuda")) \
        != fp.pretrain_fingerprint(now)


def test_amp_modes_keep_the_fingerprints_of_boolean_configs(tmp_path):
    """RUN.AMP took a boolean before it took bf16 | fp16 | off: a recorded config with the
    boolean still loads, means the same mode, and keeps its fingerprint; fp16 is a new
    computation; the process-group keys are run-only."""
    base = cfg("SEED=0")
    old_text = base.dump().replace("AMP: 'off'", "AMP: false").replace("AMP: off", "AMP: false")
    assert "AMP: false" in old_text
    old_yaml = tmp_path / "old.yaml"
    old_yaml.write_text(old_text)
    assert load_config(str(old_yaml)).RUN.AMP == "off"
    assert fp.pretrain_fingerprint(old_text) == fp.pretrain_fingerprint(base)
    bf16 = cfg("SEED=0", "RUN.AMP=bf16")
    assert cfg("SEED=0", "RUN.AMP=True").RUN.AMP == "bf16"
    assert fp.pretrain_fingerprint(bf16.dump().replace("AMP: bf16", "AMP: true")) \
        == fp.pretrain_fingerprint(bf16)
    assert fp.pretrain_identity(bf16)["RUN.AMP"] is True      # the old spelling
    assert fp.pretrain_fingerprint(cfg("SEED=0", "RUN.AMP=fp16")) not in (
        fp.pretrain_fingerprint(bf16), fp.pretrain_fingerprint(base))
    for override in ("RUN.DIST_BACKEND=gloo", "RUN.DIST_TIMEOUT_MIN=5"):
        assert fp.pretrain_fingerprint(cfg("SEED=0", override)) == fp.pretrain_fingerprint(base)
