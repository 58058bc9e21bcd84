#!/usr/bin/env python
"""Prepare the wheels (and the pinned Detectron2 sdist) that `make gpu-check` installs on a GPU
machine that cannot fetch anything; run where PyPI is reachable. See docs/gpu_check.md.

Examples:
  python tools/gpu_wheels.py                 # fill .gpu_wheels/ (kept wheels are not refetched)
  python tools/gpu_wheels.py --check         # only check the folder: versions, deps, size
"""
import argparse
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from loco_det import gpu_wheels  # noqa: E402


def _install_detectron2():
    spec = importlib.util.spec_from_file_location(
        "install_detectron2", os.path.join(ROOT, "tools", "install_detectron2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", default=os.path.join(ROOT, ".gpu_wheels"), help="wheel folder")
    p.add_argument("--check", action="store_true", help="check the folder, fetch nothing")
    p.add_argument("--python-version", default=gpu_wheels.TARGET_PYTHON,
                   help="CPython version of the target machine (default: the GPU machine's)")
    args = p.parse_args(argv)
    d2 = _install_detectron2()
    if args.check:
        if not os.path.isdir(args.dest):
            print(f"error: {args.dest}: no such folder (run without --check first)",
                  file=sys.stderr)
            return 1
        errors = gpu_wheels.check_folder(args.dest, d2.sdist_name(), args.python_version)
    else:
        try:
            errors = gpu_wheels.prepare(args.dest, d2.fetch_sdist, d2.sdist_name(),
                                        target=args.python_version)
        except subprocess.CalledProcessError as e:
            print(f"error: {' '.join(e.cmd)} failed with status {e.returncode} (its output is "
                  "above)", file=sys.stderr)
            return 1
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        return 1
    size = gpu_wheels.folder_size(args.dest)
    print(f"{args.dest}: {len(os.listdir(args.dest))} files, {size / 2**20:.1f} MiB, ready "
          "for make gpu-check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
