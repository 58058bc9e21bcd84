"""Benchmark report: collect pretraining, readout and detection runs into report.md, report.csv
and PNG plots.

Why it is built this way:
- Numbers are only ever averaged within one *computation*: runs are grouped by their fingerprint
  (loco_det/fingerprint.py: everything that defines what a run computed except the seed), never
  by label, and by the protocol columns shown. Two different pretrainings never share a row;
  rows whose labels collide get a suffix naming what differs (`e2e [MODEL.DECODER.CONV_BLOCKS=1]`).
  n counts distinct seeds (or splits): the same seed run twice is flagged as a repeat and counted
  once (the mean of its repeats).
- Every comparison carries its uncertainty: each method against a reference method and against
  random init, as a mean difference with a 95% t interval (paired over shared seeds or splits,
  Welch otherwise) and a verdict (loco_det/stats.py). With one run there is no interval and the
  verdict says "not resolved (1 run)".
- A run that is missing or unfinished is shown as such, never as 0: a zero in a results table
  reads as a measurement.
- The paper's numbers (loco_det/paper_reference.yaml, the paper cited there) are printed last,
  in their own section and file, never in a measured table, so a reader cannot mistake them for
  ours.
- report.md opens with one summary table (method x benchmark, headline metric as mean ± std (n)
  and the verdict against the reference method); the measured tables follow, one table per
  protocol so that each reads on a screen.
- Only runs the grid asked for are listed: a manifest entry without a job id (a baseline the
  grid did not request, such as published supervised weights it was not given) is not a run.
- Labels: the method label of a run is what `tools/run_benchmark.py` records in its manifest
  (`benchmark.json`) and passes to train_net as LOCO_DET.LABEL; without a manifest it falls back
  to the method named in the run's own files.

Input formats: docs/formats.md. Output: DIR/report.md, DIR/report.csv, DIR/comparisons.csv,
DIR/paper_reference.csv, DIR/plots/*.png, each written atomically.

Modules: runs (collecting run folders), rows (grouping into rows), compare (comparisons),
paper (the paper's numbers), render (markdown and CSV), plots (PNGs).
"""
import os
import sys

from ..utils import LocoError, atomic_write, check_no_links
from .compare import DEFAULT_REFERENCE, comparisons
from .paper import PAPER_CITATION, PAPER_TABLES, load_paper_reference, paper_differences
from .plots import make_plots
from .render import render_comparisons_csv, render_csv, render_markdown, render_paper_csv
from .rows import Row, build_rows, group_key
from .runs import Run, collect

__all__ = ["write_report", "collect", "build_rows", "comparisons", "make_plots", "Run", "Row",
           "group_key", "render_markdown", "render_csv", "render_comparisons_csv",
           "render_paper_csv", "load_paper_reference", "paper_differences", "PAPER_TABLES",
           "PAPER_CITATION", "DEFAULT_REFERENCE"]


def write_report(run_dirs, out_dir, reference=DEFAULT_REFERENCE):
    """Collect, then write plots, CSVs and report.md (last, so the md never names a plot that
    is not there). `reference`: the method every other is compared with. Returns (path of
    report.md, rows)."""
    runs, manifests, problems = collect(run_dirs)
    if not runs and not manifests:
        raise LocoError("no runs found under " + ", ".join(run_dirs)
                        + " (expected run_info.json, summary.json, readout.json or results.json)")
    rows = build_rows(runs)
    plots_dir = os.path.join(out_dir, "plots")
    if os.path.islink(plots_dir):   # the other outputs are written atomically (links replaced)
        raise LocoError(f"{plots_dir} is a symbolic link; refusing to write the plots through it")
    check_no_links(plots_dir, "plots folder")
    os.makedirs(out_dir, exist_ok=True)
    plots = make_plots(rows, out_dir)
    with atomic_write(os.path.join(out_dir, "report.csv"), "w") as f:
        f.write(render_csv(rows))
    with atomic_write(os.path.join(out_dir, "comparisons.csv"), "w") as f:
        f.write(render_comparisons_csv(comparisons(rows, reference)))
    with atomic_write(os.path.join(out_dir, "paper_reference.csv"), "w") as f:
        f.write(render_paper_csv())
    md_path = os.path.join(out_dir, "report.md")
    with atomic_write(md_path, "w") as f:
        f.write(render_markdown(rows, runs, plots, run_dirs, problems, reference))
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    return md_path, rows
