"""What a grid handed over as data may not do: run commands other than loco_det's own, write
outside --out (through a path or a planted link), set environment variables that run code, or
pass scheduler options that do either. --allow-commands / --allow-env lift the first and the
environment rule for a grid you trust."""
import os
import shlex
import sys

from ..utils import LocoError, did_you_mean
from ..weights.safe_load import yaml_chain
from . import jobs as _jobs
from .jobs import CLI, repo_path
from .schema import SLURM_EXTRA_KEYS, SLURM_KEYS, slurm_parameters

# Environment variables a grid's `env:` may set without --allow-env: what the tools and their
# libraries document as settings (data location, threads, devices, collective-communication
# tuning). LD_PRELOAD, PYTHONPATH, PATH and the like run code and need --allow-env.
ALLOWED_ENV = ("DETECTRON2_DATASETS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE",
               "GLOO_SOCKET_IFNAME", "TORCH_DISTRIBUTED_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
# Options and config keys that name a job's output: the runner sets each once, a grid's args or
# overrides may not add another (argparse also takes an unambiguous prefix such as --output).
_OUTPUT_OPTIONS = ("--output-dir", "--out", "OUTPUT_DIR")


def _output_option(arg):
    """The output option `arg` sets (itself, `opt=...` or an argparse prefix), or None."""
    flag = arg.split("=", 1)[0]
    for opt in _OUTPUT_OPTIONS:
        if flag == opt or (opt.startswith("--") and len(flag) > 2 and flag.startswith("--")
                           and opt.startswith(flag)):
            return opt
    return None


def own_tools():
    """The command-line tools loco_det ships (tools/*.py), as `tools/NAME.py`."""
    folder = os.path.join(_jobs.REPO, "tools")
    return sorted(f"tools/{name}" for name in os.listdir(folder)
                  if name.endswith(".py") and not name.startswith("_"))


def _is_own_tool(argv):
    """`python tools/NAME.py ...` or `python -m loco_det.cli SUB ...` (a loco_det command)."""
    from ..cli import COMMANDS

    if len(argv) >= 4 and argv[0] == sys.executable and tuple(argv[1:3]) == CLI:
        return argv[3] in COMMANDS
    return (len(argv) >= 2 and argv[0] == sys.executable
            and os.path.normpath(argv[1]) == argv[1] and argv[1] in own_tools())


def bad_path_part(job_id):
    """Why `job_id` (a path below --out made of labels, names and seeds) could leave --out, or
    None. Absolute paths, `..`, `.`, empty parts and control characters are refused."""
    if os.path.isabs(job_id) or job_id.startswith("~"):
        return "is an absolute path"
    for part in job_id.split("/"):
        if part in ("", ".", ".."):
            return f"has a {part!r} path component" if part else "has an empty path component"
        if any(ord(c) < 32 for c in part) or "\\" in part:
            return "has a control character or backslash"
    return None


def safety_check(grid, jobs, out, *, allow_commands=False, allow_env=False):
    """(refusals, notices): every reason the grid cannot run as given, one line each, and what a
    dry run should show (outside commands allowed by --allow-commands, plug-in rule modules the
    grid imports). Also refuses links planted where the runner writes below `out`."""
    refusals, notices = [], []
    slurm = grid.get("slurm") or {}
    extra = (slurm.get("additional_parameters") or {}) if isinstance(slurm, dict) else {}
    known = slurm_parameters()
    for key in sorted(set(slurm) - set(SLURM_KEYS)) + sorted(
            k for k in extra if k.replace("-", "_") not in SLURM_EXTRA_KEYS):
        if key in slurm and key not in known:
            refusals.append(f"slurm: {key} is not a parameter of submitit's SlurmExecutor"
                            + (did_you_mean(key, known, "slurm.") or f" (known: {', '.join(known)})"))
        elif allow_commands:
            notices.append(f"slurm: {key} is passed to the scheduler (allowed by "
                           "--allow-commands)")
        else:
            refusals.append(f"slurm: {key} can run commands or write outside --out (known: "
                            f"{', '.join(SLURM_KEYS[:-1])}, additional_parameters "
                            f"{', '.join(SLURM_EXTRA_KEYS)}); pass --allow-commands to use it")
    for sub in ["logs", "slurm"] + [job.id for job in jobs if job.stage not in ("data", "report")]:
        probe = out
        for part in sub.split("/"):
            probe = os.path.join(probe, part)
            if os.path.islink(probe):
                refusals.append(f"{probe} is a symbolic link (to {os.readlink(probe)}); the "
                                "runner writes there and refuses to write through a link")
                break
    for key in sorted((grid.get("env") or {})):
        if key not in ALLOWED_ENV and not allow_env:
            refusals.append(f"env: {key} is not a variable the tools document ("
                            f"{', '.join(ALLOWED_ENV)}); pass --allow-env to set it")
    for job in jobs:
        why = bad_path_part(job.id)
        if why:
            refusals.append(f"{job.stage} job {job.id!r}: its output path {why}; labels, names "
                            "and seeds must keep every output inside --out")
        if job.stage == "data":
            if not _is_own_tool(job.argv):
                what = shlex.join(job.argv[:3]) + (" ..." if len(job.argv) > 3 else "")
                if allow_commands:
                    notices.append(f"{job.id} runs a command that is not a loco_det tool "
                                   f"(allowed by --allow-commands): {what}")
                else:
                    refusals.append(f"{job.id}: command {what} is not one of loco_det's tools "
                                    "(python -m loco_det.cli SUB, or python tools/NAME.py); pass "
                                    "--allow-commands to run it")
            continue
        if job.stage == "report":
            continue
        named = [_output_option(a) for a in job.argv]
        counts = {opt: named.count(opt) for opt in _OUTPUT_OPTIONS}
        counts["--output-dir"] += counts.pop("--out")   # one destination, two spellings
        for opt, n in counts.items():
            if n > 1:
                refusals.append(f"{job.stage} job {job.id}: the grid's args or overrides set "
                                f"{opt} again; the runner chooses each job's output folder")
    configs = {}
    for job in jobs:
        argv = job.argv
        for flag in ("--config", "--config-file"):
            if job.stage in ("pretrain", "detection") and flag in argv:
                configs.setdefault(argv[argv.index(flag) + 1], job.id)
    for config, job_id in configs.items():
        if not os.path.isfile(repo_path(config)):
            continue   # the job itself names a missing file when it starts
        try:
            yaml_chain(repo_path(config))
        except LocoError as e:
            refusals.append(f"{job_id}: {e}")
    for module, where in plugin_modules(grid, jobs):
        notices.append(f"plug-in rule: {where} imports {module} (its code runs when pretraining "
                       "starts)")
    return refusals, notices


def plugin_modules(grid, jobs):
    """[(module, where)]: learning rules given as an import path ('pkg.mod:rule') in the grid's
    pretraining recipes (with their _BASE_ chain) or overrides. Importing them runs their code,
    by design (docs/security.md)."""
    found = []
    for job in jobs:
        if job.stage != "pretrain":
            continue
        argv = job.argv
        recipe = argv[argv.index("--config") + 1] if "--config" in argv else None
        methods = []
        if recipe and os.path.isfile(repo_path(recipe)):
            for _, data in reversed(yaml_chain(repo_path(recipe))):
                method = ((data or {}).get("MODEL") or {}).get("METHOD") \
                    if isinstance(data, dict) else None
                if method:
                    methods = [(method, recipe)]
        methods += [(a.split("=", 1)[1], "override " + a) for a in argv
                    if a.startswith("MODEL.METHOD=")]
        if not methods:
            continue
        method, where = methods[-1]
        if isinstance(method, str) and ":" in method:
            found.append((method.split(":", 1)[0], f"{job.id} ({where})"))
    return found
