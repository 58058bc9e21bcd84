"""Write the benchmark report from run directories.

Writes, into --out: report.md, report.csv (measured numbers), comparisons.csv,
paper_reference.csv (the paper's numbers, apart) and plots/*.png.

Walks every RUN_DIR recursively for pretraining runs (run_info.json, metrics.jsonl,
summary.json), linear-readout runs (readout.json, knn.json) and Detectron2 runs (results.json,
run_info.json, config.yaml), and for the manifest that tools/run_benchmark.py writes
(benchmark.json), whose jobs without results are listed as missing. Runs are grouped by their
fingerprint (what was computed, seed excluded), never by label: repeated seeds of one computation
become mean +- sample std over distinct seeds; the same seed twice is flagged as a repeat. Each
method is compared with a reference method (--reference, default e2e) and with random init:
mean difference, 95% t interval, verdict (better / worse / not resolved).

report.md opens with a summary (method x benchmark: headline metric, mean +- std (n), verdict
against the reference), then the measured tables, one per protocol, the comparisons, the
missing runs, and last the paper's numbers in their own section.

Examples:
  python tools/report.py runs/demo --out runs/demo
  python tools/report.py runs/paper/det runs/paper/readout --out reports/paper
  python tools/report.py runs/exp1 runs/exp2/pretrain/loco --out /tmp/report
"""
import argparse
import sys



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="directories to search (recursively) for runs")
    parser.add_argument("--output-dir", "--out", dest="out", required=True, metavar="DIR",
                        help="output directory for report.md, report.csv, comparisons.csv, "
                             "paper_reference.csv and plots/")
    parser.add_argument("--reference", default="e2e", metavar="METHOD",
                        help="method (label or learning rule) every other method is compared "
                             "with (default: e2e)")
    args = parser.parse_args(argv)

    from loco_det.report import write_report
    from loco_det.utils import LocoError
    try:
        md_path, rows = write_report(args.run_dirs, args.out, reference=args.reference)
    except LocoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{len(v)} {k} rows" for k, v in rows.items())
    print(f"report: {md_path} ({counts})")
    return 0
