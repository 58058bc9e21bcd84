#!/usr/bin/env python
"""`loco-det digits` as a script: the same code (loco_det/commands/digits.py), the same options.

Run from anywhere, e.g. `python path/to/tools/make_digits.py --help`; docs/command_line.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loco_det.commands.digits import *  # noqa: E402,F401,F403  (what tests and scripts import)

if __name__ == "__main__":
    from loco_det.cli import run_command

    sys.exit(run_command("digits", sys.argv[1:], script=True))
