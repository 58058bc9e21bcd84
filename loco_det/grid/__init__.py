"""The grid runner: a grid file (schema.py) expands into jobs (expand.py), is checked before
anything runs (preflight.py, safety.py), and runs here (local.py) or on SLURM (slurm.py); the
command line is loco_det/commands/grid.py, the grid format docs/grids_and_report.md.

Why it is built this way:
- Every job is a plain subprocess command of the installed package's own commands (`python -m
  loco_det.cli pretrain` under torchrun, `readout`, `convert --verify`, `train`), so what the
  grid runs is exactly what a user would type, and `--dry-run` can print it.
- A job is skipped when its result file exists (pretraining summary.json, readout.json, the
  converted .pkl, detection results.json) and resumed when its checkpoint exists, so rerunning
  a grid after an interruption or a failure only does the work that is left.
- A failing job does not stop independent jobs; its dependants are reported as blocked and the
  run exits non-zero at the end. The report is written in any case and lists what is missing.
"""
from .expand import expand, random_init_opts
from .jobs import DEFAULT_RESOURCES, DETECTION_PORT, JOB_STAGES, PRETRAIN_PORT, Job
from .local import GpuSlices, run_local
from .preflight import preflight
from .progress import dry_run, progress_line, write_manifest
from .safety import bad_path_part, safety_check
from .schema import load_grid
from .slurm import SlurmCommand, run_slurm

__all__ = ["DEFAULT_RESOURCES", "DETECTION_PORT", "JOB_STAGES", "PRETRAIN_PORT", "GpuSlices", "Job",
           "SlurmCommand", "bad_path_part", "dry_run", "expand", "load_grid", "preflight",
           "progress_line", "random_init_opts", "run_local", "run_slurm", "safety_check",
           "write_manifest"]
