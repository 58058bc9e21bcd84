"""The CPU-scale study (`make study`): the digits grid's `study` profile, the embedded-data grid
(det_configs/grids/study.yaml), then one report over both. The full grids' jobs are checked
from their expansion (methods, seeds, data, seeds paired with pretraining); the reduced profiles
run the same commands as `make study`, two jobs at a time: the one report must name each
comparison's data set and give every method its verdict against random init, and the two seeds
of loco and random init on the embedded track must pool into one row each."""
import csv
import json
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = "det_configs/grids/study.yaml"
PROTOCOL = "cpu_study_coco_R18_FPN_frozen"
VERDICTS = ("better", "worse", "not resolved")
# (method, seeds) of the embedded track; gim runs in the digits track only
EMBEDDED = {"e2e": range(4), "loco": range(3), "supervised": range(2)}


def _run(argv, timeout=1200):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _opt(cmd, key):
    return cmd[cmd.index(key) + 1]


def test_full_study_grid_jobs(tmp_path):
    res = _run(["tools/run_benchmark.py", GRID, "--dry-run", "--out", str(tmp_path / "s")])
    assert res.returncode == 0, res.stderr
    assert "# 48 jobs: 2 data, 9 pretrain, 14 readout, 9 convert, 13 detection, 1 report" \
        in res.stdout
    cmds = [shlex.split(l) for l in res.stdout.splitlines() if l and not l.startswith("#")]
    data = [c for c in cmds if "tools/make_synthetic_data.py" in c]
    assert len(data) == 2 and all(_opt(c, "--typical-surfaces") == "0.8" for c in data)
    pretrain_root = str(tmp_path / "s" / "datasets" / "loco_synth_pretrain")
    assert _opt(next(c for c in data if pretrain_root in c), "--num-train") == "3000"

    pre = [c for c in cmds if c[1:4] == ["-m", "loco_det.cli", "pretrain"]]
    assert sorted((_opt(c, "--config-file").split("/")[-1],
                   next(a for a in c if a.startswith("SEED="))[5:]) for c in pre) == sorted((f"cpu_{m}.yaml", str(s))
                                          for m, seeds in EMBEDDED.items() for s in seeds)
    for c in pre:
        assert f"DATA.ROOT={pretrain_root}/objects/train" in c
        if "supervised" not in " ".join(c):   # the contrastive rules: 5 epochs of 32
            assert "OPTIM.EPOCHS=5" in c and "OPTIM.BATCH_SIZE=32" in c, c

    readouts = [c for c in cmds if "readout" in c[1:5]]
    assert len(readouts) == 14
    assert all(_opt(c, "--data") == f"{pretrain_root}/objects" for c in readouts)
    assert sorted(_opt(c, "--seed") for c in readouts if "--random-init" in c) == \
        [str(s) for s in range(5)]

    det = [c for c in cmds if c[1:4] == ["-m", "loco_det.cli", "train"]]
    assert all(f"det_configs/{PROTOCOL}.yaml" in c for c in det)
    for cmd in det:
        label, seed = _opt(cmd, "LOCO_DET.LABEL"), _opt(cmd, "SEED")
        weights = _opt(cmd, "MODEL.WEIGHTS")
        if label == "random":
            assert weights == "" and _opt(cmd, "LOCO_DET.FROM_SCRATCH") == "True"
        else:   # the backbone of pretraining seed S, trained with detection seed S
            assert weights.endswith(f"{label}_seed{seed}.pkl")
    assert sorted((_opt(c, "LOCO_DET.LABEL"), _opt(c, "SEED")) for c in det) == sorted(
        [(m, str(s)) for m, seeds in EMBEDDED.items() for s in seeds]
        + [("random", str(s)) for s in range(4)])


