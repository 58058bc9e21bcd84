"""The digits data source: scikit-learn's real scans, the documented split, atomic writes."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from loco_det import digits
from loco_det.utils import LocoError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "d16"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_digits.py"),
                           "--output-dir", str(out), "--size", "16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def test_images_are_scikit_learns_scans_in_the_documented_split(written):
    from sklearn.datasets import load_digits

    ref = load_digits()   # an independent read of scikit-learn's copy
    meta = json.loads((written / "meta.json").read_text())
    assert meta["counts"] == {"train": 1437, "val": 360}
    assert meta["sha256"] == hashlib.sha256(
        ref.images.astype(np.uint8).tobytes() + ref.target.astype(np.int64).tobytes()).hexdigest()
    for i in (0, 1, 1436, 1437, 1796):
        split = "train" if i < 1437 else "val"
        path = written / split / str(ref.target[i]) / f"{i:04d}.png"
        img = np.asarray(Image.open(path))
        assert img.shape == (16, 16, 3)
        # downsampled back to 8x8, the image is the scan (ink 0..16 scaled to 0..255)
        small = np.asarray(Image.fromarray(img[..., 0]).resize((8, 8), Image.BOX), np.float32)
        corr = np.corrcoef(small.ravel(), ref.images[i].ravel())[0, 1]
        assert corr > 0.95, (i, corr)
    n = {s: sum(len(os.listdir(written / s / d)) for d in os.listdir(written / s))
         for s in ("train", "val")}
    assert n == {"train": 1437, "val": 360}
    assert sorted(os.listdir(written / "train")) == [str(d) for d in range(10)]


def test_rerun_reuses_and_foreign_folder_is_refused(written, tmp_path):
    before = (written / "meta.json").stat().st_mtime_ns
    assert digits.write(str(written), size=16)["size"] == 16
    assert (written / "meta.json").stat().st_mtime_ns == before
    with pytest.raises(LocoError, match="not a digits folder of size 32"):
        digits.write(str(written), size=32)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(LocoError, match="not empty"):
        digits.write(str(other))
    assert os.listdir(other) == ["keep.txt"]


def test_the_digits_grid_reads_out_five_seeds_of_each_rule(tmp_path):
    """det_configs/grids/digits.yaml: e2e, gim and loco pretrained on the digits' train split
    with seeds 0-4, each read out linearly and with kNN on the digits, beside random init of
    the same five seeds; no detection."""
    from loco_det import grid as benchmark

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    grid = benchmark.load_grid(os.path.join(root, "det_configs", "grids", "digits.yaml"))
    jobs, _, _ = benchmark.expand(grid, str(tmp_path / "out"))
    by_stage = {}
    for job in jobs:
        by_stage.setdefault(job.stage, []).append(job)
    assert "detection" not in by_stage
    pre = {(j.label, j.seed) for j in by_stage["pretrain"]}
    assert pre == {(m, s) for m in ("e2e", "gim", "loco") for s in range(5)}
    digits_root = str(tmp_path / "out" / "datasets" / "digits32")
    for job in by_stage["pretrain"]:
        assert f"DATA.ROOT={digits_root}/train" in job.argv
        assert "RUN.KNN_PERIOD=2" in job.argv   # the learning curves of the report's plot
    for stage in ("readout", "knn"):
        seen = {(j.label, j.seed) for j in by_stage[stage]}
        assert seen == pre | {("random", s) for s in range(5)}
        for job in by_stage[stage]:
            assert job.argv[job.argv.index("--data") + 1] == digits_root
    (data,) = by_stage["data"]
    assert data.argv[1:4] == ["-m", "loco_det.cli", "digits"]


def test_the_demo_profile_is_one_seed_with_the_monitor_every_epoch(tmp_path):
    """`make demo`'s digits track (profile demo): one seed of each rule and of random init, the
    kNN monitor every epoch, the same data and readouts as the five-seed grid."""
    from loco_det import grid as benchmark

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    grid = benchmark.load_grid(os.path.join(root, "det_configs", "grids", "digits.yaml"),
                               profile="demo")
    jobs, _, _ = benchmark.expand(grid, str(tmp_path / "out"))
    by_stage = {}
    for job in jobs:
        by_stage.setdefault(job.stage, []).append(job)
    assert {(j.label, j.seed) for j in by_stage["pretrain"]} == {
        (m, 0) for m in ("e2e", "gim", "loco")}
    for job in by_stage["pretrain"]:
        assert "RUN.KNN_PERIOD=1" in job.argv and "OPTIM.EPOCHS=10" in job.argv
    for stage in ("readout", "knn"):
        assert {(j.label, j.seed) for j in by_stage[stage]} == {
            (m, 0) for m in ("e2e", "gim", "loco", "random")}
    with open(os.path.join(root, "Makefile")) as f:
        makefile = f.read()
    assert "grid digits --profile demo" in makefile.split("\ndemo:")[1].split("\n\n")[0]
