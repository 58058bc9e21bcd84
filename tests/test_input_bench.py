"""The input-pipeline measurement (tools/bench_input.py): generated JPEGs are deterministic and
ImageNet-sized, and every row is measured on them."""
import json
import os
import subprocess
import sys

from PIL import Image

from loco_det.pretrain import input_bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generated_jpegs_are_deterministic_and_imagenet_sized(tmp_path):
    a = input_bench.make_jpegs(str(tmp_path / "a"), n=2, seed=4)
    b = input_bench.make_jpegs(str(tmp_path / "b"), n=2, seed=4)
    assert [open(p, "rb").read() for p in a] == [open(p, "rb").read() for p in b]
    assert open(a[0], "rb").read() != open(a[1], "rb").read()
    with Image.open(a[0]) as img:
        assert img.format == "JPEG" and img.size == (500, 375)


def test_tool_prints_every_row_with_ratios(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "tools/bench_input.py", "--synthetic", "1", "--rounds", "1",
         "--config", os.path.join(REPO, "pretrain", "cpu_loco.yaml"), "--device", "cpu",
         "--device-batch", "2", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("reference", "cpu (DATA.AUGMENT_DEVICE=cpu)", "cuda, CPU part",
                "decode only (PIL, as the reference)", "decode only (as the fast paths)"):
        assert row in proc.stdout, row
    assert "vs reference" in proc.stdout and "cpu: jitter, grayscale, blur" in proc.stdout
    r = json.loads(out.read_text())
    assert len(r["cpu_s_per_image"]) == 5 and all(v > 0 for v in r["cpu_s_per_image"].values())
    assert r["device"]["images_per_s"] > 0
