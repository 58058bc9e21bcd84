"""Pretraining engine: exact resume, 2-process gloo run through torchrun, and bad input that
gives one clear line and leaves the output directory untouched."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from loco_det.pretrain.config import load_config
from loco_det.pretrain.engine import model_params_sha256, train
from loco_det.pretrain.model import build_model

from test_pretrain_data import make_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import pretrain as pretrain_tool  # noqa: E402  (tools/pretrain.py)

# Tiny: ResNet-18, 32 px, 16 images, global batch 8 -> 2 steps per epoch.
TINY = ["SEED=123", "MODEL.ARCH=resnet18", "DATA.IMAGE_SIZE=32", "OPTIM.BATCH_SIZE=8",
        "OPTIM.EPOCHS=2", "OPTIM.WARMUP_EPOCHS=1", "DATA.NUM_WORKERS=0", "RUN.LOG_PERIOD=1"]


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("pretrain_data") / "train", n_per_class=8)


def tiny_cfg(root, *extra, method="loco"):
    return load_config(None, [f"DATA.ROOT={root}", f"MODEL.METHOD={method}", *TINY, *extra])


@pytest.fixture(scope="module")
def straight_run(data16, tmp_path_factory):
    """Two epochs without interruption (the reference for the resume tests)."""
    out = tmp_path_factory.mktemp("straight")
    summary = train(tiny_cfg(data16), str(out))
    return out, summary


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    for part in ("encoder", "decoders"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


def snapshot(directory):
    """name -> (mtime_ns, sha256) of every file below `directory`."""
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[path] = (os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def test_run_outputs_match_formats(straight_run):
    out, summary = straight_run
    assert summary["finished"] and summary["steps"] == 4 and summary["epochs"] == 2
    assert set(summary["final_losses"]) == {"unit1", "unit2", "unit3"}
    ckpt = load(out / "checkpoint_last.pth")
    assert (ckpt["method"], ckpt["arch"], ckpt["epoch"], ckpt["step"]) == ("loco", "resnet18", 2, 4)
    torchvision.models.resnet18().load_state_dict(ckpt["encoder"], strict=True)
    assert load_config_string(ckpt["config"]).SEED == 123
    info = json.loads((out / "run_info.json").read_text())
    assert info["kind"] == "pretrain" and info["world_size"] == 1 and info["global_batch"] == 8
    for key in ("git_commit", "argv", "versions", "method", "arch", "epochs", "config_file"):
        assert key in info
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"lr", "images_per_s", "loss/unit1", "loss/unit3", "epoch"} <= set(records[0])
    assert (out / "config.yaml").exists() and os.listdir(out / "tb")


def load_config_string(text):
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name)
    finally:
        os.unlink(f.name)


def test_drawn_seed_is_recorded(data16, tmp_path):
    """SEED=-1 draws a seed and config.yaml records the one the run used: a run given that
    seed reproduces the drawn run's first step bit for bit."""
    drawn, again = tmp_path / "drawn", tmp_path / "again"
    train(tiny_cfg(data16, "SEED=-1", "OPTIM.EPOCHS=1", "RUN.CHECKPOINT_PERIOD=1",
                   method="e2e"), str(drawn), stop_after_steps=1)
    seed = load_config(str(drawn / "config.yaml")).SEED
    assert seed != -1
    train(tiny_cfg(data16, f"SEED={seed}", "OPTIM.EPOCHS=1", "RUN.CHECKPOINT_PERIOD=1",
                   method="e2e"), str(again), stop_after_steps=1)
    a, b = load(drawn / "checkpoint_last.pth"), load(again / "checkpoint_last.pth")
    assert a["step"] == b["step"] == 1
    assert_same_weights(a, b)


