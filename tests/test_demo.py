"""The demo's whole chain, reduced: `make demo` runs det_configs/grids/demo.yaml; here the same
grid and code path run with its `reduced` profile (a few images and iterations), and the report
must have measured rows for every method (the supervised ceiling trained here included) on both
benchmarks, say "not resolved" wherever it cannot rank, and have the plots it names."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("e2e", "gim", "loco", "supervised (trained here)", "random")
BENCHMARKS = ("cpu_synth_coco_R18_FPN_frozen", "cpu_synth_cityscapes_R18_FPN_frozen")


def _run(out):
    cmd = [sys.executable, "tools/run_benchmark.py", "det_configs/grids/demo.yaml",
           "--profile", "reduced", "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)


def _section(md, title):
    return md.split(title, 1)[1].split("\n## ", 1)[0]


def _rows_under(section, name, exact=False):
    """Table lines of the report's per-protocol tables ("### <protocol>") whose heading names
    `name` (is `name`, with exact)."""
    out = []
    for part in section.split("\n### ")[1:]:
        head, _, body = part.partition("\n")
        if head.strip() == name if exact else name in head:
            out += [l for l in body.splitlines() if l.startswith("| ")]
    return out


@pytest.mark.slow
def test_reduced_demo_writes_a_full_report(tmp_path):
    out = tmp_path / "demo"
    res = _run(out)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    md = (out / "report.md").read_text()
    # the report opens with the summary table; a baseline the grid did not ask for (published
    # supervised weights: detection.supervised_weights is null) is not listed
    assert md.split("\n## ")[1].startswith("Summary\n")
    summary = _section(md, "## Summary")
    assert summary.index("| method |") < summary.index("Benchmarks:")
    for method in METHODS:
        assert any(l.startswith(f"| {method} |") for l in summary.splitlines()), method
    assert "published weights" not in md

    detection = _section(md, "## Detection")
    readout = _section(md, "## Linear readout")
    for method in METHODS:
        for bench in BENCHMARKS:
            rows = [r for r in _rows_under(detection, bench) if r.startswith(f"| {method} |")]
            assert len(rows) == 1, f"{method} on {bench}: {rows}"
            assert rows[0].endswith("| ok |") and re.search(r"\|\s*\d+\.\d+", rows[0]), rows[0]
        rows = [r for r in readout.splitlines() if r.startswith(f"| {method} |")]
        assert len(rows) == 1 and rows[0].endswith("| ok |"), rows
        assert re.search(r"\|\s*\d+\.\d+", rows[0]), rows
    # one run per method: every comparison is unresolved, and says so
    comparisons = _section(md, "## Comparisons")
    for bench in BENCHMARKS:
        rows = [r for r in _rows_under(comparisons, bench) if not r.startswith("| metric |")]
        assert len(rows) >= 2 * 4, rows   # APbb, APmk x (4 methods vs random, ...)
        assert all(r.endswith("| not resolved (1 run) |") for r in rows), rows
        assert any("| supervised (trained here) |" in r for r in rows)
    # kNN: its own section, a measured row per method
    section = _section(md, "## kNN readout")
    for k in ("k = 20", "k = 200"):
        for method in METHODS:
            rows = [r for r in _rows_under(section, k, exact=True)
                    if r.startswith(f"| {method} |")]
            assert len(rows) == 1 and re.search(r"\|\s*\d+\.\d+", rows[0]), (k, rows)
    for png in re.findall(r"\(([^)]+\.png)\)", md):
        assert (out / png).is_file(), png
    assert len(re.findall(r"\.png\)", md)) >= 3

    # A second run reuses every finished step: only the report is written again.
    n = int(re.search(r"^summary: (\d+) jobs in .*: (\d+) done, 0 skipped, 0 failed",
                      res.stdout, re.M).group(1))
    again = _run(out)
    assert again.returncode == 0, again.stderr[-4000:]
    assert re.search(rf"^summary: {n} jobs in .*: 1 done, {n - 1} skipped, 0 failed, 0 blocked$",
                     again.stdout, re.M), again.stdout[-4000:]
    skipped = re.findall(r"^\[[ \d]+/\d+\] skipped\s+(\S+)\s+\(results exist: ", again.stdout,
                         re.M)
    assert len(skipped) == len(set(skipped)) == n - 1, again.stdout[-4000:]
    ran = re.findall(r"^\[[ \d]+/\d+\] (?:running|resuming) (\S+?):", again.stdout, re.M)
    assert ran == ["report"], ran
