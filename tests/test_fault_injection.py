"""Fault injection: kill the real tools (SIGKILL, SIGTERM, SIGINT) at random moments, resume each
time, and check that the final result equals an uninterrupted run and that no temporary or
partial file is left.

The kill moments are drawn fresh each run (printed in failure messages, so a failure can be
replayed); every other input is fixed. Each test starts several short processes on tiny data.
"""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_pretrain_data import make_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
RNG = random.Random()  # unseeded: new kill moments every run, reported on failure


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **extra)
    return env


def _wait_for(path, marker, proc, timeout=240):
    """Wait until `marker` appears in the file `path` (the process is past its start-up)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if os.path.exists(path) and marker in open(path, errors="replace").read():
            return True
        time.sleep(0.05)
    raise AssertionError(f"{marker!r} not seen in {path} within {timeout} s")


def _wait_for_torch(proc, timeout=120):
    """Wait until `proc` has started importing torch, i.e. runs the tool's `main` (every tool
    imports torch inside `run_tool`). Before that the Python interpreter itself is starting:
    a SIGINT there ends in CPython's own "init_import_site" traceback, which no Python program
    can catch, so only SIGKILL is sent that early."""
    deadline = time.time() + timeout
    maps = f"/proc/{proc.pid}/maps"
    while time.time() < deadline and proc.poll() is None:
        try:
            if "libtorch" in open(maps).read():
                return
        except OSError:  # the process ended between poll() and open()
            return
        time.sleep(0.01)


def kill_and_resume(cmd, workdir, marker, max_delay, env, rounds=SIGNALS, done_markers=()):
    """Start `cmd` once per signal in `rounds`, wait for `marker` in its output, sleep a random
    time in [0, max_delay] s, send the signal, and check how the process ended. Returns the
    history [(signal name, delay, returncode)] for failure messages."""
    history = []
    for sig in rounds:
        log = os.path.join(workdir, f"attempt{len(history)}.log")
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT)
        started = _wait_for(log, marker, proc)
        delay = RNG.uniform(0, max_delay)
        if started:
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(sig)
        rc = proc.wait(timeout=300)
        history.append((signal.Signals(sig).name, round(delay, 2), rc))
        text = open(log, errors="replace").read()
        assert "Traceback" not in text, (history, text[-3000:])
        if rc == 0:
            continue  # finished before the signal: a later round or the final run checks it
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL, (history, text[-2000:])
            continue
        if rc == -sig:
            # Only once the work is done and the handler is gone (interpreter shutdown) may a
            # signal end the process the default way.
            assert any(m in text for m in done_markers), (history, text[-3000:])
            continue
        # SIGTERM / SIGINT: one line saying what was kept and how to resume, exit 128 + signal
        lines = [l for l in text.splitlines() if l.startswith("interrupted by ")]
        assert len(lines) == 1, (history, text[-3000:])
        assert signal.Signals(sig).name in lines[0] and "resume with:" in lines[0], lines[0]
        assert rc == 128 + sig, (history, lines[0])
    return history


def no_temp_files(root):
    return [p for p in glob.glob(os.path.join(root, "**", ".tmp_*"), recursive=True)]


# ----------------------------------------------------------------------------- pretraining

PRETRAIN = ["SEED=123", "MODEL.METHOD=loco", "MODEL.ARCH=resnet18", "DATA.IMAGE_SIZE=32",
            "OPTIM.BATCH_SIZE=8", "OPTIM.EPOCHS=4", "OPTIM.WARMUP_EPOCHS=1",
            "DATA.NUM_WORKERS=0", "RUN.LOG_PERIOD=1", "RUN.CHECKPOINT_PERIOD=1"]


def test_pretraining_survives_kills_bit_identical(tmp_path):
    data = make_folder(tmp_path / "data" / "train", n_per_class=8)
    cmd = [sys.executable, os.path.join(TOOLS, "pretrain.py"), f"DATA.ROOT={data}", *PRETRAIN]
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(cmd + ["--output-dir", str(ref)], cwd=tmp_path, env=_env(), check=True,
                   capture_output=True)
    resumed = cmd + ["--output-dir", str(out), "--resume"]
    history = kill_and_resume(resumed, str(tmp_path), "global batch 8", 4.0, _env(),
                              rounds=SIGNALS + (signal.SIGTERM,),
                              done_markers=("finished: 8 steps", "already finished"))
    final = subprocess.run(resumed, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert final.returncode == 0, (history, final.stderr[-3000:])

    a = torch.load(ref / "checkpoint_last.pth", weights_only=True)
    b = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (8, 4)
    for part in ("encoder", "decoders"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (history, part, k)
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][k][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    sa = json.loads((ref / "summary.json").read_text())
    sb = json.loads((out / "summary.json").read_text())
    assert sa["param_sha256"] == sb["param_sha256"], history
    assert sa["final_losses"] == sb["final_losses"], history

    def losses(path):
        rows = [json.loads(l) for l in path.read_text().splitlines()]
        return [(r["step"], {k: v for k, v in r.items() if k.startswith("loss/")}) for r in rows]

    assert losses(ref / "metrics.jsonl") == losses(out / "metrics.jsonl"), history
    assert no_temp_files(str(out)) == [], history


# ----------------------------------------------------------------------------- conversion

def test_conversion_survives_kills_identical_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    ckpt = tmp_path / "checkpoint_last.pth"
    torch.save({"encoder": model.state_dict(), "method": "loco", "arch": "resnet18"}, ckpt)
    cmd = [sys.executable, os.path.join(TOOLS, "convert_to_detectron2.py"), str(ckpt)]
    subprocess.run(cmd + [str(tmp_path / "ref.pkl")], cwd=tmp_path, env=_env(), check=True,
                   capture_output=True)
    out = tmp_path / "out" / "w.pkl"
    out.parent.mkdir()
    # A temporary file that a SIGKILLed earlier conversion left (pid 2**22 + 1 is above Linux's
    # pid_max default, so no live process has it): the next run of the tool removes it.
    from loco_det.utils import temp_prefix

    stale = out.parent / (temp_prefix(str(out), pid=2 ** 22 + 1) + "abc")
    stale.write_bytes(b"partial")
    history = []
    for sig in SIGNALS + (signal.SIGKILL,):
        # The conversion itself takes a fraction of a second after ~3 s of imports: SIGKILL
        # anywhere in the whole run; SIGTERM/SIGINT anywhere once the tool's own code runs.
        proc = subprocess.Popen(cmd + [str(out)], cwd=tmp_path, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if sig != signal.SIGKILL:
            _wait_for_torch(proc)
        delay = RNG.uniform(0, 6.0)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        history.append((signal.Signals(sig).name, round(delay, 2), proc.returncode))
        assert "Traceback" not in err, (history, err[-3000:])
        if sig != signal.SIGKILL and proc.returncode == 128 + sig:  # interrupted: one line
            lines = [l for l in err.splitlines() if l.startswith("interrupted by ")]
            assert len(lines) == 1 and signal.Signals(sig).name in lines[0], (history, err)
        if out.exists():  # whatever is under the real name is a whole, identical file
            assert out.read_bytes() == (tmp_path / "ref.pkl").read_bytes(), history
    final = subprocess.run(cmd + [str(out)], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True)
    assert final.returncode == 0, (history, final.stderr[-2000:])
    assert out.read_bytes() == (tmp_path / "ref.pkl").read_bytes(), history
    assert os.listdir(out.parent) == ["w.pkl"], (history, os.listdir(out.parent))


# ----------------------------------------------------------------------------- detection

DET_FAST = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST",
            "96", "SOLVER.WARMUP_ITERS", "1", "SOLVER.MAX_ITER", "10", "SOLVER.CHECKPOINT_PERIOD",
            "2", "SEED", "1", "DATALOADER.NUM_WORKERS", "0"]


def test_detection_survives_kills_same_final_state(tmp_path, synth_root):
    import torchvision

    from loco_det.detection import convert

    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoint_last.pth"
    torch.save({"encoder": torchvision.models.resnet18().state_dict(), "method": "loco",
                "arch": "resnet18"}, ckpt)
    weights = tmp_path / "w.pkl"
    convert.convert(str(ckpt), str(weights))
    env = _env(DETECTRON2_DATASETS=os.fspath(synth_root.parent))
    config = os.path.join(REPO, "det_configs", "cpu_synth_coco_R18_FPN_frozen.yaml")

    def cmd(out, resume):
        return [sys.executable, os.path.join(TOOLS, "train_net.py"), "--config-file", config,
                *(["--resume"] if resume else []), "MODEL.WEIGHTS", str(weights),
                "OUTPUT_DIR", str(out), *DET_FAST]

    ref, out = tmp_path / "ref", tmp_path / "out"
    proc = subprocess.run(cmd(ref, False), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = kill_and_resume(cmd(out, True), str(tmp_path), "Starting training from iteration",
                              5.0, env, done_markers=("results.json written",))
    final = subprocess.run(cmd(out, True), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert final.returncode == 0, (history, final.stderr[-3000:])

    a = torch.load(ref / "model_final.pth", weights_only=True)
    b = torch.load(out / "model_final.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 9, history
    assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in b["model"].items()}
    # Detectron2's TrainingSampler restarts its stream on resume, so the trained heads see other
    # batches than in one go; the frozen backbone must be bit-identical (and all finite).
    frozen = [k for k in a["model"] if k.startswith("backbone.bottom_up.")]
    assert frozen and all(torch.equal(a["model"][k], b["model"][k]) for k in frozen), history
    assert all(torch.isfinite(v).all() for v in b["model"].values() if v.is_floating_point())
    assert json.loads((out / "results.json").read_text())["finished"] is True
    # every checkpoint under its real name is whole, and last_checkpoint names one of them
    for path in out.glob("model_*.pth"):
        torch.load(path, weights_only=True)
    assert (out / (out / "last_checkpoint").read_text().strip()).is_file()
    assert no_temp_files(str(out)) == [], history


# ----------------------------------------------------------------------------- benchmark grid

GRID = """\
name: fault
vars: {{datasets: "{{out}}/datasets", data: "{{datasets}}/loco_synth"}}
env: {{DETECTRON2_DATASETS: "{{datasets}}"}}
data:
  - name: loco_synth
    command: [python, tools/make_synthetic_data.py, --out, "{{data}}", --num-train, "16",
              --num-val, "8", --size, "48x48", --no-progress]
    creates: "{{data}}/meta.json"