@pytest.mark.parametrize("period,stop,resumed_from", [(0, 3, 2), (1, 3, 3)])
def test_resume_is_bit_identical(straight_run, data16, tmp_path, period, stop, resumed_from):
    """Kill after step 3: with epoch checkpoints only, the resume redoes step 3 from the
    epoch-1 checkpoint; with a checkpoint every step it continues mid-epoch. Worker count may
    differ between the two invocations."""
    cfg = tiny_cfg(data16, f"RUN.CHECKPOINT_PERIOD={period}")
    assert train(cfg, str(tmp_path), stop_after_steps=stop) is None
    assert load(tmp_path / "checkpoint_last.pth")["step"] == resumed_from
    assert not (tmp_path / "summary.json").exists()
    workers = "DATA.NUM_WORKERS=1" if period else "DATA.NUM_WORKERS=0"
    summary = train(tiny_cfg(data16, f"RUN.CHECKPOINT_PERIOD={period}", workers), str(tmp_path),
                    resume=True)
    assert summary["steps"] == 4
    assert_same_weights(load(straight_run[0] / "checkpoint_last.pth"),
                        load(tmp_path / "checkpoint_last.pth"))
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # records of the killed steps were replaced, not duplicated
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["resumes"][0]["from_step"] == resumed_from


def run_cli(args, capsys):
    rc = pretrain_tool.main([str(a) for a in args])
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("case", ["missing_data", "empty_data", "unknown_key", "unknown_method",
                                  "unknown_arch", "wrong_arch_resume", "wrong_method_resume",
                                  "changed_temperature_resume", "changed_decoder_resume",
                                  "changed_lr_and_augmentation_resume", "fresh_over_existing"])
def test_bad_input_one_line_and_output_untouched(case, straight_run, data16, tmp_path, capsys):
    out = straight_run[0]
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    base = ["--output-dir", out, "--resume", *TINY, f"DATA.ROOT={data16}"]
    args, expect = {
        "missing_data": (base + [f"DATA.ROOT={tmp_path / 'nope'}"],
                         [str(tmp_path / "nope"), "not found"]),
        "empty_data": (base + [f"DATA.ROOT={empty}"], [str(empty), "no images"]),
        "unknown_key": (base + ["OPTIM.NOT_A_KEY=1"], ["OPTIM.NOT_A_KEY"]),
        "unknown_method": (base + ["MODEL.METHOD=byol"], ["MODEL.METHOD", "byol"]),
        "unknown_arch": (base + ["MODEL.ARCH=vgg16"], ["MODEL.ARCH", "vgg16"]),
        "wrong_arch_resume": (base + ["MODEL.ARCH=resnet34"],
                              [str(out / "checkpoint_last.pth"), "resnet18", "resnet34"]),
        "wrong_method_resume": (base + ["MODEL.METHOD=gim"],
                                [str(out / "checkpoint_last.pth"), "loco", "gim"]),
        "changed_temperature_resume": (base + ["LOSS.TEMPERATURE=0.5"],
                                       ["LOSS.TEMPERATURE (checkpoint 0.1, config 0.5)"]),
        "changed_decoder_resume": (base + ["MODEL.DECODER.CONV_BLOCKS=1"],
                                   ["MODEL.DECODER.CONV_BLOCKS (checkpoint 0, config 1)"]),
        "changed_lr_and_augmentation_resume": (
            base + ["OPTIM.BASE_LR=0.5", "DATA.COLOR_JITTER=0.25"],
            ["OPTIM.BASE_LR (checkpoint 0.3, config 0.5)",
             "DATA.COLOR_JITTER (checkpoint 1.0, config 0.25)"]),
        "fresh_over_existing": ([a for a in base if a != "--resume"],
                                [str(out / "checkpoint_last.pth"), "--resume"]),
    }[case]
    before = snapshot(out)
    rc, errors = run_cli(args, capsys)
    assert rc == 1 and len(errors) == 1, errors
    for text in expect:
        assert text in errors[0]
    assert snapshot(out) == before
    # a fresh directory is not even created
    fresh = tmp_path / "fresh"
    if not case.endswith(("_resume", "_existing")):
        rc, _ = run_cli([a if a != out else fresh for a in args], capsys)
        assert rc == 1 and not fresh.exists()


