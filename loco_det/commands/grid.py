"""Run a benchmark grid: data -> pretraining -> linear (and kNN) readout -> conversion
(--verify) -> Detectron2 runs (each method, the random-init baseline, and published supervised
weights when the grid's detection.supervised_weights names them) -> report.

Each job is a command of this repo's tools, run in dependency order on this machine
(--launcher local, the default) or submitted to SLURM through submitit (--launcher slurm, with
the GPUs, CPUs and time the grid requests and afterok dependencies between stages). Jobs whose
results exist are skipped and say so; interrupted pretraining and detection runs resume from
their last checkpoint. A failed job is reported, independent jobs go on, its dependants are
skipped, and the exit status is non-zero. The report (report.md, its CSV files and plots/) is
written to the output folder at the end in any case. Grid file format: docs/grids_and_report.md.

Examples:
  # the CPU demo (what `make demo` runs); again: reuses finished steps
  python tools/run_benchmark.py det_configs/grids/demo.yaml --out runs/demo
  # the same code path, small: fewer images and iterations (the test suite's version)
  python tools/run_benchmark.py det_configs/grids/demo.yaml --profile reduced --out /tmp/demo
  # print every command of the paper's Tables 2 and 3 without running anything, and list
  # every problem the grid would meet (missing data, typos in keys); exit 1 if there is one
  python tools/run_benchmark.py det_configs/grids/paper.yaml --dry-run \\
      --set vars.imagenet=/data/imagenet --set vars.datasets=/data/d2
  # submit the paper's grid to SLURM, with local paths and partition
  python tools/run_benchmark.py det_configs/grids/paper.yaml --launcher slurm \\
      --set vars.imagenet=/data/imagenet --set slurm.partition=gpu \\
      --set detection.supervised_weights=weights/resnet50-0676ba61.pth
"""
import argparse
import os
import sys



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", metavar="GRID.yaml",
                        help="grid file: a path, or a shipped name such as demo "
                             "(det_configs/grids/demo.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print every job's command (and whether it would be skipped or "
                             "resumed) and check the grid as --check does; run nothing, write "
                             "nothing")
    parser.add_argument("--check", action="store_true",
                        help="check the grid without running anything: recipes and rules, "
                             "override keys and values (after _BASE_), --set paths, input "
                             "paths, external checkpoints, SLURM keys; every problem on one "
                             "line, exit 1 if any; write nothing (a launch checks the same)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="run jobs here (in sequence, or --jobs at a time), or submit them to SLURM via submitit")
    parser.add_argument("--output-dir", "--out", dest="out", metavar="DIR",
                        help="output folder (default: the grid's `out`, else runs/<grid name>)")
    parser.add_argument("--profile", metavar="NAME",
                        help="apply the grid's profiles.NAME overrides (e.g. reduced)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a grid entry by dotted path (YAML value), e.g. "
                             "vars.imagenet=/data/imagenet; repeatable, applied after --profile")
    parser.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                        help="local launcher: run up to N independent jobs at a time (default "
                             "1); each gets OMP_NUM_THREADS = CPUs / N unless you set it, and "
                             "their output goes to OUT/logs/ only")
    parser.add_argument("--allow-commands", action="store_true",
                        help="let the grid's data jobs run commands other than loco_det's own "
                             "tools (a grid is data: only for a grid you trust)")
    parser.add_argument("--allow-env", action="store_true",
                        help="let the grid's env: set variables other than the documented ones "
                             "(e.g. LD_PRELOAD, PYTHONPATH: only for a grid you trust)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="do not stream the jobs' output (it still goes to OUT/logs/)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    from loco_det import grid as runner
    from loco_det.utils import LocoError, exit_code, interruptible, interrupted_line

    from loco_det.recipes import resolve

    try:
        with interruptible():
            args.grid = resolve(args.grid, "grid", option="grid")
            problems = []   # --set / profile paths the grid's schema does not have
            grid = runner.load_grid(args.grid, args.profile, args.sets, problems)
            out = args.out or grid.get("out") or os.path.join(
                "runs", os.path.splitext(os.path.basename(args.grid))[0])
            if not args.out and grid.get("out") and runner.bad_path_part(
                    os.path.normpath(str(grid["out"]))):
                raise LocoError(f"{args.grid}: out: {grid['out']} leaves the current folder; a "
                                "grid's default output must be a relative path (or pass --out)")
            jobs, notes, missing = runner.expand(grid, out)
            refusals, notices = runner.safety_check(
                grid, jobs, out, allow_commands=args.allow_commands, allow_env=args.allow_env)
            found, blocked = runner.preflight(grid, jobs, out)
            refusals = problems + refusals + found
            if args.dry_run:
                runner.dry_run(jobs, notes, missing, notices, blocked)
            for line in refusals:
                print(f"error: {line}", file=sys.stderr)
            if refusals:
                print(f"error: {args.grid}: {len(refusals)} problem(s); nothing was run",
                      file=sys.stderr)
                return 1
            if args.check and not args.dry_run:
                print(f"check: {args.grid}: {len(jobs)} jobs, no problems found")
            if args.dry_run or args.check:
                return 0
            for line in notices:
                print(f"note: {line}")
            if args.launcher == "slurm":   # the manifest only once every job is queued
                rc = runner.run_slurm(jobs, notes, out, grid.get("slurm"))
                runner.write_manifest(out, args.grid, args.profile, args.sets, jobs, missing)
                return rc
            runner.write_manifest(out, args.grid, args.profile, args.sets, jobs, missing)
            return runner.run_local(jobs, notes, out, quiet=args.quiet, workers=args.jobs)
    except LocoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through `interruptible`
        print(interrupted_line(e, "finished jobs are kept (a rerun skips them) and the running "
                                  "one was stopped at its last checkpoint", sys.argv[1:]
                               if argv is None else argv, flag=None), file=sys.stderr)
        return exit_code(e)
