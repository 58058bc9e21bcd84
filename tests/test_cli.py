"""The `loco-det` command line: one entry point for every tool, shipped recipes by name from any
folder, the shared conventions (option spellings, KEY=VALUE overrides, nearest-key hints, one
architecture list) and the run-folder lock."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from loco_det import cli, recipes
from loco_det.utils import LocoError, run_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loco_det(*args, cwd, env=None, timeout=300):
    """`python -m loco_det.cli ARGS` in `cwd`, with this checkout importable."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "loco_det.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_console_script_is_declared():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {"loco-det": "loco_det.cli:main"}
    module, func = scripts["loco-det"].split(":")
    assert getattr(importlib.import_module(module), func) is cli.main


def test_help_lists_every_subcommand_and_each_wraps_its_tool(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    wanted = {"data", "pretrain", "readout", "knn", "convert", "train", "report", "grid", "bench",
              "subset"}
    assert wanted <= set(cli.COMMANDS)
    for sub, (module, script, _) in cli.COMMANDS.items():
        assert f"  {sub} " in text
        command = importlib.import_module(f"loco_det.commands.{module}")
        # tools/SCRIPT.py is a wrapper over the very same function
        spec = importlib.util.spec_from_file_location(f"wrapper_{script}",
                                                      os.path.join(ROOT, "tools", f"{script}.py"))
        wrapper = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(wrapper)
        assert wrapper.main is command.main, sub
    assert cli.main(["pretrian"]) == 2
    assert "did you mean pretrain?" in capsys.readouterr().err


def test_help_from_another_folder(tmp_path):
    res = _loco_det("--help", cwd=tmp_path)
    assert res.returncode == 0 and "grid" in res.stdout, res.stderr
    res = _loco_det("pretrain", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "--config-file" in res.stdout and "--no-progress" in res.stdout
    assert res.stdout.startswith("usage: python -m loco_det.cli pretrain"), res.stdout[:200]


def test_shipped_names_resolve_and_near_misses_are_named():
    assert recipes.resolve("cpu_loco", "pretrain") == os.path.join(ROOT, "pretrain", "cpu_loco.yaml")
    assert recipes.resolve("cpu_loco.yaml", "pretrain") == recipes.resolve("cpu_loco", "pretrain")
    assert os.path.samefile(recipes.resolve("pretrain/cpu_loco.yaml", "pretrain"),
                            os.path.join(ROOT, "pretrain", "cpu_loco.yaml"))
    assert recipes.resolve("demo", "grid") == os.path.join(ROOT, "det_configs", "grids",
                                                           "demo.yaml")
    assert recipes.resolve("cpu_synth_coco_R18_FPN_frozen", "detection").startswith(
        os.path.join(ROOT, "det_configs"))
    with pytest.raises(LocoError) as e:
        recipes.resolve("cpu_lcoo", "pretrain")
    assert "did you mean cpu_loco" in str(e.value) and "\n" not in str(e.value)
    # a missing path with folders is left to the tool's own message
    assert recipes.resolve("/nowhere/x.yaml", "pretrain") == "/nowhere/x.yaml"


def test_pretrain_by_name_from_another_folder(tmp_path, synth_root):
    out = tmp_path / "run"
    res = _loco_det("pretrain", "--config", "cpu_loco", f"DATA.ROOT={synth_root}/imagefolder/train",
                    "OPTIM.EPOCHS=1", "OPTIM.WARMUP_EPOCHS=0", "OPTIM.BATCH_SIZE=8",
                    "DATA.IMAGE_SIZE=32", "DATA.NUM_WORKERS=0", "--output-dir", str(out),
                    "--no-progress", cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["finished"]
    info = json.loads((out / "run_info.json").read_text())
    assert info["config_file"] == os.path.join(ROOT, "pretrain", "cpu_loco.yaml")
    assert "epoch 1/1" not in res.stderr   # --no-progress: no bar

    res = _loco_det("pretrain", "--config-file", "cpu_lcoo", "--output-dir", str(tmp_path / "x"),
                    cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "did you mean cpu_loco" in res.stderr


def test_unknown_keys_suggest_the_nearest(tmp_path):
    res = _loco_det("pretrain", "--config-file", "cpu_loco", "OPTIM.EPOCH=3", "--output-dir",
                    str(tmp_path / "x"), cwd=tmp_path)
    assert res.returncode == 1 and "did you mean OPTIM.EPOCHS?" in res.stderr, res.stderr
    res = _loco_det("train", "--config-file", "cpu_synth_coco_R18_FPN_frozen",
                    "SOLVER.MAX_ITERS=3", cwd=tmp_path)
    assert res.returncode == 1 and "did you mean SOLVER.MAX_ITER?" in res.stderr, res.stderr[-2000:]


def test_train_takes_key_equals_value_and_key_value(tmp_path):
    from loco_det.commands.train import split_overrides

    assert split_overrides(["MODEL.WEIGHTS=/x", "OUTPUT_DIR", "a=b", "SOLVER.MAX_ITER", "3",
                            "SEED=1"]) == ["MODEL.WEIGHTS", "/x", "OUTPUT_DIR", "a=b",
                                           "SOLVER.MAX_ITER", "3", "SEED", "1"]
    # MODEL.WEIGHTS=/x reaches the config: the run stops at the missing weights, not at the key
    res = _loco_det("train", "--config-file", "cpu_synth_coco_R18_FPN_frozen",
                    f"MODEL.WEIGHTS={tmp_path}/none.pkl", f"OUTPUT_DIR={tmp_path}/det",
                    cwd=tmp_path)
    assert res.returncode == 1
    assert "unknown config key" not in res.stderr
    assert f"{tmp_path}/none.pkl" in res.stderr, res.stderr[-2000:]


def test_one_architecture_list():
    from loco_det import ARCHS
    from loco_det.weights import resnet as convert
    from loco_det.pretrain import model, readout
    from loco_det.pretrain.config import get_cfg, validate

    assert {f"resnet{d}" for d in convert._LAYOUTS.values()} == set(ARCHS)
    assert model.ARCHS is ARCHS and readout.ARCHS is ARCHS
    cfg = get_cfg()
    cfg.MODEL.ARCH = "resnet152"
    validate(cfg)   # accepted by pretraining as by the converter


_HOLD = """
import sys, time
from loco_det.utils import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_run_folder_lock(tmp_path, capsys):
    folder = tmp_path / "run"
    holder = _holder(folder)
    try:
        with pytest.raises(LocoError) as e:
            with run_lock(folder):
                pass
        assert f"pid {holder.pid} on " in str(e.value) and "\n" not in str(e.value)
        # a second pretraining into the held folder stops at once, in one line
        res = _loco_det("pretrain", "--config-file", "cpu_loco", "--output-dir", str(folder),
                        cwd=tmp_path)
        assert res.returncode == 1, res.stderr[-2000:]
        assert res.stderr.strip().startswith(f"error: --output-dir {folder} is being written "
                                             f"by another run (pid {holder.pid} on ")
        # so does a detection run
        res = _loco_det("train", "--config-file", "cpu_synth_coco_R18_FPN_frozen",
                        f"OUTPUT_DIR={folder}", cwd=tmp_path)
        assert res.returncode == 1 and f"pid {holder.pid}" in res.stderr, res.stderr[-2000:]
    finally:
        holder.send_signal(signal.SIGKILL)   # dies holding the lock
        holder.wait()
    time.sleep(0.1)
    with run_lock(folder):   # a killed holder's lock is taken over
        pass
    assert f"taking over the lock of an ended run (pid {holder.pid} on" in capsys.readouterr().err
    assert not (tmp_path / ".run.lock").exists()   # an ended holder leaves no file
    with run_lock(folder):   # and a clean end leaves nothing to take over
        assert (tmp_path / ".run.lock").read_text().startswith(f"pid {os.getpid()} on ")
    assert "taking over" not in capsys.readouterr().err
    # a start that holds the lock but never makes its folder leaves no folder made for the lock
    deep = tmp_path / "new" / "er" / "run"
    with run_lock(deep):
        assert (tmp_path / "new" / "er" / ".run.lock").exists()
    assert not (tmp_path / "new").exists()


def test_a_refused_start_leaves_the_holders_lock(tmp_path):
    folder = tmp_path / "run"
    holder = _holder(folder)
    try:
        for _ in range(2):
            with pytest.raises(LocoError, match=f"pid {holder.pid} on "):
                with run_lock(folder):
                    pass
        assert (tmp_path / ".run.lock").read_text().startswith(f"pid {holder.pid} on ")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
