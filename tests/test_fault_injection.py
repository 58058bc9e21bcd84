"""Fault injection: kill the real tools (SIGKILL, SIGTERM, SIGINT) mid-run, resume each time,
and check that the final result equals an uninterrupted run and that no temporary or partial
file is left.

Every kill is sure to land mid-run: a round waits for an event of the run (a logged step, a
checkpoint file, a job's partial output), the point it waits for is drawn from a seeded
generator ($LOCO_DET_FAULT_SEED, default below; printed in every failure message), and the test
asserts that at the signal the process still ran, its run was unfinished and a checkpoint or
partial state existed. Every subprocess has a time limit.
"""
import glob
import json
import os
import random
import shutil
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
SEED = int(os.environ.get("LOCO_DET_FAULT_SEED", "20261203"))
LIMIT = 600   # seconds any one process may take


def _rng(test):
    """The kill points' generator of one test: replay with LOCO_DET_FAULT_SEED=<seed>."""
    return random.Random(f"{SEED}:{test}")


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **extra)
    return env


def _run(cmd, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT, **kwargs)


def _wait_until(condition, proc, what, history, timeout=LIMIT):
    """Poll `condition()` until true; the process ending first fails the round (the kill would
    have come after the run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"seed {SEED}: the process ended (exit {proc.returncode}) "
                                 f"before {what}; history {history}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"seed {SEED}: {what} not seen within {timeout} s; history {history}")


def _check_ending(sig, rc, text, history, hint="resume with:"):
    """How a process stopped mid-run by `sig` must end: SIGKILL kills it; SIGTERM/SIGINT give
    one line saying what was kept and how to resume (`hint`), and exit 128 + signal."""
    assert "Traceback" not in text, (SEED, history, text[-3000:])
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL, (SEED, history, text[-2000:])
        return
    lines = [l for l in text.splitlines() if l.startswith("interrupted by ")]
    assert len(lines) == 1, (SEED, history, text[-3000:])
    assert signal.Signals(sig).name in lines[0] and hint in lines[0], lines[0]
    assert rc == 128 + sig, (SEED, history, lines[0])


def kill_mid_run(cmd, workdir, env, sig, reached, partial, finished, history, what, cwd=None):
    """Start `cmd`, wait until `reached()` (the kill point), check that the process runs, the
    run is unfinished (`finished()` false) and its partial state exists (`partial()`), send
    `sig`, and check how it ended. Returns the attempt's log text."""
    log = os.path.join(workdir, f"attempt{len(history)}.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd or workdir, env=env, stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        # the kill point, with what the run keeps of it (a step is logged before it is saved)
        _wait_until(lambda: reached() and partial(), proc, what, history)
        assert proc.poll() is None and not finished(), (SEED, history, what)
        assert partial(), (SEED, history, what, "no checkpoint or partial state")
        proc.send_signal(sig)
        rc = proc.wait(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    history.append((signal.Signals(sig).name, what, rc))
    text = open(log, errors="replace").read()
    _check_ending(sig, rc, text, history)
    assert not finished(), (SEED, history, "the run finished although killed")
    return text


def no_temp_files(root):
    return [p for p in glob.glob(os.path.join(root, "**", ".tmp_*"), recursive=True)]


# ----------------------------------------------------------------------------- pretraining

# 16 images, global batch 8: 2 steps per epoch, 12 steps; a checkpoint after every step.
PRETRAIN = ["SEED=123", "MODEL.METHOD=loco", "MODEL.ARCH=resnet18", "DATA.IMAGE_SIZE=32",
            "OPTIM.BATCH_SIZE=8", "OPTIM.EPOCHS=6", "OPTIM.WARMUP_EPOCHS=1",
            "DATA.NUM_WORKERS=0", "RUN.LOG_PERIOD=1", "RUN.CHECKPOINT_PERIOD=1"]


def _logged_step(out):
    """The highest step in metrics.jsonl (-1 before the first); a line being written is skipped."""
    steps = [-1]
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except ValueError:
                pass
    return max(steps)


def _resumed_at(text):
    found = [int(l.rsplit("resuming at step ", 1)[1]) for l in text.splitlines()
             if "resuming at step " in l]
    return found[0] if found else 0


@pytest.mark.slow
def test_pretraining_survives_kills_bit_identical(tmp_path):
    rng = _rng("pretrain")
    data = make_folder(tmp_path / "data" / "train", n_per_class=8)
    cmd = [sys.executable, os.path.join(TOOLS, "pretrain.py"), f"DATA.ROOT={data}", *PRETRAIN]
    ref, out = tmp_path / "ref", tmp_path / "out"
    proc = _run(cmd + ["--output-dir", str(ref)], cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = cmd + ["--output-dir", str(out), "--resume"]
    history, kept = [], 0
    for i, sig in enumerate(SIGNALS + (signal.SIGTERM,)):
        # a step this attempt logs itself (steps 2-10 of 12): seeded, later than any logged yet
        target = max(rng.randint(2 + 2 * i, 3 + 2 * i), _logged_step(out) + 1)
        text = kill_mid_run(resumed, str(tmp_path), _env(), sig,
                            reached=lambda: _logged_step(out) >= target,
                            partial=lambda: (out / "checkpoint_last.pth").exists(),
                            finished=lambda: (out / "summary.json").exists(),
                            history=history, what=f"step {target} logged")
        # each attempt continued from the last one's checkpoint, not from step 0
        assert _resumed_at(text) == kept, (SEED, history, text[-2000:])
        kept = torch.load(out / "checkpoint_last.pth", weights_only=True)["step"]
        assert target - 1 <= kept < 12, (SEED, history, kept)
    final = _run(resumed, cwd=tmp_path, env=_env())
    assert final.returncode == 0, (SEED, history, final.stderr[-3000:])
    assert _resumed_at(final.stdout) == kept, (SEED, history, final.stdout[-2000:])

    a = torch.load(ref / "checkpoint_last.pth", weights_only=True)
    b = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (12, 6)
    for part in ("encoder", "decoders"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (SEED, history, part, k)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][k][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    sa = json.loads((ref / "summary.json").read_text())
    sb = json.loads((out / "summary.json").read_text())
    assert sa["param_sha256"] == sb["param_sha256"], (SEED, history)
    assert sa["final_losses"] == sb["final_losses"], (SEED, history)

    def losses(path):
        rows = [json.loads(l) for l in path.read_text().splitlines()]
        return [(r["step"], r["lr"], {k: v for k, v in r.items() if k.startswith("loss/")})
                for r in rows]

    assert losses(ref / "metrics.jsonl") == losses(out / "metrics.jsonl"), (SEED, history)
    assert no_temp_files(str(out)) == [], (SEED, history)


# ----------------------------------------------------------------------------- conversion

def test_conversion_survives_kills_identical_file(tmp_path):
    """The conversion itself takes a fraction of a second after seconds of imports: each kill
    lands once the tool's code runs (torch loaded), before the converted file exists."""
    import torchvision

    rng = _rng("conversion")
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    ckpt = tmp_path / "checkpoint_last.pth"
    torch.save({"encoder": model.state_dict(), "method": "loco", "arch": "resnet18"}, ckpt)
    cmd = [sys.executable, os.path.join(TOOLS, "convert_to_detectron2.py"), str(ckpt)]
    proc = _run(cmd + [str(tmp_path / "ref.pkl")], cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out" / "w.pkl"
    out.parent.mkdir()
    # A temporary file that a SIGKILLed earlier conversion left (pid 2**22 + 1 is above Linux's
    # pid_max default, so no live process has it): the next run of the tool removes it.
    from loco_det.utils import temp_prefix

    stale = out.parent / (temp_prefix(str(out), pid=2 ** 22 + 1) + "abc")
    stale.write_bytes(b"partial")
    history = []
    for sig in SIGNALS + (signal.SIGKILL,):
        proc = subprocess.Popen(cmd + [str(out)], cwd=tmp_path, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            maps = f"/proc/{proc.pid}/maps"
            _wait_until(lambda: "libtorch" in open(maps).read(), proc, "torch loaded", history)
            # seeded: at once, or after a few of the imports that follow torch
            delay = round(rng.uniform(0, 0.2), 3)
            time.sleep(delay)
            assert proc.poll() is None and not out.exists(), (SEED, history, delay)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=LIMIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        history.append((signal.Signals(sig).name, delay, proc.returncode))
        if proc.returncode == 0:
            raise AssertionError(f"seed {SEED}: the conversion finished before the signal; "
                                 f"history {history}")
        if sig == signal.SIGTERM and proc.returncode == -signal.SIGTERM:
            # before the conversion's own handler (installed around the conversion, after the
            # imports) SIGTERM ends the process the default way: nothing written, nothing said
            assert err == "" and not out.exists(), (SEED, history, err[-2000:])
        else:   # a short tool has nothing to resume: the line says to rerun it
            _check_ending(sig, proc.returncode, err, history, hint="rerun the same command")
        if out.exists():  # whatever is under the real name is a whole, identical file
            assert out.read_bytes() == (tmp_path / "ref.pkl").read_bytes(), (SEED, history)
    final = _run(cmd + [str(out)], cwd=tmp_path, env=_env())
    assert final.returncode == 0, (SEED, history, final.stderr[-2000:])
    assert out.read_bytes() == (tmp_path / "ref.pkl").read_bytes(), (SEED, history)
    assert os.listdir(out.parent) == ["w.pkl"], (SEED, history, os.listdir(out.parent))


# ----------------------------------------------------------------------------- detection

DET_FAST = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST",
            "96", "SOLVER.WARMUP_ITERS", "1", "SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "(6,)",
            "SOLVER.CHECKPOINT_PERIOD", "2", "SEED", "1", "DATALOADER.NUM_WORKERS", "0"]


def _kept(out):
    """The checkpoint `last_checkpoint` names (what a resume starts from), loaded."""
    name = (out / "last_checkpoint").read_text().strip()
    return name, torch.load(out / name, weights_only=True)


def _started_at(text):
    """The iteration Detectron2 says it starts from (the line may be printed more than once)."""
    found = {int(l.rsplit("Starting training from iteration ", 1)[1].split()[0])
             for l in text.splitlines() if "Starting training from iteration " in l}
    assert len(found) == 1, text[-2000:]
    return found.pop()


def _optimizer(ckpt):
    """The optimizer state in a Detectron2 checkpoint (DefaultTrainer keeps it in its
    SimpleTrainer's state)."""
    trainer = ckpt["trainer"]
    return trainer["_trainer"]["optimizer"] if "_trainer" in trainer else trainer["optimizer"]


def _scheduler(ckpt):
    """The LR scheduler state in a Detectron2 checkpoint (its LRScheduler hook's)."""
    hooks = ckpt["trainer"]["hooks"]
    return next(v for k, v in hooks.items() if k.endswith("LRScheduler"))


def _assert_same_state(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), (what, k)
        elif isinstance(a[k], dict):
            _assert_same_state(a[k], b[k], f"{what}.{k}")
        else:
            assert a[k] == b[k], (what, k)


@pytest.mark.slow
@pytest.mark.parametrize("freeze_at,rounds", [(2, (signal.SIGKILL, signal.SIGTERM)),
                                              (0, (signal.SIGINT, signal.SIGKILL))])
def test_detection_finetuning_survives_kills(tmp_path, synth_env, pkl_r18, freeze_at, rounds):
    """Fine-tuning (FREEZE_AT 2: res2 and up train; 0: the whole backbone) killed at seeded
    checkpoints and resumed. Up to the first kill the run is the uninterrupted one bit for bit;
    each resume starts right after the checkpoint it loads, with that checkpoint's weights,
    optimizer state values, LR scheduler state and iteration; the final iteration, LR schedule
    position and optimizer settings equal the uninterrupted run's.

    What differs: the weights trained after a resume. Detectron2 does not checkpoint its data
    stream or random generators: on resume its TrainingSampler restarts its shuffled stream and
    the augmentation and proposal-sampling generators are seeded afresh, so later iterations see
    other batches and samples than in one go. Only parameters that never train stay equal."""
    from loco_det.detection.config import apply_single_process_norm, setup_cfg
    from loco_det.detection.train import Trainer

    rng = _rng(f"detection{freeze_at}")
    env = _env(DETECTRON2_DATASETS=os.fspath(synth_env.parent))
    config = os.path.join(REPO, "det_configs", "cpu_synth_coco_R18_FPN_finetune.yaml")

    def cmd(out, resume):
        return [sys.executable, os.path.join(TOOLS, "train_net.py"), "--config-file", config,
                *(["--resume"] if resume else []), "MODEL.WEIGHTS", str(pkl_r18),
                "OUTPUT_DIR", str(out), "MODEL.BACKBONE.FREEZE_AT", str(freeze_at), *DET_FAST]

    ref, out = tmp_path / "ref", tmp_path / "out"
    proc = _run(cmd(ref, False), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # kill after checkpoint 1, 3 or 5 (of 1, 3, 5, 7 and final at 9), in order
    targets = sorted(rng.sample([1, 3, 5], len(rounds)))
    history, start = [], 0
    for sig, target in zip(rounds, targets):
        name = f"model_{target:07d}.pth"
        text = kill_mid_run(cmd(out, True), str(tmp_path), env, sig,
                            reached=lambda: (out / "last_checkpoint").exists()
                            and (out / "last_checkpoint").read_text().strip() >= name,
                            partial=lambda: (out / name).exists(),
                            finished=lambda: (out / "model_final.pth").exists(),
                            history=history, what=f"{name} written")
        assert _started_at(text) == start, (SEED, history, text[-2000:])
        kept_name, kept = _kept(out)
        assert kept["iteration"] >= target, (SEED, history, kept_name)
        if not start:   # the first attempt is the uninterrupted run, bit for bit
            _assert_same_state(torch.load(ref / kept_name, weights_only=True), kept, kept_name)
        start = kept["iteration"] + 1

    # What the next resume loads: the tool's Trainer, resumed here in-process, holds exactly the
    # kept checkpoint's weights, optimizer state values, scheduler state and next iteration.
    cfg = setup_cfg(str(out / "config.yaml"), ["MODEL.DEVICE", "cpu"])
    cfg.defrost()
    apply_single_process_norm(cfg, 1)
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    kept_name, kept = _kept(out)
    assert trainer.start_iter == start == kept["iteration"] + 1
    _assert_same_state(kept["model"], trainer.model.state_dict(), "model")
    # Detectron2 keeps the optimizer and the LR scheduler hook's state in the trainer's
    _assert_same_state(kept["trainer"], trainer.state_dict(), "trainer")
    assert _optimizer(kept)["state"], "no optimizer state was kept"
    assert _scheduler(kept)["last_epoch"] == kept["iteration"] + 1
    del trainer

    final = _run(cmd(out, True), cwd=tmp_path, env=env)
    assert final.returncode == 0, (SEED, history, final.stderr[-3000:])
    assert _started_at(final.stdout + final.stderr) == start
    a = torch.load(ref / "model_final.pth", weights_only=True)
    b = torch.load(out / "model_final.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 9, (SEED, history)
    _assert_same_state(_scheduler(a), _scheduler(b), "scheduler")   # the LR schedule position
    assert _optimizer(a)["param_groups"] == _optimizer(b)["param_groups"]   # lr and settings
    assert _optimizer(a)["state"].keys() == _optimizer(b)["state"].keys()
    for k, state in _optimizer(a)["state"].items():
        assert {n: v.shape for n, v in state.items()} == \
            {n: v.shape for n, v in _optimizer(b)["state"][k].items()}
    assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in b["model"].items()}
    # never trained: FREEZE_AT 2's stem and res2 (FREEZE_AT 0 trains the whole backbone)
    frozen = [k for k in a["model"] if freeze_at == 2 and k.startswith(
        ("backbone.bottom_up.stem.", "backbone.bottom_up.res2."))]
    assert frozen or freeze_at == 0
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in frozen), (SEED, history)
    assert all(torch.isfinite(v).all() for v in b["model"].values() if v.is_floating_point())
    assert json.loads((out / "results.json").read_text())["finished"] is True
    for path in out.glob("model_*.pth"):   # every checkpoint under its real name is whole
        torch.load(path, weights_only=True)
    assert no_temp_files(str(out)) == [], (SEED, history)


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
    overrides: ["DATA.ROOT={{data}}/imagefolder/train", OPTIM.EPOCHS=5, OPTIM.BATCH_SIZE=8,
                DATA.IMAGE_SIZE=32, DATA.NUM_WORKERS=0, RUN.CHECKPOINT_PERIOD=1,
                RUN.LOG_PERIOD=1]
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
    from loco_det.weights.safe_load import load_pkl as safe_load_pkl

    # the converted arrays (its metadata names the source path, which differs between grids)
    weights = {k: v.tobytes() for k, v in
               safe_load_pkl(out / "weights" / "loco_seed0.pkl")["model"].items()}
    return summary["param_sha256"], summary["final_losses"], readouts, weights


@pytest.mark.slow
def test_benchmark_grid_survives_kills_same_results(tmp_path):
    """The grid runner killed three times while its pretraining job runs (at seeded logged
    steps, each later than the last); the job it stopped resumes from its checkpoint and the
    results equal a grid run in one go. (The readout, a few seconds here, is too short to be
    sure a kill lands inside it on a loaded machine.)"""
    rng = _rng("grid")
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format())
    cmd = [sys.executable, os.path.join(TOOLS, "run_benchmark.py"), str(grid), "-q"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    proc = _run(cmd + ["--out", str(ref)], cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pre = out / "pretrain" / "loco" / "seed0"
    history = []
    # 16 images, batch 8, 5 epochs: steps 1-10 of pretraining; kills at 1-2, 4-5, 7-8
    for i, sig in enumerate(SIGNALS):
        target = max(rng.randint(1 + 3 * i, 2 + 3 * i), _logged_step(pre) + 1)
        kill_mid_run(cmd + ["--out", str(out)], str(tmp_path), _env(), sig,
                     reached=lambda: _logged_step(pre) >= target,
                     partial=lambda: (pre / "checkpoint_last.pth").exists(),
                     finished=lambda: (pre / "summary.json").exists(), history=history,
                     what=f"pretraining step {target} logged", cwd=REPO)
        assert not list(out.glob("readout/**/readout.json")), (SEED, history)
    final = _run(cmd + ["--out", str(out)], cwd=REPO, env=_env())
    assert final.returncode == 0, (SEED, history, final.stdout[-3000:] + final.stderr[-3000:])
    # the stopped job resumed from its checkpoint; the others ran once
    assert _grid_results(ref) == _grid_results(out), (SEED, history)
    assert (out / "report.md").is_file()
    assert no_temp_files(str(out)) == [], (SEED, history)
