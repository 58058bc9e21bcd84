"""The CPU-scale study (`make study`, det_configs/grids/study.yaml). The full grid's jobs are
checked from its dry run (every method, three seeds, four protocols on both views, seeds paired
with pretraining); its `reduced` profile runs the same code path with a few images and
iterations (the fine-tuning protocols; tests/test_demo.py runs the frozen ones), two jobs at a
time, and its report must have a row for every method on every
protocol and the report tool's verdicts against random init."""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = "det_configs/grids/study.yaml"
METHODS = ("e2e", "gim", "loco", "supervised (trained here)", "random")
PROTOCOLS = ("cpu_study_coco_R18_FPN_frozen", "cpu_study_cityscapes_R18_FPN_frozen",
             "cpu_study_coco_R18_FPN_finetune_60", "cpu_study_cityscapes_R18_FPN_finetune_60")
# the reduced profile runs the fine-tuning protocols; the frozen ones run in the demo's test
REDUCED_PROTOCOLS = PROTOCOLS[2:]
VERDICTS = ("better", "worse", "not resolved")


def _tool(*args, timeout=1200):
    return subprocess.run([sys.executable, "tools/run_benchmark.py", GRID, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _opt(cmd, key):
    return cmd[cmd.index(key) + 1]


def test_full_study_grid_jobs(tmp_path):
    res = _tool("--dry-run", "--out", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    assert "# 102 jobs: 2 data, 12 pretrain, 15 readout, 12 convert, 60 detection, 1 report" \
        in res.stdout
    cmds = [shlex.split(l) for l in res.stdout.splitlines() if l and not l.startswith("#")]
    det = [c for c in cmds if c[1:4] == ["-m", "loco_det.cli", "train"]]
    for proto in PROTOCOLS:
        runs = [c for c in det if f"det_configs/{proto}.yaml" in c]
        assert len(runs) == 15
        for cmd in runs:
            label, seed = _opt(cmd, "LOCO_DET.LABEL"), _opt(cmd, "SEED")
            weights = _opt(cmd, "MODEL.WEIGHTS")
            if label == "random":
                assert weights == "" and _opt(cmd, "LOCO_DET.FROM_SCRATCH") == "True"
                if "finetune" in proto:   # random init trains the whole backbone
                    assert _opt(cmd, "MODEL.BACKBONE.FREEZE_AT") == "0"
            else:   # the backbone of pretraining seed S, read out with seed S
                assert weights.endswith(f"_seed{seed}.pkl")
            if "finetune_60" in proto:   # split S of the 60 labelled scenes
                assert _opt(cmd, "DATASETS.TRAIN").endswith(f"_train_60_seed{seed}',)")
        assert sorted((_opt(c, "LOCO_DET.LABEL"), _opt(c, "SEED")) for c in runs) == sorted(
            (m, str(s)) for m in ("e2e", "gim", "loco", "supervised", "random")
            for s in range(3))
    pre = [c for c in cmds if c[1:4] == ["-m", "loco_det.cli", "pretrain"]]
    assert len(pre) == 12 and all(
        any(a.endswith("loco_synth_pretrain/objects/train") for a in c) for c in pre)
    random_ro = [c for c in cmds if "--random-init" in c]
    assert sorted(_opt(c, "--seed") for c in random_ro) == ["0", "1", "2"]


def _make_n(*targets):
    """`make -n` with the install stamp taken as up to date (-o): nothing is installed, and no
    rule runs even when the Makefile is older than what it lists (GNU make remakes a makefile
    that is a target before a dry run)."""
    return subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.loco_det-installed",
                           *targets], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_make_study_runs_the_grid_two_jobs_at_a_time():
    res = _make_n("study")
    assert res.returncode == 0, res.stderr
    assert f"tools/run_benchmark.py {GRID} --jobs 2 --out runs/study" in res.stdout


def test_make_test_runs_everything_and_test_fast_leaves_out_slow():
    test, fast = _make_n("test").stdout.strip(), _make_n("test-fast").stdout.strip()
    assert test.endswith("-m pytest -q -n 2") and "-m \"not slow\"" not in test, test
    assert fast.endswith('-m pytest -q -n 2 -m "not slow"'), fast


def _section(md, title):
    return md.split(title, 1)[1].split("\n## ", 1)[0]


def _rows_under(section, name):
    """Table lines of the report's per-protocol tables ("### <protocol>") whose heading names
    `name`."""
    out = []
    for part in section.split("\n### ")[1:]:
        head, _, body = part.partition("\n")
        if name in head:
            out += [l for l in body.splitlines() if l.startswith("| ")]
    return out


@pytest.mark.slow
def test_reduced_study_reports_every_method_with_verdicts(tmp_path):
    out = tmp_path / "study"
    res = _tool("--profile", "reduced", "--jobs", "2", "--out", str(out))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "26 done" in res.stdout
    md = (out / "report.md").read_text()
    detection = _section(md, "## Detection")
    for proto in REDUCED_PROTOCOLS:
        for method in METHODS:
            rows = [r for r in _rows_under(detection, proto) if r.startswith(f"| {method} |")]
            assert len(rows) == 1, f"{method} on {proto}: {rows}"
            assert rows[0].endswith("| ok |") and re.search(r"\|\s*\d+\.\d+", rows[0]), rows[0]
    readout = _section(md, "## Linear readout")
    for method in METHODS:
        rows = [r for r in readout.splitlines() if r.startswith(f"| {method} |")]
        assert len(rows) == 1 and rows[0].endswith("| ok |"), rows
        assert len(re.findall(r"\|\s*\d+\.\d+", rows[0])) >= 4, rows   # res2..res5
    comparisons = _section(md, "## Comparisons")
    for proto in REDUCED_PROTOCOLS:
        for method in METHODS[:4]:
            rows = [r for r in _rows_under(comparisons, proto) if f"| {method} | random |" in r]
            assert len(rows) == 2, (method, proto, rows)   # APbb and APmk against random init
            assert all(any(f"| {v}" in r for v in VERDICTS) for r in rows), rows
    rows = [r for r in comparisons.splitlines() if "| supervised (trained here) | random |" in r
            and "| top-1 res5 |" in r]
    assert len(rows) == 1, rows