def test_resume_at_the_last_step_reports_the_final_losses(straight_run, data16, tmp_path):
    """Killed after the last checkpoint but before summary.json: the resume runs no step, yet
    its summary gives the same final losses (kept in the checkpoint) as the straight run."""
    import shutil

    for name in ("checkpoint_last.pth", "config.yaml", "run_info.json", "metrics.jsonl"):
        shutil.copy(straight_run[0] / name, tmp_path / name)
    summary = train(tiny_cfg(data16), str(tmp_path), resume=True)
    assert summary["steps"] == 4
    assert summary["final_losses"] == straight_run[1]["final_losses"] is not None


def test_resume_accepts_changed_run_only_keys(straight_run, data16):
    """Run-only keys (loco_det/fingerprint.py) may change on resume; the fingerprint ignores them
    and the seed, and is recorded in the checkpoint and run_info.json."""
    from loco_det.fingerprint import pretrain_fingerprint
    from loco_det.pretrain.engine import check_resume_compatible, load_checkpoint

    path = straight_run[0] / "checkpoint_last.pth"
    ckpt = load_checkpoint(str(path))
    cfg = tiny_cfg(data16, "RUN.LOG_PERIOD=7", "DATA.NUM_WORKERS=1", "RUN.CHECKPOINT_PERIOD=3",
                   "MODEL.LOCO_SCHEDULE=recompute")
    check_resume_compatible(str(path), ckpt, cfg, ckpt["steps_per_epoch"])
    assert ckpt["fingerprint"] == pretrain_fingerprint(cfg)
    assert ckpt["fingerprint"] == pretrain_fingerprint(tiny_cfg(data16, "SEED=5"))
    assert ckpt["fingerprint"] != pretrain_fingerprint(tiny_cfg(data16, "LOSS.TEMPERATURE=0.2"))
    info = json.loads((straight_run[0] / "run_info.json").read_text())
    assert info["fingerprint"] == ckpt["fingerprint"]


