"""tools/train_net.py end to end: real Mask R-CNN training and evaluation on the embedded data
(COCO and Cityscapes layouts) through the command line, frozen-means-frozen, reload in a fresh
process, and one-line refusals of bad input.

These are the slow tests of the suite, kept small: 96x128 px images, 2-3 iterations of batch 2,
8 validation images; each training run is one subprocess of ~20-30 s on 2 cores.
"""
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
CFG = os.path.join(REPO, "det_configs")
FAST = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST", "96",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "1000", "SEED", "1"]


def _env(synth_root):
    env = dict(os.environ, DETECTRON2_DATASETS=os.fspath(synth_root.parent))
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def train_net(args, synth_root, cwd, timeout=300):
    """Run tools/train_net.py in a fresh process (cwd: a scratch folder, to catch files written
    into the working directory)."""
    return subprocess.run([sys.executable, TRAIN_NET, *args], cwd=cwd, env=_env(synth_root),
                          capture_output=True, text=True, timeout=timeout)


def _error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = _error_lines(proc)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A loco_det-style checkpoint of a random torchvision ResNet-18 with randomised BN statistics
    (so that 'the buffers did not change' is not a comparison of defaults), converted with the
    project's converter. Method 'loco' comes from the checkpoint's metadata."""
    import torchvision

    from loco_det.weights import convert

    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    ckpt = d / "checkpoint_last.pth"
    torch.save({"encoder": model.state_dict(), "method": "loco", "arch": "resnet18"}, ckpt)
    out = d / "loco_r18.pkl"
    convert.convert(str(ckpt), str(out))
    return out


@pytest.fixture(scope="module")
def coco_run(synth_root, weights, tmp_path_factory):
    """One frozen readout run in COCO format, shared by the checks below. The backbone norm is
    overridden to SyncBN so that the whole chain is exercised: SyncBN -> BN (one process) ->
    FrozenBatchNorm2d (Detectron2's freeze), whose statistics must not move."""
    d = tmp_path_factory.mktemp("coco_run")
    out = d / "out"
    proc = train_net(["--config-file", os.path.join(CFG, "cpu_synth_coco_R18_FPN_frozen.yaml"),
                      "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(out),
                      "SOLVER.MAX_ITER", "3", "MODEL.RESNETS.NORM", "SyncBN", *FAST],
                     synth_root, cwd=d)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, d


def _numeric(x):
    return isinstance(x, float) and np.isfinite(x)


def test_coco_training_writes_results(coco_run):
    out, cwd = coco_run
    for name in ("config.yaml", "run_info.json", "metrics.json", "model_final.pth", "log.txt",
                 "results.json"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "detection" and res["finished"] is True
    for task in ("bbox", "segm"):
        assert all(_numeric(res[task][k]) for k in ("AP", "AP50", "AP75")), res[task]
    assert list(res["metrics"]) == ["loco_synth_coco_val"]
    assert "AP-ellipse" in res["metrics"]["loco_synth_coco_val"]["bbox"]
    assert res["method"] == "loco"
    p = res["protocol"]
    assert p["config_name"] == "cpu_synth_coco_R18_FPN_frozen" and p["benchmark"] == "coco"
    assert (p["max_iter"], p["frozen"], p["freeze_at"], p["world_size"], p["global_batch"],
            p["seed"]) == (3, True, 5, 1, 2, 1)
    assert p["weights"].endswith("loco_r18.pkl")
    info = json.loads((out / "run_info.json").read_text())
    assert info["kind"] == "detection" and info["world_size"] == 1 and "git_commit" in info
    log = (out / "log.txt").read_text()
    assert "MODEL.RESNETS.NORM (SyncBN -> BN)" in log  # the single-process notice
    assert not list(cwd.glob("*.json"))  # nothing dumped into the working directory


def test_frozen_means_frozen(coco_run, weights):
    """After training with FREEZE_AT 5, every backbone parameter and BN buffer equals the
    converted weights, while the trainable parts (FPN BN statistics) did move; the log lists the
    trainable parameters and none of them is in the backbone."""
    from loco_det.weights.safe_load import load_pkl as safe_load_pkl

    out, _ = coco_run
    before = safe_load_pkl(str(weights))["model"]
    after = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    prefix = "backbone.bottom_up."
    compared, buffers = 0, 0
    for key, value in after.items():
        if not key.startswith(prefix) or key.endswith("num_batches_tracked"):
            continue
        name = key[len(prefix):]
        assert name in before, f"{key} was not loaded from the converted weights"
        assert torch.equal(value, torch.as_tensor(before[name])), f"{key} changed while frozen"
        compared += 1
        buffers += name.endswith(("running_mean", "running_var"))
    assert compared == len([k for k in before if not k.endswith("num_batches_tracked")])
    assert buffers >= 40  # R18: 20 norms x (mean, var)
    # the test is not vacuous: unfrozen BN statistics (FPN, initialised to 0) did update
    assert after["backbone.fpn_lateral2.norm.running_mean"].abs().sum() > 0

    log = (out / "log.txt").read_text()
    assert "Trainable parameter list:" in log
    listed = log.split("Trainable parameter list:")[1].split("\n[")[0]
    names = [line.split()[0] for line in listed.strip().splitlines()]
    assert "roi_heads.box_predictor.cls_score.weight" in names
    assert "backbone.fpn_lateral2.weight" in names
    assert not any(n.startswith(prefix) for n in names)
    assert "backbone frozen: True" in log


def test_reload_in_fresh_process(coco_run, synth_root):
    """config.yaml + model_final.pth alone reproduce the run's evaluation with --eval-only."""
    out, cwd = coco_run
    ev = cwd / "eval"
    proc = train_net(["--eval-only", "--config-file", str(out / "config.yaml"),
                      "MODEL.WEIGHTS", str(out / "model_final.pth"), "OUTPUT_DIR", str(ev)],
                     synth_root, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    trained = json.loads((out / "results.json").read_text())
    res = json.loads((ev / "results.json").read_text())
    assert res["eval_only"] is True and res["method"] == "loco"
    assert res["protocol"]["config_name"] == "cpu_synth_coco_R18_FPN_frozen"
    for task in ("bbox", "segm"):
        assert res[task]["AP"] == pytest.approx(trained[task]["AP"], abs=1e-6)
    assert (ev / "config.yaml").is_file()


def test_resume_continues_the_run(coco_run, synth_root):
    """--resume picks up OUTPUT_DIR/last_checkpoint (iteration and method label included) and
    trains only the remaining iterations."""
    import shutil

    out, cwd = coco_run
    resumed = cwd / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "results.json").unlink()
    proc = train_net(["--resume", "--config-file", str(resumed / "config.yaml"),
                      "OUTPUT_DIR", str(resumed), "SOLVER.MAX_ITER", "4"], synth_root, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((resumed / "results.json").read_text())
    assert res["iteration"] == 4 and res["method"] == "loco" and res["protocol"]["max_iter"] == 4
    log = (resumed / "log.txt").read_text()
    assert "Starting training from iteration 3" in log


def test_cityscapes_training_and_official_evaluation(synth_root, weights, tmp_path):
    out = tmp_path / "out"
    proc = train_net(["--config-file", os.path.join(CFG, "cpu_synth_cityscapes_R18_FPN_finetune.yaml"),
                      "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(out),
                      "SOLVER.MAX_ITER", "2", *FAST], synth_root, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["benchmark"] == "cityscapes"
    assert res["evaluators"] == {"bbox": "coco", "segm": "cityscapes"}
    assert _numeric(res["bbox"]["AP"]) and _numeric(res["segm"]["AP"]) and _numeric(res["segm"]["AP50"])
    assert res["protocol"]["frozen"] is False and res["protocol"]["freeze_at"] == 2
    metrics = res["metrics"]["loco_synth_cityscapes_instance_seg_val"]
    assert set(metrics) >= {"bbox", "segm", "segm_coco"}
    # cityscapesscripts' own table ("average : AP AP_50%", fractions) is what results.json holds
    averages = re.findall(r"^average\s+:\s+(\S+)\s+(\S+)$", proc.stdout, re.M)
    assert len(averages) == 1, proc.stdout[-3000:]
    assert [float(v) for v in averages[0]] == pytest.approx(
        [res["segm"]["AP"] / 100, res["segm"]["AP50"] / 100], abs=5e-4)
    # cityscapesscripts' matches.json goes to the run's folder, not the working directory
    assert not (tmp_path / "matches.json").exists()
    assert (out / "inference" / "loco_synth_cityscapes_instance_seg_val" / "matches.json").exists()


def test_code_running_pkl_is_refused_and_does_not_run(synth_root, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": Payload()},
                                   "__author__": "x", "matching_heuristics": True}))
    out = tmp_path / "out"
    proc = train_net(["--eval-only", "--config-file",
                      os.path.join(CFG, "cpu_synth_coco_R18_FPN_frozen.yaml"),
                      "MODEL.WEIGHTS", str(evil), "OUTPUT_DIR", str(out)], synth_root, cwd=tmp_path)
    assert_one_line_error(proc, str(evil))
    assert not marker.exists()
    assert not out.exists()  # refused before anything was written


def test_wrong_depth_checkpoint_without_metadata(synth_root, weights, tmp_path):
    """R18 weights without converter metadata into an R50 model: the loader names a missing
    backbone parameter (the metadata case is refused earlier, see below)."""
    from loco_det.weights.safe_load import load_pkl as safe_load_pkl

    data = safe_load_pkl(str(weights))
    del data["loco_det"]
    bare = tmp_path / "bare_r18.pkl"
    bare.write_bytes(pickle.dumps(data))
    proc = train_net(["--config-file", os.path.join(CFG, "cpu_synth_coco_R18_FPN_frozen.yaml"),
                      "MODEL.WEIGHTS", str(bare), "OUTPUT_DIR", str(tmp_path / "out"),
                      "MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
                      *FAST], synth_root, cwd=tmp_path)
    assert_one_line_error(proc, "backbone parameter", "missing")
    assert not (tmp_path / "out" / "results.json").exists()


# --------------------------------------------------------------------- fast, in-process errors

def _main(argv, capsys):
    """tools/train_net.py's main() in this process (the refusals happen before any model is
    built, so a subprocess per case would only add ~10 s of imports). SOLVER.MAX_ITER 0 is a
    safety net: a check that failed to refuse must not start a training run here."""
    argv = [*argv, "SOLVER.MAX_ITER", "0"] if "--help" not in argv else argv
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import train_net as tool
    finally:
        sys.path.pop(0)
    code = tool.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    return code, lines


def test_unknown_key_is_one_line(capsys, tmp_path):
    code, lines = _main(["--config-file", os.path.join(CFG, "cpu_synth_coco_R18_FPN_frozen.yaml"),
                         "MODEL.RESNETS.FOO", "1", "OUTPUT_DIR", str(tmp_path / "o")], capsys)
    assert code == 1 and len(lines) == 1 and "MODEL.RESNETS.FOO" in lines[0]
    assert not (tmp_path / "o").exists()


def test_wrong_depth_checkpoint_with_metadata(capsys, synth_env, weights, tmp_path):
    code, lines = _main(["--config-file", os.path.join(CFG, "cpu_synth_coco_R18_FPN_frozen.yaml"),
                         "MODEL.WEIGHTS", str(weights), "MODEL.RESNETS.DEPTH", "50",
                         "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
                         "OUTPUT_DIR", str(tmp_path / "o")], capsys)
    assert code == 1 and len(lines) == 1
    assert "MODEL.RESNETS.DEPTH" in lines[0] and "50" in lines[0] and "18" in lines[0]
    assert not (tmp_path / "o").exists()


def test_missing_dataset_dir_is_one_line(capsys, monkeypatch, weights, tmp_path):
    empty = tmp_path / "no_datasets"
    empty.mkdir()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(empty))
    code, lines = _main(["--config-file", os.path.join(CFG, "cpu_synth_coco_R18_FPN_frozen.yaml"),
                         "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "o")], capsys)
    assert code == 1 and len(lines) == 1
    assert str(empty) in lines[0] and "loco_synth" in lines[0]
    assert not (tmp_path / "o").exists()


def test_missing_weights_and_inconsistent_scratch(capsys, synth_env, tmp_path):
    cfg = os.path.join(CFG, "cpu_synth_coco_R18_FPN_frozen.yaml")
    code, lines = _main(["--config-file", cfg, "MODEL.WEIGHTS", str(tmp_path / "nope.pkl")], capsys)
    assert code == 1 and len(lines) == 1 and "nope.pkl" in lines[0]
    code, lines = _main(["--config-file", cfg, "OUTPUT_DIR", str(tmp_path / "o")], capsys)
    assert code == 1 and "LOCO_DET.FROM_SCRATCH" in lines[0]
    code, lines = _main(["--eval-only", "--config-file", cfg, "OUTPUT_DIR", str(tmp_path / "o")],
                        capsys)
    assert code == 1 and "--eval-only" in lines[0]
    assert not (tmp_path / "o").exists()


def test_help_has_examples():
    proc = subprocess.run([sys.executable, TRAIN_NET, "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for flag in ("--config-file", "--num-gpus", "--num-machines", "--machine-rank", "--dist-url",
                 "--eval-only", "--resume", "Examples:"):
        assert flag in proc.stdout


@pytest.mark.parametrize("extra,want", [([], "auto"),
                                        (["--dist-url", "tcp://10.0.0.1:1234"],
                                         "tcp://10.0.0.1:1234")])
def test_one_machine_picks_a_free_port(extra, want, capsys, monkeypatch):
    """Detectron2's default --dist-url is one port per user, so two multi-GPU jobs on one
    machine (the grid runner with --jobs N) would collide: on one machine train_net asks
    launch() for a free port ("auto") unless --dist-url is given."""
    import loco_det.detection  # noqa: F401  (compat layer first, as the tool does)
    import detectron2.engine

    seen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(detectron2.engine, "launch",
                        lambda fn, n, num_machines, machine_rank, dist_url, args: seen.append(
                            (n, dist_url)))
    config = os.path.join(REPO, "det_configs", "cpu_synth_coco_R18_FPN_frozen.yaml")
    code, errors = _main(["--num-gpus", "2", *extra, "--config-file", config], capsys)
    assert code == 0 and not errors
    assert seen == [(2, want)]
