"""The prepared GPU check: benchmark, pretraining (nccl, bf16, channels_last, SyncBN), two gloo
ranks sharing the GPU against one process, readouts, conversion and Mask R-CNN on CUDA, one
summary table, non-zero exit on any failure. See
docs/gpu_check.md and loco_det/gpu_check.py.

Examples:
  # on the GPU machine, with the folder `make gpu-wheels` prepared (what `make gpu-check` runs)
  python3 tools/gpu_check.py --wheels .gpu_wheels

  # the same parts on CPU at toy size (what the test suite runs)
  python tools/gpu_check.py --cpu-smoke --work /tmp/gpu_check_smoke
"""
import argparse
import os
import sys


from loco_det import gpu_check


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="CPU, toy sizes, gloo, float32: the CPU-reduced form of every part")
    p.add_argument("--wheels", metavar="DIR", help="install these wheels (make gpu-wheels) first")
    p.add_argument("--site", metavar="DIR", help="where to install them (default: WORK/site)")
    p.add_argument("--work", metavar="DIR", help="scratch folder (default: a new temporary one)")
    p.add_argument("--parts", default=",".join(gpu_check.PARTS),
                   help=f"comma-separated subset of {','.join(gpu_check.PARTS)}")
    args = p.parse_args(argv)
    parts = tuple(args.parts.split(","))
    unknown = [x for x in parts if x not in gpu_check.PARTS]
    if unknown:
        p.error(f"--parts: unknown part {unknown[0]!r}")
    if args.wheels and not os.path.isdir(args.wheels):
        print(f"error: --wheels {args.wheels}: no such folder (run make gpu-wheels where PyPI "
              "is reachable and carry it)", file=sys.stderr)
        return 1
    try:
        status, text = gpu_check.run(cpu_smoke=args.cpu_smoke, work=args.work,
                                     wheels=args.wheels, site=args.site, parts=parts,
                                     out_dir=os.environ.get("OUT") or None)
    except gpu_check.PartFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(text)
    return status