def test_the_study_profile_of_the_digits_grid_is_five_seeds_of_every_rule(tmp_path):
    from loco_det import grid as benchmark

    grid = benchmark.load_grid(os.path.join(ROOT, "det_configs", "grids", "digits.yaml"),
                               profile="study")
    jobs, _, _ = benchmark.expand(grid, str(tmp_path / "out"))
    pre = [j for j in jobs if j.stage == "pretrain"]
    assert {(j.label, j.seed) for j in pre} == {(m, s) for m in ("e2e", "gim", "loco")
                                                for s in range(5)}
    assert all("OPTIM.EPOCHS=10" in j.argv and "OPTIM.BATCH_SIZE=32" in j.argv for j in pre)
    for stage in ("readout", "knn"):
        assert {(j.label, j.seed) for j in jobs if j.stage == stage} == \
            {(j.label, j.seed) for j in pre} | {("random", s) for s in range(5)}


def _make_n(*targets):
    """`make -n` with the install stamp taken as up to date (-o): nothing is installed, and no
    rule runs even when the Makefile is older than what it lists (GNU make remakes a makefile
    that is a target before a dry run)."""
    # without the calling make's variables: `make test PYTEST_ARGS=...` passes them down
    # through MAKEFLAGS, and they would change what this make prints
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.loco_det-installed",
                           *targets], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


# what `make study` runs, in order (tests/test_study.py runs them with --profile reduced)
STUDY_COMMANDS = [
    "-m loco_det.cli grid digits --profile study --jobs 2 --output-dir runs/study/digits",
    f"tools/run_benchmark.py {GRID} --jobs 2 --out runs/study/embedded",
    "-m loco_det.cli report runs/study/digits runs/study/embedded --output-dir runs/study",
]


def test_make_study_runs_both_tracks_two_jobs_at_a_time_then_one_report():
    res = _make_n("study")
    assert res.returncode == 0, res.stderr
    lines = [l.split("python", 1)[1].strip() for l in res.stdout.splitlines() if "python" in l]
    assert lines == STUDY_COMMANDS, res.stdout


def test_make_test_runs_everything_and_test_fast_leaves_out_slow():
    test, fast = _make_n("test").stdout.strip(), _make_n("test-fast").stdout.strip()
    assert test.endswith("-m pytest -q -n 2") and "-m \"not slow\"" not in test, test
    assert fast.endswith('-m pytest -q -n 2 -m "not slow"'), fast


@pytest.mark.slow
def test_reduced_study_reports_both_tracks_and_pools_two_seeds(tmp_path):
    """`make study`'s three steps with the reduced profiles, two jobs at a time, then the
    embedded grid once more (it resumes like any grid). One test, not two sharing a fixture:
    pytest-xdist could hand two tests to two workers, and each would run the whole study."""
    out = tmp_path / "study"
    steps = [["-m", "loco_det.cli", "grid", "digits", "--profile", "reduced", "--jobs", "2",
              "--output-dir", str(out / "digits")],
             ["tools/run_benchmark.py", GRID, "--profile", "reduced", "--jobs", "2",
              "--out", str(out / "embedded")],
             ["-m", "loco_det.cli", "report", str(out / "digits"), str(out / "embedded"),
              "--output-dir", str(out)]]
    results = [_run(argv) for argv in steps]
    for argv, res in zip(steps, results):
        assert res.returncode == 0, argv[:4] + [res.stdout[-3000:], res.stderr[-3000:]]
    again = _run(steps[1])
    _check_both_tracks_with_their_data_sets(out, results, again)
    _check_two_seeds_pool_into_one_row_per_method(out / "embedded")


