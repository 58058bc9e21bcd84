"""det_configs/: every recipe loads and builds, states the self-supervised conventions, and
freezes what it says; config errors are one line naming the key or file.

Building R50 models on the CPU takes about a second each; no data is touched here.
"""
import glob
import logging
import os

import pytest

import loco_det  # noqa: F401  (compat + registrations before detectron2)
from loco_det.detection import components  # noqa: F401
from loco_det.detection.config import apply_single_process_norm, setup_cfg
from loco_det.utils import ConfigError, LocoError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "det_configs")
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
RECIPES = [c for c in CONFIGS if not os.path.basename(c).startswith("Base-")]
EXPECTED = {
    "coco_R50_FPN_1x_frozen.yaml", "coco_R50_FPN_1x_finetune.yaml",
    "coco10k_R50_FPN_finetune.yaml", "coco1k_R50_FPN_finetune.yaml",
    "cityscapes_R50_FPN_frozen.yaml", "cityscapes_R50_FPN_finetune.yaml",
    "coco_R50_C4_2x_moco.yaml",
    "cpu_synth_coco_R18_FPN_frozen.yaml", "cpu_synth_coco_R18_FPN_finetune.yaml",
    "cpu_synth_cityscapes_R18_FPN_frozen.yaml", "cpu_synth_cityscapes_R18_FPN_finetune.yaml",
    "voc0712_R50_C4_24k_moco.yaml", "voc0712_R50_C4_24k_frozen.yaml",
    "cpu_synth_voc_R18_FPN_frozen.yaml", "cpu_synth_voc_R18_FPN_finetune.yaml",
    "cityscapes_sem_seg_R50_FPN_frozen.yaml", "cityscapes_sem_seg_R50_FPN_finetune.yaml",
    "cpu_synth_cityscapes_sem_seg_R18_FPN_frozen.yaml",
    "cpu_synth_cityscapes_sem_seg_R18_FPN_finetune.yaml",
    "cpu_study_coco_R18_FPN_frozen.yaml", "cpu_study_cityscapes_R18_FPN_frozen.yaml",
    "cpu_study_coco_R18_FPN_finetune_60.yaml", "cpu_study_cityscapes_R18_FPN_finetune_60.yaml",
}
# Recipes of other tasks than Mask R-CNN: Faster R-CNN on VOC, semantic segmentation.
VOC = [c for c in RECIPES if "voc" in os.path.basename(c)]
SEM_SEG = [c for c in RECIPES if "sem_seg" in os.path.basename(c)]


def _name(path):
    return os.path.basename(path)


def _build(cfg):
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    apply_single_process_norm(cfg, 1)
    return build_model(cfg)


def test_all_recipes_present():
    assert EXPECTED <= {_name(c) for c in RECIPES}


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_loads_with_ssl_conventions(path):
    cfg = setup_cfg(path, [])
    # docs/benchmarks.md: torchvision-style weights need these, in every recipe.
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == pytest.approx([123.675, 116.28, 103.53])
    assert list(cfg.MODEL.PIXEL_STD) == pytest.approx([58.395, 57.12, 57.375])
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.MODEL.MASK_ON == (path not in VOC + SEM_SEG)
    assert "LOCO_DET" in cfg
    with open(path) as f:
        text = f.read()
    if _name(path) != "Base-loco-SSL.yaml":
        assert '_BASE_: "' in text


