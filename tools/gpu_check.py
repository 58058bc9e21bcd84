#!/usr/bin/env python
"""`loco-det gpu-check` as a script: the same code (loco_det/commands/gpu_check.py), the same options.

Run from anywhere, e.g. `python path/to/tools/gpu_check.py --help`; docs/command_line.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loco_det.commands.gpu_check import *  # noqa: E402,F401,F403  (what tests and scripts import)

if __name__ == "__main__":
    from loco_det.cli import run_command

    sys.exit(run_command("gpu-check", sys.argv[1:], script=True))