def _check_both_tracks_with_their_data_sets(out, results, again):
    assert "summary: 23 jobs" in results[1].stdout and "23 done, 0 skipped" in results[1].stdout
    # it resumes like any grid: only the report runs again
    assert "1 done, 22 skipped, 0 failed" in again.stdout, again.stdout[-2000:]

    summary = _summary(out / "report.md")
    head = next(l for l in summary.splitlines() if l.startswith("| method |"))
    for column in ("embedded, COCO view: cpu_study_coco_R18_FPN_frozen, APbb",
                   "digits: readout (small, resnet18, 32 px), top-1 res5",
                   "embedded objects: readout (small, resnet18, 32 px), top-1 res5"):
        assert f"| {column} |" in head, head
    rows = [r for r in _csv(out / "comparisons.csv") if r["vs"] == "random"]
    found = {(r["kind"], r["dataset"], r["metric"], r["method"]) for r in rows}
    expected = {("readout", "digits", m, rule) for rule in ("e2e", "gim", "loco")
                for m in ("top1/res5", "knn/k20/res5", "knn/k200/res5")}
    expected |= {("readout", "embedded objects", "top1/res5", rule)
                 for rule in ("e2e", "loco", "supervised (trained here)")}
    expected |= {("detection", "embedded, COCO view", m, rule) for m in ("APbb", "APmk")
                 for rule in ("e2e", "loco", "supervised (trained here)")}
    assert expected <= found, sorted(expected - found)
    # no gim on the embedded data, and no row without its data set
    assert not any(r["method"] == "gim" and r["dataset"] != "digits" for r in rows)
    assert all(r["dataset"] in ("digits", "embedded objects", "embedded, COCO view")
               for r in rows), {r["dataset"] for r in rows}
    for r in rows:
        assert r["verdict"].startswith(VERDICTS), r
        if r["dataset"] == "digits":   # one seed (the pooling of two: checked below)
            assert r["n_a"] == r["n_b"] == "1" and r["verdict"] == "not resolved (1 run)", r


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _summary(report_md):
    """The report's Summary section."""
    return report_md.read_text().split("## Summary")[1].split("\n## ")[0]


# A real multi-seed chain: on the embedded track, loco and random init run seeds 0 and 1
# through pretraining, readout and frozen Mask R-CNN (detection seed S on the backbone of
# pretraining seed S). The report must pool each method's two seeds into one row (one
# fingerprint, n = 2, both seeds listed) and compare them with intervals, not "1 run": a
# seed-dependent setting leaking into a fingerprint (loco_det/fingerprint.py) would split every
# such row into two rows of n = 1.
def _check_two_seeds_pool_into_one_row_per_method(out):
    rows = _csv(out / "report.csv")
    for section, methods in {"measured_pretrain": {"loco"},
                             "measured_readout": {"loco", "random"},
                             "measured_detection": {"loco", "random"}}.items():
        measured = [r for r in rows if r["section"] == section and r["mean"]]
        for method in methods:
            mine = [r for r in measured if r["method"] == method]
            metrics = [r["metric"] for r in mine]
            assert mine and len(metrics) == len(set(metrics)), (section, method, metrics)
            for r in mine:   # one row per metric, of both seeds
                assert r["n"] == "2" and sorted(r["seeds"].split(",")) == ["0", "1"], r
                assert r["std"] != "" and len(r["fingerprint"].split(";")) == 1, r
    # the runs themselves recorded one fingerprint per method across the two seeds
    for pattern, labels in (("pretrain/loco/seed*/run_info.json", {"loco"}),
                            ("readout/*/seed*/readout.json", {"loco", "random"}),
                            ("det/**/results.json", {"loco", "random"})):
        found = {}
        for path in out.glob(pattern):
            rec = json.loads(path.read_text())
            label = rec.get("method") or rec.get("kind")
            found.setdefault(label, []).append(rec["fingerprint"])
        for label in labels:
            assert len(found.get(label, [])) == 2 and len(set(found[label])) == 1, \
                (pattern, label, found)

    comparisons = [r for r in _csv(out / "comparisons.csv")
                   if r["method"] == "loco" and r["vs"] == "random"]
    assert {r["kind"] for r in comparisons} == {"readout", "detection"}, comparisons
    for r in comparisons:
        assert (r["n_a"], r["n_b"]) == ("2", "2") and r["test"] == "paired", r
        assert float(r["ci_low"]) <= float(r["diff"]) <= float(r["ci_high"]), r
        assert "1 run" not in r["verdict"], r
    # the summary gives each of loco's and random init's cells as a mean of the two runs ("(2)";
    # loco's verdict there is against e2e, the reference, which ran once)
    summary = _summary(out / "report.md")
    for method in ("loco", "random"):
        row = next(l for l in summary.splitlines() if l.startswith(f"| {method} |"))
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert cells and all(" (2)," in c for c in cells), row