@pytest.mark.parametrize("path", [c for c in RECIPES if c not in VOC + SEM_SEG], ids=_name)
def test_recipe_facts(path):
    """Mask R-CNN recipes (VOC and semantic segmentation: test_voc_and_sem_seg_recipe_facts)."""
    cfg = setup_cfg(path, [])
    name = _name(path)
    if name.startswith("cpu_study_"):   # the study's cheaper heads (det_configs/grids/study.yaml)
        base = setup_cfg(os.path.join(CONFIG_DIR, name.replace("cpu_study_", "cpu_synth_")
                                      .replace("_60.yaml", ".yaml")), [])
        assert cfg.MODEL.ROI_BOX_HEAD.NUM_CONV == 0 and cfg.MODEL.ROI_BOX_HEAD.NUM_FC == 2
        assert cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 64 and cfg.SOLVER.IMS_PER_BATCH == 2
        assert cfg.MODEL.BACKBONE.FREEZE_AT == base.MODEL.BACKBONE.FREEZE_AT
        assert cfg.MODEL.RESNETS.NORM == base.MODEL.RESNETS.NORM
        assert cfg.DATASETS.TEST == base.DATASETS.TEST
        if name.endswith("_60.yaml"):
            assert cfg.DATASETS.TRAIN == (base.DATASETS.TRAIN[0] + "_60_seed0",)
        else:
            assert cfg.DATASETS.TRAIN == base.DATASETS.TRAIN
    elif "frozen" in name:
        assert cfg.MODEL.BACKBONE.FREEZE_AT == 5
        assert cfg.MODEL.ROI_BOX_HEAD.NUM_CONV == 4 and cfg.MODEL.ROI_BOX_HEAD.NUM_FC == 1
        assert cfg.MODEL.FPN.NORM == "SyncBN" and cfg.MODEL.ROI_BOX_HEAD.NORM == "SyncBN"
        assert cfg.MODEL.ROI_MASK_HEAD.NORM == "SyncBN"
    if "finetune" in name:
        assert cfg.MODEL.BACKBONE.FREEZE_AT == 2
        assert cfg.MODEL.RESNETS.NORM == "SyncBN"
    if name.startswith("cpu_"):
        assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == 64
        assert cfg.SOLVER.MAX_ITER <= 800 and cfg.INPUT.MIN_SIZE_TEST <= 160
        assert all(d.startswith("loco_synth_") for d in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
        want = "cityscapes" if "cityscapes" in name else "coco"
        assert all(want in d for d in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
    elif "cityscapes" in name:
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 8
        assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER) == (0.01, 8, 24000)
        assert tuple(cfg.SOLVER.STEPS) == (18000,) and cfg.INPUT.MIN_SIZE_TEST == 1024
        assert min(cfg.INPUT.MIN_SIZE_TRAIN) == 800 and max(cfg.INPUT.MIN_SIZE_TRAIN) == 1024
    elif name.startswith("coco_R50_FPN_1x"):
        assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (90000, (60000, 80000))
        assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH) == (0.02, 16)
    elif name.startswith("coco10k") or name.startswith("coco1k"):
        iters = 60000 if name.startswith("coco10k") else 15000
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH) == (iters, 16)
        assert len(cfg.INPUT.MIN_SIZE_TRAIN) > 1  # multi-scale
        tag = "10k" if name.startswith("coco10k") else "1k"
        assert cfg.DATASETS.TRAIN[0] == f"coco_2017_train_{tag}_seed1"
    elif "moco" in name:
        assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
        assert cfg.MODEL.RESNETS.NORM == "SyncBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH) == (180000, 0.02, 16)
        assert cfg.TEST.PRECISE_BN.ENABLED


@pytest.mark.parametrize("path", RECIPES, ids=_name)
def test_recipe_builds_in_one_process(path):
    """Every recipe builds on the CPU in one process (SyncBN -> BN), and 'frozen' recipes freeze
    the whole ResNet, res5 included, with frozen BN (no running statistics to update)."""
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    cfg = setup_cfg(path, [])
    model = _build(cfg)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    if "frozen" in _name(path) and "voc0712" in _name(path):
        # C4: the whole backbone (stem..res4) is frozen; res5 is the trained box head
        assert not any(p.requires_grad for p in model.backbone.parameters())
        assert all(p.requires_grad for p in model.roi_heads.res5.parameters())
    elif "frozen" in _name(path):
        bottom_up = model.backbone.bottom_up
        assert "res5" in dict(bottom_up.named_children())
        assert not any(p.requires_grad for p in bottom_up.parameters())
        norms = [m for n, m in bottom_up.named_modules() if n.endswith("norm")]
        assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    if "moco" in _name(path):
        assert isinstance(model.roi_heads.res5.norm, torch.nn.BatchNorm2d)
        assert type(model.roi_heads).__name__ == "Res5ROIHeadsExtraNorm"