pretrain:
  - methods: [loco]
    recipe: "cpu_{{method}}.yaml"
    label: "{{method}}"
    seeds: [0]
    overrides: ["DATA.ROOT={{data}}/imagefolder/train", OPTIM.EPOCHS=3, OPTIM.BATCH_SIZE=8,
                DATA.IMAGE_SIZE=32, DATA.NUM_WORKERS=0, RUN.CHECKPOINT_PERIOD=1]
readout:
  random_init: {{arch: resnet18}}
  args: [--data, "{{data}}/imagefolder", --seed, "{{seed}}", --epochs, "3", --workers, "0",
         --no-progress]
detection: {{supervised_weights: null, configs: []}}
"""


def _grid_results(out):
    """What the grid computed: pretraining weights hash, readout accuracies, converted arrays."""
    summary = json.loads((out / "pretrain" / "loco" / "seed0" / "summary.json").read_text())
    readouts = {p.parent.name: json.loads(p.read_text())["top1"]
                for p in sorted(out.glob("readout/**/readout.json"))}
    from loco_det.detection.checkpoint import safe_load_pkl

    # the converted arrays (its metadata names the source path, which differs between grids)
    weights = {k: v.tobytes() for k, v in
               safe_load_pkl(out / "weights" / "loco_seed0.pkl")["model"].items()}
    return summary["param_sha256"], summary["final_losses"], readouts, weights


def test_benchmark_grid_survives_kills_same_results(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format())
    cmd = [sys.executable, os.path.join(TOOLS, "run_benchmark.py"), str(grid), "-q"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    proc = subprocess.run(cmd + ["--out", str(ref)], cwd=REPO, env=_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    history = []
    for sig in SIGNALS:
        # kill the grid runner at a random moment; its running job is stopped with it
        proc = subprocess.Popen(cmd + ["--out", str(out)], cwd=REPO, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        delay = RNG.uniform(1.0, 25.0)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
        err = proc.communicate(timeout=120)[1]
        history.append((signal.Signals(sig).name, round(delay, 2), proc.returncode))
        assert "Traceback" not in err, (history, err[-3000:])
        if proc.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            lines = [l for l in err.splitlines() if l.startswith("interrupted by ")]
            assert len(lines) == 1 and "resume with:" in lines[0], (history, err[-2000:])
        time.sleep(0.5)  # a job stopped by its parent's death finishes exiting
    final = subprocess.run(cmd + ["--out", str(out)], cwd=REPO, env=_env(), capture_output=True,
                           text=True)
    assert final.returncode == 0, (history, final.stdout[-3000:] + final.stderr[-3000:])
    assert _grid_results(ref) == _grid_results(out), history
    assert (out / "report.md").is_file()
    assert no_temp_files(str(out)) == [], history
