"""A real multi-seed chain through the grid runner: two seeds of a tiny loco pretraining, its
linear readout and frozen Mask R-CNN detection (detection seed S on the backbone of pretraining
seed S), beside random init with the same seeds. The
report must pool each method's two seeds into one row (one fingerprint, n = 2, both seeds
listed) and compare with intervals, not "1 run": a seed-dependent setting leaking into a
fingerprint (loco_det/fingerprint.py) would split every row into two rows of n = 1."""
import csv
import io
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = ("0", "1")

GRID = """\
name: seeds
vars: {datasets: "{out}/datasets", data: "{datasets}/loco_synth"}
env: {DETECTRON2_DATASETS: "{datasets}"}
data:
  - name: loco_synth
    command: [python, tools/make_synthetic_data.py, --out, "{data}", --num-train, "24",
              --num-val, "8", --size, "96x128", --no-progress]
    creates: "{data}/meta.json"
pretrain:
  - methods: [loco]
    recipe: "cpu_{method}.yaml"
    label: "{method}"
    seeds: [0, 1]
    overrides: ["DATA.ROOT={data}/imagefolder/train", OPTIM.EPOCHS=1, OPTIM.WARMUP_EPOCHS=0,
                OPTIM.BATCH_SIZE=8, DATA.IMAGE_SIZE=32, DATA.NUM_WORKERS=0]
readout:
  args: [--data, "{data}/imagefolder", --seed, "{seed}", --epochs, "2", --workers, "0",
         --no-progress]
  random_init: {arch: resnet18, seeds: [0, 1]}
detection:
  supervised_weights: null
  overrides: {SOLVER.MAX_ITER: 2, SOLVER.STEPS: "(1,)", SOLVER.WARMUP_ITERS: 1,
              SOLVER.IMS_PER_BATCH: 2, SOLVER.CHECKPOINT_PERIOD: 1000,
              INPUT.MIN_SIZE_TRAIN: "(96,)", INPUT.MIN_SIZE_TEST: 96}
  configs:
    - config: cpu_synth_coco_R18_FPN_frozen.yaml
      seeds: [0, 1]
      pair_seeds: true
"""


@pytest.fixture(scope="module")
def two_seed_grid(tmp_path_factory):
    """The grid run once (two jobs at a time); its output folder."""
    tmp = tmp_path_factory.mktemp("seeds")
    grid = tmp / "grid.yaml"
    grid.write_text(GRID)
    out = tmp / "out"
    res = subprocess.run([sys.executable, "tools/run_benchmark.py", str(grid), "--jobs", "2",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return out


def _csv(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.mark.slow
def test_two_seeds_pool_into_one_row_per_method(two_seed_grid):
    out = two_seed_grid
    rows = _csv(out / "report.csv")
    expected = {"measured_pretrain": {"loco"}, "measured_readout": {"loco", "random"},
                "measured_detection": {"loco", "random"}}
    for section, methods in expected.items():
        measured = [r for r in rows if r["section"] == section and r["mean"]]
        assert {r["method"] for r in measured} == methods, (section, measured)
        for method in methods:
            mine = [r for r in measured if r["method"] == method]
            metrics = [r["metric"] for r in mine]
            assert len(metrics) == len(set(metrics)), (section, method, metrics)   # one row
            for r in mine:
                assert r["n"] == "2" and sorted(r["seeds"].split(",")) == list(SEEDS), r
                assert r["std"] != "" and len(r["fingerprint"].split(";")) == 1, r
    # the runs themselves recorded one fingerprint per method across the two seeds
    for pattern in ("pretrain/loco/seed*/run_info.json", "readout/*/seed*/readout.json",
                    "det/**/results.json"):
        found = {}
        for path in out.glob(pattern):
            rec = json.loads(path.read_text())
            label = rec.get("method") or rec.get("kind")
            found.setdefault(label, set()).add(rec["fingerprint"])
        assert found and all(len(f) == 1 for f in found.values()), (pattern, found)

    comparisons = [r for r in _csv(out / "comparisons.csv") if r["method"] == "loco"
                   and r["vs"] == "random"]
    assert comparisons, _csv(out / "comparisons.csv")
    for r in comparisons:
        assert (r["n_a"], r["n_b"]) == ("2", "2"), r
        assert r["ci_low"] != "" and r["ci_high"] != "", r
        assert float(r["ci_low"]) <= float(r["diff"]) <= float(r["ci_high"]), r
        assert "1 run" not in r["verdict"], r
    md = (out / "report.md").read_text()
    rows = [l for l in md.splitlines() if l.startswith("| ")]
    assert rows and not [l for l in rows if "(1 run)" in l], [l for l in rows if "(1 run)" in l]