@pytest.mark.parametrize("path", VOC + SEM_SEG, ids=_name)
def test_voc_and_sem_seg_recipe_facts(path):
    cfg = setup_cfg(path, [])
    name = _name(path)
    frozen = "frozen" in name
    assert cfg.MODEL.BACKBONE.FREEZE_AT == (5 if frozen else 0 if "sem_seg" in name or
                                            "moco" in name else 2)
    assert cfg.MODEL.RESNETS.NORM == ("FrozenBN" if frozen else "SyncBN")
    if name.startswith("cpu_"):
        assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.SOLVER.MAX_ITER <= 500
        assert all(d.startswith("loco_synth_") for d in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
    if path in VOC:
        assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
        assert all("voc" in d for d in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
    if name.startswith("voc0712"):  # MoCo's protocol
        assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 20
        assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (24000, (18000, 22000))
        assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH) == (0.02, 16)
        assert (min(cfg.INPUT.MIN_SIZE_TRAIN), max(cfg.INPUT.MIN_SIZE_TRAIN)) == (480, 800)
        assert cfg.INPUT.MIN_SIZE_TEST == 800 and cfg.TEST.PRECISE_BN.ENABLED
        assert tuple(cfg.DATASETS.TRAIN) == ("voc_2007_trainval", "voc_2012_trainval")
        assert tuple(cfg.DATASETS.TEST) == ("voc_2007_test",)
    if path in SEM_SEG:
        assert cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"
        assert cfg.MODEL.SEM_SEG_HEAD.NAME == "SemSegFPNHead"
        assert (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE) == (19,
                                                                                           255)
        assert all("sem_seg" in d and "cityscapes" in d
                   for d in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
    if name.startswith("cityscapes_sem_seg"):  # MoCo's Cityscapes semantic-segmentation recipe
        assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (90000, (63000, 81000))
        assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH) == (0.01, 16)
        assert cfg.INPUT.CROP.ENABLED and tuple(cfg.INPUT.CROP.SIZE) == (769, 769)
        assert tuple(cfg.DATASETS.TEST) == ("cityscapes_fine_sem_seg_val",)


def test_freeze_at_5_freezes_res5_and_bn_even_from_syncbn():
    """A fine-tune recipe (trainable SyncBN backbone) with FREEZE_AT 5: SyncBN becomes BN in one
    process, then Detectron2's freeze turns every backbone BN, res5's included, into
    FrozenBatchNorm2d; with FREEZE_AT 2 only stem and res2 are frozen."""
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    path = os.path.join(CONFIG_DIR, "cpu_synth_coco_R18_FPN_finetune.yaml")
    model = _build(setup_cfg(path, ["MODEL.BACKBONE.FREEZE_AT", "5"]))
    bottom_up = model.backbone.bottom_up
    assert not any(p.requires_grad for p in bottom_up.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bottom_up.modules())
    assert isinstance(bottom_up.res5[1].conv2.norm, FrozenBatchNorm2d)
    assert any(p.requires_grad for p in model.backbone.fpn_lateral5.parameters())

    model = _build(setup_cfg(path, []))  # FREEZE_AT 2
    bottom_up = model.backbone.bottom_up
    assert not any(p.requires_grad for p in bottom_up.stem.parameters())
    assert not any(p.requires_grad for p in bottom_up.res2.parameters())
    assert all(p.requires_grad for p in bottom_up.res3.parameters())
    assert isinstance(bottom_up.res3[0].conv1.norm, torch.nn.BatchNorm2d)


def test_syncbn_fallback_logs_what_the_norm_became(caplog):
    cfg = setup_cfg(os.path.join(CONFIG_DIR, "coco_R50_FPN_1x_finetune.yaml"), [])
    with caplog.at_level(logging.WARNING, logger="loco_det"):
        changes = apply_single_process_norm(cfg, 1)
    keys = {k for k, _, _ in changes}
    assert {"MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM",
            "MODEL.ROI_MASK_HEAD.NORM"} <= keys
    assert cfg.MODEL.RESNETS.NORM == "BN" and cfg.MODEL.FPN.NORM == "BN"
    assert "MODEL.FPN.NORM (SyncBN -> BN)" in caplog.text
    cfg2 = setup_cfg(os.path.join(CONFIG_DIR, "coco_R50_FPN_1x_finetune.yaml"),
                     ["MODEL.FPN.NORM", "naiveSyncBN"])
    assert apply_single_process_norm(cfg2, 8) == []  # several processes: unchanged
    assert cfg2.MODEL.RESNETS.NORM == "SyncBN"


def test_unknown_key_in_file_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{CONFIG_DIR}/Base-loco-SSL.yaml"\nMODEL:\n  RESNETS:\n    DEPTHH: 18\n')
    with pytest.raises(ConfigError) as e:
        setup_cfg(str(bad), [])
    msg = str(e.value)
    assert "MODEL.RESNETS.DEPTHH" in msg and "\n" not in msg


def test_unknown_key_in_overrides_and_bad_values(tmp_path):
    path = os.path.join(CONFIG_DIR, "cpu_synth_coco_R18_FPN_frozen.yaml")
    with pytest.raises(ConfigError, match=r"unknown config key in overrides: LOCO_DET\.NOPE "
                                          r"\(did you mean LOCO_DET\.[A-Z_]+\?\)$"):
        setup_cfg(path, ["LOCO_DET.NOPE", "1"])
    with pytest.raises(ConfigError, match="MODEL.RESNETS.DEPTH"):
        setup_cfg(path, ["MODEL.RESNETS.DEPTH", "eighteen"])
    with pytest.raises(ConfigError, match="odd number"):
        setup_cfg(path, ["SOLVER.MAX_ITER"])
    with pytest.raises(ConfigError, match="LOCO_DET.BENCHMARK"):
        setup_cfg(path, ["LOCO_DET.BENCHMARK", "ade20k"])


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        setup_cfg(str(tmp_path / "nope.yaml"), [])
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "missing-base.yaml"\n')
    with pytest.raises(ConfigError, match=r"_BASE_ file not found: .*missing-base.yaml"):
        setup_cfg(str(child), [])


def test_loco_config_reloads_from_dump(tmp_path):
    """A dumped config (what train_net writes as config.yaml) loads again with setup_cfg."""
    cfg = setup_cfg(os.path.join(CONFIG_DIR, "coco_R50_C4_2x_moco.yaml"),
                    ["LOCO_DET.LABEL", "loco", "LOCO_DET.RESOLVED_METHOD", "loco"])
    dumped = tmp_path / "config.yaml"
    dumped.write_text(cfg.dump())
    again = setup_cfg(str(dumped), [])
    assert again.LOCO_DET.LABEL == "loco" and again.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"


def test_compiled_ops_needed_is_one_line(monkeypatch):
    """Whatever this machine's Detectron2 install: without compiled ops a deformable-conv config
    is refused in one line (and a plain one is not); with them nothing is refused."""
    from loco_det.detection import compat

    plain = setup_cfg(os.path.join(CONFIG_DIR, "coco_R50_FPN_1x_finetune.yaml"), [])
    cfg = setup_cfg(os.path.join(CONFIG_DIR, "coco_R50_FPN_1x_finetune.yaml"),
                    ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, True]"])
    monkeypatch.setattr(compat, "has_compiled_ops", lambda: False)
    components.check_compiled_ops(plain)
    with pytest.raises(LocoError) as e:
        components.check_compiled_ops(cfg)
    assert "deformable conv (MODEL.RESNETS.DEFORM_ON_PER_STAGE)" in str(e.value)
    assert "detectron2._C" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(compat, "has_compiled_ops", lambda: True)
    components.check_compiled_ops(cfg)  # a source install with compiled ops runs it