def test_batch_must_divide_by_world_size(data16, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rc, errors = run_cli(["--output-dir", tmp_path / "o", *TINY, f"DATA.ROOT={data16}",
                          "OPTIM.BATCH_SIZE=7"], capsys)
    assert rc == 1 and len(errors) == 1
    assert "OPTIM.BATCH_SIZE=7" in errors[0] and "world size 2" in errors[0]
    assert not (tmp_path / "o").exists()


def test_unreadable_images_skipped_counted_warned_once(tmp_path, capsys):
    root = make_folder(tmp_path / "d", n_per_class=8, bad=("a/003.png",))
    summary = train(tiny_cfg(root, "DATA.MAX_BAD_FRACTION=0.1", method="e2e"),
                    str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert summary["finished"] and summary["bad_images"] == 1
    assert err.count("warning: skipping unreadable image") == 1
    assert str(root / "a" / "003.png") in err


def test_too_many_unreadable_images_fail(tmp_path, capsys):
    root = make_folder(tmp_path / "d", n_per_class=8, bad=("a/001.png", "a/004.png", "b/002.png"))
    rc, errors = run_cli(["--output-dir", tmp_path / "o", *TINY, f"DATA.ROOT={root}",
                          "MODEL.METHOD=e2e", "DATA.MAX_BAD_FRACTION=0.1"], capsys)
    assert rc == 1 and len(errors) == 1
    assert str(root) in errors[0] and "DATA.MAX_BAD_FRACTION=0.1" in errors[0]
    assert not (tmp_path / "o" / "checkpoint_last.pth").exists()


def test_torchrun_two_processes_end_with_identical_weights(data16, tmp_path):
    """2 gloo processes through tools/pretrain.py; every rank hashes its final parameters into
    summary.json; they must agree with each other and with rank 0's checkpoint. (Each rank
    sees different images, so without gradient averaging the hashes would differ.)"""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
           os.path.join(REPO, "tools", "pretrain.py"), "--output-dir", str(out),
           *TINY, "OPTIM.EPOCHS=1", f"DATA.ROOT={data16}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    h0, h1 = summary["param_sha256"]
    assert h0 == h1
    ckpt = load(out / "checkpoint_last.pth")
    model = build_model("loco", "resnet18")
    model.encoder.load_state_dict(ckpt["encoder"])
    model.decoders.load_state_dict(ckpt["decoders"])
    assert model_params_sha256(model) == h0
    assert json.loads((out / "run_info.json").read_text())["world_size"] == 2


def test_recipes_load_with_the_papers_hyper_parameters():
    from loco_det.pretrain.optim import peak_lr

    recipes = os.path.join(REPO, "pretrain")
    for method, name in (("e2e", "simclr"), ("gim", "gim"), ("loco", "loco")):
        for epochs in (100, 800):
            cfg = load_config(os.path.join(recipes, f"{name}_r50_{epochs}ep.yaml"))
            assert (cfg.MODEL.METHOD, cfg.MODEL.ARCH, cfg.OPTIM.EPOCHS) == (method, "resnet50",
                                                                            epochs)
            assert (cfg.OPTIM.NAME, cfg.OPTIM.BATCH_SIZE, cfg.OPTIM.WARMUP_EPOCHS) == ("lars",
                                                                                    4096, 10)
            assert peak_lr(cfg) == pytest.approx(4.8) and cfg.OPTIM.WEIGHT_DECAY == 1e-6
            assert cfg.MODEL.SYNC_BN and cfg.DATA.IMAGE_SIZE == 224
    fair = load_config(os.path.join(recipes, "simclr_r50_100ep_deepdecoder.yaml"))
    loco = load_config(os.path.join(recipes, "loco_r50_100ep.yaml"))
    assert fair.MODEL.METHOD == "e2e" and fair.MODEL.DECODER == loco.MODEL.DECODER
    for method in ("e2e", "gim", "loco"):
        cfg = load_config(os.path.join(recipes, f"cpu_{method}.yaml"))
        assert (cfg.MODEL.METHOD, cfg.MODEL.ARCH, cfg.DATA.IMAGE_SIZE) == (method, "resnet18", 64)


def test_integer_override_of_a_float_key():
    """`DATA.COLOR_JITTER_PROB=0` means 0.0 (yacs alone calls it a type mismatch); an int key
    keeps refusing a float, and a float key a word."""
    from loco_det.pretrain.config import ConfigError

    cfg = load_config(None, ["DATA.COLOR_JITTER_PROB=0", "LOSS.TEMPERATURE=1"])
    assert cfg.DATA.COLOR_JITTER_PROB == 0.0 and isinstance(cfg.DATA.COLOR_JITTER_PROB, float)
    assert cfg.LOSS.TEMPERATURE == 1.0
    with pytest.raises(ConfigError, match="OPTIM.EPOCHS"):
        load_config(None, ["OPTIM.EPOCHS=1.5"])
    with pytest.raises(ConfigError, match="LOSS.TEMPERATURE"):
        load_config(None, ["LOSS.TEMPERATURE=warm"])


def test_an_error_on_another_rank_is_printed_with_its_rank(data16, tmp_path, capsys,
                                                           monkeypatch):
    """Every rank prints its own error line, naming the rank (rank 0 alone used to)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rc, errors = run_cli(["--output-dir", tmp_path / "o", *TINY, f"DATA.ROOT={data16}",
                          "OPTIM.BATCH_SIZE=7"], capsys)
    assert rc == 1 and len(errors) == 1
    assert errors[0].startswith("error: rank 1 of 2: OPTIM.BATCH_SIZE=7")


def _host_reads_in(function_name, monkeypatch):
    """Counts calls of Tensor.item / float() / bool() / int() made while a frame of
    engine.py's `function_name` is on the stack: each is the host waiting for the device."""
    calls = []
    for name in ("item", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _original=original, _name=name, **k):
            frame = sys._getframe(1)
            while frame is not None:
                code = frame.f_code
                if code.co_name == function_name and code.co_filename.endswith("engine.py"):
                    calls.append((_name, sys._getframe(1).f_code.co_name))
                    break
                frame = frame.f_back
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


def test_no_host_read_inside_a_training_step(data16, tmp_path, monkeypatch):
    """Losses and their finiteness stay on the device during the step (read at log time only):
    nothing inside `train_step` converts a tensor to a Python number. The log does (the
    check is not blind)."""
    calls = _host_reads_in("train_step", monkeypatch)
    summary = train(tiny_cfg(data16, "OPTIM.EPOCHS=1", "RUN.LOG_PERIOD=100"), str(tmp_path / "a"))
    assert summary["steps"] == 2
    assert calls == []
    logged = _host_reads_in("log", monkeypatch)
    train(tiny_cfg(data16, "OPTIM.EPOCHS=1", "RUN.LOG_PERIOD=100"), str(tmp_path / "b"))
    assert logged


def test_non_finite_loss_stops_the_run_before_a_checkpoint(data16, tmp_path, capsys, monkeypatch):
    """A NaN loss in step 1 is found when the window is read (the end of the epoch at step 2,
    RUN.LOG_PERIOD=100), reported with its step, and no checkpoint holds the damaged weights."""
    from loco_det.pretrain import engine

    setup = engine.setup_model

    def nan_at_first_step(*a, **k):
        model = setup(*a, **k)
        forward_backward, count = model.forward_backward, []

        def patched(*args, **kwargs):
            losses = forward_backward(*args, **kwargs)
            count.append(1)
            if len(count) == 1:
                losses["unit2"] = losses["unit2"] * float("nan")
            return losses

        model.forward_backward = patched
        return model

    monkeypatch.setattr(engine, "setup_model", nan_at_first_step)
    rc, errors = run_cli(["--output-dir", tmp_path / "o", *TINY, f"DATA.ROOT={data16}",
                          "RUN.LOG_PERIOD=100"], capsys)
    assert rc == 1 and errors == ["error: non-finite loss at step 1; lower OPTIM.BASE_LR or "
                                  "check the data"]
    assert not (tmp_path / "o" / "checkpoint_last.pth").exists()


def test_loss_scaler_path_of_the_loop(data16, tmp_path, monkeypatch):
    """The loop's RUN.AMP=fp16 path, with GradScaler's CPU form standing in for the CUDA one
    (autocast itself is CUDA-only here): the scaled steps give the unscaled run's weights, the
    scale is logged and saved, and a resumed run restores it."""
    from loco_det.pretrain import engine

    plain = tmp_path / "plain"
    train(tiny_cfg(data16), str(plain), stop_after_steps=2)   # epoch 1 of 2
    setup = engine.setup_model

    def with_scaler(*a, **k):
        model = setup(*a, **k)
        model.loss_scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        return model

    monkeypatch.setattr(engine, "setup_model", with_scaler)
    scaled = tmp_path / "scaled"
    train(tiny_cfg(data16), str(scaled), stop_after_steps=2)
    a, b = load(plain / "checkpoint_last.pth"), load(scaled / "checkpoint_last.pth")
    for part in ("encoder", "decoders"):
        for key, w in a[part].items():
            torch.testing.assert_close(b[part][key], w, rtol=1e-4, atol=1e-6)
    assert b["grad_scaler"]["scale"] == 256.0 and "grad_scaler" not in a
    records = [json.loads(line) for line in (scaled / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["amp/loss_scale"] == 256.0
    # resuming restores the saved scale, not the initial one
    ckpt = load(scaled / "checkpoint_last.pth")
    ckpt["grad_scaler"]["scale"] = 64.0
    torch.save(ckpt, scaled / "checkpoint_last.pth")
    train(tiny_cfg(data16), str(scaled), resume=True)
    records = [json.loads(line) for line in (scaled / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["amp/loss_scale"] == 64.0
