"""Random-init baselines mean what they say, on real Detectron2 training (a few iterations of
tiny images): on a fine-tuning protocol the grid's random-init job trains every backbone stage
from scratch with trainable BN; on a frozen protocol it stays frozen. And train_net refuses a
random-init backbone with partly frozen stages."""
import os

import pytest
import torch

from loco_det import grid as benchmark
from loco_det.utils import LocoError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST", "96",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "(2,)",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "SEED", "1"]
STAGES = ("stem", "res2", "res3", "res4", "res5")


def _train(config, opts, out, monkeypatch):
    """train.main() as tools/train_net.py runs it; returns (backbone params after loading the
    weights, after training, the trained model)."""
    from detectron2.engine import default_argument_parser

    from loco_det.detection import train

    seen = {}
    original = train.Trainer.resume_or_load

    def snapshot_after_load(self, resume=True):
        original(self, resume=resume)
        seen["model"] = self.model
        seen["before"] = {k: v.detach().clone() for k, v in
                          self.model.backbone.bottom_up.named_parameters()}

    monkeypatch.setattr(train.Trainer, "resume_or_load", snapshot_after_load)
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(REPO, "det_configs", config), *FAST, *opts,
         "OUTPUT_DIR", str(out)])
    train.main(args)
    after = {k: v.detach() for k, v in seen["model"].backbone.bottom_up.named_parameters()}
    return seen["before"], after, seen["model"]


def _random_job_opts(config):
    """The overrides run_benchmark gives the random-init job on `config`."""
    return ["LOCO_DET.FROM_SCRATCH", "True", "LOCO_DET.LABEL", "random", "MODEL.WEIGHTS", ""] + \
        benchmark.random_init_opts(os.path.join("det_configs", config))


def test_random_init_fine_tuning_trains_every_backbone_stage(synth_env, tmp_path, monkeypatch,
                                                             one_torch_thread):
    config = "cpu_synth_coco_R18_FPN_finetune.yaml"
    opts = _random_job_opts(config)
    assert opts[-4:] == ["MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.RESNETS.NORM", "SyncBN"]
    before, after, model = _train(config, opts, tmp_path / "ft", monkeypatch)
    norms = [m for name, m in model.backbone.bottom_up.named_modules() if name.endswith("norm")]
    assert norms and all(isinstance(m, torch.nn.BatchNorm2d) for m in norms)   # trainable BN
    for stage in STAGES:
        params = {k: v for k, v in before.items() if k.startswith(stage + ".")}
        assert params, stage
        unchanged = [k for k in params if torch.equal(params[k], after[k])]
        assert not unchanged, f"{stage}: parameters did not train: {unchanged[:3]}"


def test_random_init_readout_stays_frozen(synth_env, tmp_path, monkeypatch, one_torch_thread):
    config = "cpu_synth_coco_R18_FPN_frozen.yaml"
    opts = _random_job_opts(config)
    assert "MODEL.BACKBONE.FREEZE_AT" not in opts
    before, after, model = _train(config, opts, tmp_path / "frozen", monkeypatch)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not any(p.requires_grad for p in model.backbone.bottom_up.parameters())


@pytest.mark.parametrize("opts, needle", [
    (["MODEL.BACKBONE.FREEZE_AT", "2"], "FREEZE_AT 2 keeps random stages frozen"),
    (["MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.RESNETS.NORM", "FrozenBN"],
     "needs a norm that trains from scratch"),
])
def test_partly_frozen_random_init_is_refused(opts, needle):
    from loco_det.detection.config import setup_cfg
    from loco_det.detection.train import check_random_init_protocol

    cfg = setup_cfg(os.path.join(REPO, "det_configs", "cpu_synth_coco_R18_FPN_finetune.yaml"),
                    ["LOCO_DET.FROM_SCRATCH", "True", *opts])
    with pytest.raises(LocoError, match=needle):
        check_random_init_protocol(cfg)
