"""Benchmark grids: expand a grid YAML into jobs and run them in dependency order, locally or on
SLURM, then write the report.

Why it is built this way:
- Every job is a plain subprocess command of the installed package's own commands (`python -m
  loco_det.cli pretrain` under torchrun, `readout`, `convert --verify`, `train`), so what the
  grid runs is exactly what a user would type, and `--dry-run` can print it.
- A job is skipped when its result file exists (pretraining summary.json, readout.json, the
  converted .pkl, detection results.json) and resumed when its checkpoint exists, so rerunning
  a grid after an interruption or a failure only does the work that is left.
- A failing job does not stop independent jobs; its dependants are reported as blocked and the
  run exits non-zero at the end. The report is written in any case and lists what is missing.
- The random-initialisation baseline is part of every detection grid; published supervised
  weights join when the grid names them. Random init means what it says (`random_init_opts`):
  the whole backbone trains from scratch on a fine-tuning config, it stays frozen on a readout
  config. Published supervised weights (detection.supervised_weights) are labelled "supervised
  (published weights)", apart from a `supervised` pretraining run by loco_det; a grid without
  them prints a note, and the manifest records those runs without a job id, which the report
  does not list.

Grid format (see det_configs/grids/demo.yaml and paper.yaml for complete, commented examples):

    name: demo
    out: runs/demo                    # default for --out
    vars: {data: "{out}/datasets/loco_synth"}   # `{name}` in any string below is replaced
    env: {DETECTRON2_DATASETS: "{out}/datasets"}  # environment of every job
    slurm: {partition: ..., account: ..., additional_parameters: {...}}  # SlurmExecutor's
    data: [{name, command: [...], creates: PATH, seeds: [...]}]
    pretrain: [{methods: [...], recipe: "cpu_{method}.yaml", label: "{method}" (default
                "{recipe}"), seeds: [0],
                overrides: [KEY=VALUE, ...], resources: {...}}]
    readout: {args: [...], random_init: {arch: resnet18, seeds: [0]}, resources: {...}}
    knn: {args: [...], resources: {...}}  # `loco-det knn` per readout, into the same
                                          # folder (knn.json beside readout.json); optional
    convert: {resources: {...}}
    external: [{label, path, take, prefix, layout}]  # checkpoints from elsewhere: readout, kNN,
                                      # conversion and detection like a pretrained row
    detection: {supervised_weights: PATH or null, overrides: {KEY: VALUE},
                resources: {...}, configs: [{config, seeds, pair_seeds, overrides, resources}]}
                                      # pair_seeds: true runs each pretrained backbone only
                                      # with its own pretraining seed (baselines: every seed)
    profiles: {reduced: {dotted.path: value, ...}}   # selected with --profile

Before anything runs, `preflight` checks what it can without running a job (recipes, rules,
override keys after _BASE_, --set paths, input paths, external checkpoints) and `safety_check`
what a grid handed over as data may not do; both list every problem, one line each.

Resources: nodes, gpus_per_node (0 = CPU), cpus_per_task, mem_gb, time_min. Runtime
placeholders in commands ($MASTER_ADDR, $NODE_RANK, $JOB_ID) are filled in on the SLURM node.
Jobs run in the repository root, so relative paths in a grid are relative to it; {out} is the
output folder (--out, relative to the current directory) as seen from there.
"""
import copy
import difflib
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

from .safe_load import yaml_chain
from .utils import LocoError, die_with_parent, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("data", "pretrain", "readout", "knn", "convert", "detection", "report")
DEFAULT_RESOURCES = {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 2, "mem_gb": None,
                     "time_min": 60}
# Published supervised weights (detection.supervised_weights) get their own label, distinct from
# a `supervised` pretraining run by loco_det (method supervised, labelled by its grid block).
PUBLISHED_NAME = "supervised_published"
PUBLISHED_LABEL = "supervised (published weights)"
PRETRAIN_PORT = 29500
DETECTION_PORT = 29501


@dataclass
class Job:
    id: str                 # unique, also the output path relative to the grid's out dir
    stage: str
    argv: list
    output: str             # path (relative to the repo root when inside it)
    done_file: str = ""     # the job is skipped when this exists (and is finished)
    resume_file: str = ""   # "--resume" is added when this exists
    resume_at: int = -1     # where "--resume" goes in argv (-1: at the end)
    deps: list = field(default_factory=list)
    resources: dict = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    label: str = ""
    config: str = ""
    seed: object = None
    requires: list = field(default_factory=list)   # input files that must exist to start
    env: dict = field(default_factory=dict)

    def is_done(self):
        """Finished results exist. JSON results must say finished (a crash can leave a file
        that was written early, never one with finished: true)."""
        if not self.done_file or not os.path.exists(self._abs(self.done_file)):
            return False
        if self.done_file.endswith(("summary.json", "results.json")):
            try:
                with open(self._abs(self.done_file)) as f:
                    return json.load(f).get("finished") is True
            except (OSError, ValueError):
                return False
        return True

    def resuming(self):
        return bool(self.resume_file) and os.path.exists(self._abs(self.resume_file))

    def command(self):
        """argv as it runs now: with --resume when an interrupted run left a checkpoint."""
        argv = list(self.argv)
        if self.resuming():
            argv.insert(len(argv) if self.resume_at < 0 else self.resume_at, "--resume")
        return argv

    @staticmethod
    def _abs(path):
        return path if os.path.isabs(path) else os.path.join(REPO, path)


# ----------------------------------------------------------------------------- grid loading

# What a grid may hold, for the dotted paths of --set and profiles and for each section's keys.
# A dict lists the keys of a mapping, [spec] a list of items, None a value (a string, a number or
# a plain list), ANY a mapping whose keys are data (Detectron2 keys, sbatch options, variables of
# the environment) and OWN a mapping whose keys the grid itself defines (vars).
ANY, OWN = "any key", "the grid's own keys"
_RES = dict.fromkeys(DEFAULT_RESOURCES)
SCHEMA = {
    "name": None, "description": None, "out": None, "vars": OWN, "env": ANY,
    "slurm": None,   # grid_schema(): the parameters of submitit's SlurmExecutor
    "data": [{"name": None, "command": None, "creates": None, "seeds": None, "resources": _RES}],
    "pretrain": [{"methods": None, "recipe": None, "label": None, "seeds": None,
                  "overrides": None, "resources": _RES}],
    "readout": {"args": None, "random_init": {"arch": None, "seeds": None}, "resources": _RES},
    "knn": {"args": None, "resources": _RES},
    "convert": {"resources": _RES},
    "detection": {"supervised_weights": None, "overrides": ANY, "resources": _RES,
                  "configs": [{"config": None, "seeds": None, "pair_seeds": None,
                               "overrides": ANY, "resources": _RES}]},
    # checkpoints from elsewhere, through readout, kNN, conversion and detection
    "external": [{"label": None, "path": None, "layout": None, "take": None, "prefix": None}],
    "profiles": ANY,
}


def slurm_parameters():
    """The parameters submitit's SlurmExecutor takes (its own list when submitit is installed,
    else the keys loco_det allows without --allow-commands)."""
    try:
        from submitit.slurm import slurm
        return sorted(set(slurm._get_default_parameters()) | {"max_num_timeout"})
    except (ImportError, AttributeError):
        return sorted(SLURM_KEYS)


def grid_schema():
    return dict(SCHEMA, slurm=dict(dict.fromkeys(slurm_parameters()), additional_parameters=ANY))


def did_you_mean(word, options, prefix=""):
    """'; did you mean PREFIX BEST?' for the closest of `options`, or ''."""
    best = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {prefix}{best[0]}?" if best else ""


def _schema_problem(tree, dotted, schema):
    """Why the dotted path names nothing the grid can hold, or None."""
    node, spec, done = tree, schema, []
    parts = dotted.split(".")
    while parts:
        head, where = parts[0], ".".join(done)
        here = f"{where}." if where else ""
        if spec is ANY:
            return None
        if spec is OWN:
            known = sorted(node) if isinstance(node, dict) else []
            if head in known and len(parts) == 1:
                return None
            if head in known:
                return f"{here}{head} is a value, not a mapping"
            return (f"the grid defines no {where} entry {head!r} ({where}: "
                    f"{', '.join(known) or 'none'}){did_you_mean(head, known, here)}")
        if isinstance(spec, list):
            if not head.isdigit() or not isinstance(node, list) or int(head) >= len(node):
                return (f"{where} has no item {head} (it has "
                        f"{len(node) if isinstance(node, list) else 0})")
            node, spec = node[int(head)], spec[0]
        elif isinstance(spec, dict):
            if head not in spec:
                return (f"{where or 'a grid'} has no key {head!r}"
                        + (did_you_mean(head, spec, here) or f" (known: {', '.join(spec)})"))
            node, spec = node.get(head) if isinstance(node, dict) else None, spec[head]
        elif isinstance(node, list) and head.isdigit() and int(head) < len(node):
            node = node[int(head)]
        else:
            return f"{where} is a value, not a mapping or list"
        done.append(head)
        parts = parts[1:]
    return None


def _set_path(tree, dotted, value, schema):
    """Set `dotted` in the grid, walking the schema: keys of data mappings (ANY) may contain
    dots (Detectron2's SOLVER.MAX_ITER), sections missing from the grid are created."""
    problem = _schema_problem(tree, dotted, schema)
    if problem:
        raise LocoError(problem)
    node, spec, parts = tree, schema, dotted.split(".")
    while True:
        head = parts[0]
        if spec in (ANY, OWN):
            node[".".join(parts)] = value
            return
        if len(parts) == 1:
            node[int(head) if isinstance(node, list) else head] = value
            return
        if isinstance(node, list):
            node, spec = node[int(head)], spec[0] if isinstance(spec, list) else None
        else:
            if not isinstance(node.get(head), (dict, list)):
                node[head] = {}
            node, spec = node[head], spec[head]
        parts = parts[1:]


def load_grid(path, profile=None, sets=(), problems=None):
    """The grid mapping with the profile's and then --set's dotted-path overrides applied.
    A path that names nothing in the grid's schema (vars.imagenett, slurm.partiton) is an error;
    with a `problems` list each one is appended there as one line (and not applied) instead."""
    if not os.path.isfile(path):
        raise LocoError(f"{path}: grid file not found")
    try:
        with open(path) as f:
            grid = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise LocoError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(grid, dict):
        raise LocoError(f"{path}: a grid is a mapping (name, vars, pretrain, detection, ...)")
    unknown = set(grid) - set(SCHEMA)
    if unknown:
        raise LocoError(f"{path}: unknown grid key(s): {', '.join(sorted(unknown))}"
                        + did_you_mean(sorted(unknown)[0], SCHEMA))
    overrides = []
    if profile:
        profiles = grid.get("profiles") or {}
        if profile not in profiles:
            raise LocoError(f"{path}: no profile '{profile}' (have: "
                            f"{', '.join(profiles) or 'none'})")
        overrides += [(f"profile {profile}: {key}", key, value)
                      for key, value in (profiles[profile] or {}).items()]
    for item in sets:
        if "=" not in item:
            raise LocoError(f"--set {item}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        overrides.append((f"--set {key}", key, yaml.safe_load(value) if value else ""))
    grid = copy.deepcopy(grid)
    schema = grid_schema()
    for where, key, value in overrides:
        try:
            _set_path(grid, key, value, schema)
        except LocoError as e:
            if problems is None:
                raise LocoError(f"{where}: {e}") from None
            problems.append(f"{where}: {e}")
    return grid


_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Templates:
    """`{name}` substitution from the grid's vars (which may refer to each other and {out});
    other braces are left alone, so Detectron2 values like "('a',)" need no escaping."""

    def __init__(self, variables):
        self.vars = {k: "" if v is None else str(v) for k, v in variables.items()}

    def __call__(self, value, **local):
        if isinstance(value, list):
            return [self(v, **local) for v in value]
        if not isinstance(value, str):
            return value
        names = dict(self.vars, **{k: str(v) for k, v in local.items()})
        for _ in range(10):  # vars may reference vars
            new = _VAR.sub(lambda m: self._lookup(names, m.group(1), value), value)
            if new == value:
                return new
            value = new
        raise LocoError(f"grid: template {value!r} does not resolve (variables refer in a loop)")

    @staticmethod
    def _lookup(names, name, text):
        if name not in names:
            raise LocoError(f"grid: unknown variable {{{name}}} in {text!r}; define it under "
                            f"vars: (known: {', '.join(sorted(names))})")
        return names[name]


# ----------------------------------------------------------------------------- grid safety
# A grid is data someone may hand you: it runs loco_det's own tools only, keeps every output
# the runner writes inside --out, and sets only the environment variables the tools document.
# --allow-commands / --allow-env lift the first and last rule for a grid you trust.

# Environment variables a grid's `env:` may set without --allow-env: what the tools and their
# libraries document as settings (data location, threads, devices, collective-communication
# tuning). LD_PRELOAD, PYTHONPATH, PATH and the like run code and need --allow-env.
ALLOWED_ENV = ("DETECTRON2_DATASETS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE",
               "GLOO_SOCKET_IFNAME", "TORCH_DISTRIBUTED_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
# Options and config keys that name a job's output: the runner sets each once, a grid's args or
# overrides may not add another (argparse also takes an unambiguous prefix such as --output).
_OUTPUT_OPTIONS = ("--output-dir", "--out", "OUTPUT_DIR")
# slurm: keys a grid may set without --allow-commands. submitit's `setup` and `srun_args`, and
# sbatch options such as --wrap, --output or --chdir, run commands or write outside --out.
SLURM_KEYS = ("partition", "account", "qos", "constraint", "comment", "exclude", "nodelist",
              "reservation", "signal_delay_s", "max_num_timeout", "additional_parameters")
SLURM_EXTRA_KEYS = ("exclusive", "gres", "hint", "mail_type", "mail_user", "requeue",
                    "cpus_per_gpu", "mem_per_cpu", "gpus_per_task", "nice", "begin", "licenses",
                    "switches", "kill-on-invalid-dep")


def _output_option(arg):
    """The output option `arg` sets (itself, `opt=...` or an argparse prefix), or None."""
    flag = arg.split("=", 1)[0]
    for opt in _OUTPUT_OPTIONS:
        if flag == opt or (opt.startswith("--") and len(flag) > 2 and flag.startswith("--")
                           and opt.startswith(flag)):
            return opt
    return None


# How every job starts a loco_det command: the installed package (`python -m loco_det.cli SUB`),
# not a script path of the checkout.
CLI = ("-m", "loco_det.cli")


def own_tools():
    """The command-line tools loco_det ships (tools/*.py), as `tools/NAME.py`."""
    folder = os.path.join(REPO, "tools")
    return sorted(f"tools/{name}" for name in os.listdir(folder)
                  if name.endswith(".py") and not name.startswith("_"))


def _is_own_tool(argv):
    """`python tools/NAME.py ...` or `python -m loco_det.cli SUB ...` (a loco_det command)."""
    from .cli import COMMANDS

    if len(argv) >= 4 and argv[0] == sys.executable and tuple(argv[1:3]) == CLI:
        return argv[3] in COMMANDS
    return (len(argv) >= 2 and argv[0] == sys.executable
            and os.path.normpath(argv[1]) == argv[1] and argv[1] in own_tools())


def _bad_path_part(job_id):
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
        why = _bad_path_part(job.id)
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
        if not os.path.isfile(Job._abs(config)):
            continue   # the job itself names a missing file when it starts
        try:
            yaml_chain(Job._abs(config))
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
        if recipe and os.path.isfile(Job._abs(recipe)):
            for _, data in reversed(yaml_chain(Job._abs(recipe))):
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


# ----------------------------------------------------------------------------- preflight
# What a grid's jobs would fail on, found before any of them runs: a dry run (or --check) lists
# every such problem, one line each, and a launch refuses to start with any.

def preflight(grid, jobs, out):
    """(problems, blocked): every problem the grid's jobs would meet that can be found without
    running them, one line each, in grid order, without repeats: recipes and learning rules,
    override keys (after _BASE_) and values of the pretraining and Detectron2 configs, external
    checkpoints, and input paths that neither exist nor are made by an earlier job; `blocked`
    maps the ids of jobs lacking an input to that input."""
    tpl = _Templates(dict(grid.get("vars") or {}, out=_rel(out)))
    problems, inputs = _check_pretraining(grid, tpl)
    problems += _check_detection(grid, tpl)
    problems += _check_external(grid, tpl)
    absent = missing_inputs(jobs, inputs)
    problems += [f"input {p} does not exist and no earlier job makes it (needed by {ids[0]}"
                 + (f" and {len(ids) - 1} more job(s)" if len(ids) > 1 else "") + ")"
                 for p, ids in absent.items()]
    blocked = {job_id: p for p, ids in absent.items() for job_id in ids}
    return list(dict.fromkeys(problems)), blocked


def _first(values, default=0):
    return (values or [default])[0]


def _one_line(e):
    return " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())


def _pretrain_methods():
    """Learning rules a recipe may name without an import path: registered, or installed as a
    `loco_det.rules` entry point (listed, not imported)."""
    import importlib.metadata

    from .pretrain.rules import ENTRY_POINT_GROUP, RULES

    return list(RULES) + sorted(ep.name for ep in importlib.metadata.entry_points(
        group=ENTRY_POINT_GROUP) if ep.name not in RULES)


def _recipe_hint(template, method, recipe):
    """' (did you mean ...)' among the recipes the block's template can name."""
    folder = os.path.join(REPO, os.path.dirname(_recipe_path(recipe)))
    names = sorted(f for f in os.listdir(folder) if f.endswith(".yaml")) \
        if os.path.isdir(folder) else []
    base = os.path.basename(template)
    if base.count("{") == 1 and "{method}" in base:
        pattern = re.compile(re.escape(base).replace(re.escape("{method}"), "(.+)") + "$")
        methods = [m.group(1) for m in map(pattern.match, names) if m]
        hint = did_you_mean(method, methods)
        if hint:
            return f" (method {method!r}:{hint[1:]})"
    return did_you_mean(os.path.basename(recipe), names)


def _check_pretraining(grid, tpl):
    """(problems, inputs): each block's recipes exist and load, its overrides name keys of the
    recipe (after _BASE_) and have valid values, the resolved MODEL.METHOD is a rule; inputs are
    (job id prefix, DATA.ROOT) for the input check."""
    from .fingerprint import flatten
    from .pretrain import config as pcfg

    problems, inputs = [], []
    methods = None
    for i, block in enumerate(grid.get("pretrain") or []):
        for method in block.get("methods") or []:
            recipe = tpl(block["recipe"], method=method)
            recipe_path = _recipe_path(recipe)
            where = f"pretrain[{i}] {method}"
            if not os.path.isfile(Job._abs(recipe_path)):
                problems.append(f"{where}: no recipe {recipe_path}"
                                + _recipe_hint(block["recipe"], method, recipe))
                continue
            label = tpl(block.get("label", "{recipe}"), method=method, recipe=_stem(recipe))
            local = dict(method=method, recipe=_stem(recipe), label=label,
                         seed=_first(block.get("seeds")))
            overrides = [tpl(o, **local) for o in block.get("overrides") or []]
            cfg = pcfg.get_cfg()
            try:
                yaml_chain(Job._abs(recipe_path))
                cfg.merge_from_file(Job._abs(recipe_path), allow_unsafe=False)
            except (LocoError, KeyError, ValueError, AssertionError, TypeError,
                    yaml.YAMLError) as e:
                problems.append(f"{where}: {recipe_path}: {_one_line(e)}")
                continue
            keys = flatten(cfg)
            bad = []
            for item in overrides:
                key = str(item).split("=", 1)[0]
                if "=" not in str(item):
                    bad.append(f"{where}: override {item!r} is not KEY=VALUE")
                elif key not in keys:
                    bad.append(f"{where}: override {key}: not a pretraining config key (after "
                               f"{recipe_path}'s _BASE_ chain){did_you_mean(key, keys)}")
            problems += bad
            given = dict(str(o).split("=", 1) for o in overrides if "=" in str(o))
            inputs.append((f"pretrain/{label}/", given.get("DATA.ROOT", cfg.DATA.ROOT)))
            if bad:
                continue
            rule = given.get("MODEL.METHOD", cfg.MODEL.METHOD)
            if ":" in rule:
                continue   # a plug-in rule: imported only when pretraining starts
            methods = methods if methods is not None else _pretrain_methods()
            if rule not in methods:
                problems.append(f"{where}: MODEL.METHOD {rule!r} is not a registered rule (rules: "
                                f"{', '.join(methods)}){did_you_mean(rule, methods)}")
                continue
            from .pretrain.rules import RULES

            if rule in RULES:   # an entry point's code is not run by a preflight
                try:
                    pcfg.load_config(Job._abs(recipe_path), overrides)
                except LocoError as e:
                    problems.append(f"{where}: {e}")
    return problems, inputs


def _check_detection(grid, tpl):
    """Each detection config loads with Detectron2's own loader (after _BASE_), and every override
    key of the grid is one of its keys, with a value Detectron2 accepts."""
    det = grid.get("detection") or {}
    configs = det.get("configs") or []
    if not configs:
        return []
    from .detection.config import setup_cfg
    from .fingerprint import flatten

    problems = []
    folder = os.path.join(REPO, "det_configs")
    names = sorted(f for f in os.listdir(folder) if f.endswith(".yaml")) \
        if os.path.isdir(folder) else []
    for i, spec in enumerate(configs):
        config = _det_config_path(spec["config"])
        if not os.path.isfile(Job._abs(config)):
            problems.append(f"detection.configs[{i}]: no config {config}"
                            + did_you_mean(os.path.basename(config), names))
            continue
        try:
            cfg = setup_cfg(Job._abs(config))
        except LocoError as e:
            problems.append(f"detection.configs[{i}]: {e}")
            continue
        keys = flatten(cfg)
        seed = _first(spec.get("seeds"))
        for where, overrides in (("detection.overrides", det.get("overrides")),
                                 (f"detection.configs[{i}].overrides", spec.get("overrides"))):
            chain = "" if where == "detection.overrides" else f" (after {config}'s _BASE_ chain)"
            for key, value in (overrides or {}).items():
                if key not in keys:
                    problems.append(f"{where}: {key} is not a key of Detectron2's config"
                                    f"{chain}{did_you_mean(key, keys)}")
                    continue
                trial = cfg.clone()
                try:
                    trial.merge_from_list([key, str(tpl(str(value), label="x", seed=seed))])
                except (KeyError, ValueError, AssertionError, TypeError) as e:
                    problems.append(f"{where}: {key} {value!r}: {_one_line(e)} ({config})")
    return problems


def _check_external(grid, tpl):
    """Each external checkpoint exists, holds one ResNet the converter finds (with the entry's
    take / prefix) and is of the layout the entry names, if it names one."""
    problems = []
    for i, spec in enumerate(grid.get("external") or []):
        if not isinstance(spec, dict) or not spec.get("path"):
            continue   # expand() names the missing key
        where = f"external[{i}] {spec.get('label')}"
        ckpt = tpl(str(spec["path"]))
        if not os.path.isfile(Job._abs(ckpt)):
            continue   # the input check names it
        from .detection import convert

        try:
            obj, _ = convert.load_checkpoint(Job._abs(ckpt))
            state, _, info = convert.extract_encoder(obj, ckpt, spec.get("prefix"),
                                                     spec.get("take"))
            convert.infer_resnet(state, ckpt, info["arch_hint"])
        except LocoError as e:
            problems.append(f"{where}: {e}")
            continue
        want = spec.get("layout")
        if want and str(want).lower() not in info["layout"].lower():
            problems.append(f"{where}: {ckpt} is a {info['layout']!r} checkpoint; the grid says "
                            f"layout {want!r}")
    return problems


def _made_by(path, made):
    """Whether `path` is made by one of `made` (outputs of earlier jobs): the same path, a path
    inside one (a data job's folder, a pretraining run), or a folder holding one."""
    path = os.path.normpath(path)
    return any(path == m or path.startswith(m + os.sep) or m.startswith(path + os.sep)
               for m in made)


def missing_inputs(jobs, pretrain_inputs):
    """{path: [job ids]}: input paths (pretraining DATA.ROOT, readout and kNN --data and
    --checkpoint, conversion inputs, Detectron2's dataset root) that neither exist nor are made
    by an earlier job."""
    made, missing = [], {}
    for job in jobs:
        need = list(job.requires)
        if job.stage == "pretrain":
            need += [p for prefix, p in pretrain_inputs if job.id.startswith(prefix)][:1]
        elif job.stage in ("readout", "knn"):
            need += [job.argv[i + 1] for i, a in enumerate(job.argv[:-1])
                     if a in ("--data", "--checkpoint")]
        elif job.stage == "detection":
            need.append(job.env.get("DETECTRON2_DATASETS")
                        or os.environ.get("DETECTRON2_DATASETS", "datasets"))
        for p in need:
            if p and not os.path.exists(Job._abs(p)) and not _made_by(p, made):
                missing.setdefault(p, []).append(job.id)
        if job.stage == "data" and job.output:
            made.append(os.path.normpath(os.path.dirname(job.output) or job.output))
        elif job.output:
            made.append(os.path.normpath(job.output))
    return missing


def _check_keys(mapping, allowed, where):
    """A misspelt key (seed: instead of seeds:) would silently change the grid: refuse it."""
    if mapping is None:
        return
    if not isinstance(mapping, dict):
        raise LocoError(f"grid: {where} must be a mapping")
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise LocoError(f"grid: {where}: unknown key(s) {', '.join(unknown)} "
                        f"(known: {', '.join(allowed)}){did_you_mean(unknown[0], allowed)}")


def _resources(*specs):
    res = dict(DEFAULT_RESOURCES)
    for spec in specs:
        for key, value in (spec or {}).items():
            if key not in DEFAULT_RESOURCES:
                raise LocoError(f"grid: unknown resource '{key}' (known: "
                                f"{', '.join(DEFAULT_RESOURCES)})")
            res[key] = value
    return res


def _rel(path):
    """Paths in commands are relative to the repo root (jobs run there) when inside it."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, REPO)
    return path if rel.startswith("..") else rel


def _python(argv):
    return [sys.executable if a == "python" and i == 0 else a for i, a in enumerate(argv)]


def _torchrun():
    local = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return local if os.path.exists(local) else "torchrun"


EXTERNAL_SUFFIX = "(external)"   # after an external entry's label, in the report too


def external_options(spec, tpl=lambda v: v):
    """The converter's options (--take, --prefix) an `external` entry gives, for every tool."""
    opts = []
    for key in ("take", "prefix"):
        if spec.get(key) not in (None, ""):
            opts += [f"--{key}", str(tpl(str(spec[key])))]
    return opts


def _recipe_path(recipe):
    """A recipe named without a folder is one of pretrain/."""
    return recipe if os.path.dirname(recipe) else os.path.join("pretrain", recipe)


def _det_config_path(config):
    """A detection config named without a folder is one of det_configs/."""
    return config if os.path.dirname(config) else os.path.join("det_configs", config)


def _stem(name):
    return os.path.splitext(os.path.basename(name))[0]


def expand(grid, out):
    """(jobs in dependency order, notes, missing): every job of the grid, one-line notes, and
    manifest entries for expected runs that cannot be produced (no supervised weights)."""
    out_rel = _rel(out)
    variables = dict(grid.get("vars") or {}, out=out_rel)
    tpl = _Templates(variables)
    env = {k: tpl(str(v)) for k, v in (grid.get("env") or {}).items()}
    jobs, notes, missing = [], [], []

    def add(job):
        job.env = env
        if any(j.id == job.id for j in jobs):
            raise LocoError(f"grid: two jobs write to {job.id}; give them distinct labels")
        jobs.append(job)
        return job

    def path(*parts):
        """(job id, path): the id is the output path below the grid's out dir."""
        job_id = "/".join(str(p) for p in parts)
        return job_id, os.path.join(out_rel, job_id)

    # data
    data_ids = []
    for i, spec in enumerate(grid.get("data") or []):
        _check_keys(spec, SCHEMA["data"][0], f"data[{i}]")
        if "command" not in spec:
            raise LocoError(f"grid: data[{i}] needs a command")
        for seed in spec.get("seeds", [None]):
            local = {} if seed is None else {"seed": seed}
            name = tpl(spec.get("name", f"data{i}"), **local)
            job = add(Job(f"data/{name}", "data", _python(tpl(spec["command"], **local)),
                          output=tpl(spec.get("creates", ""), **local),
                          done_file=tpl(spec.get("creates", ""), **local),
                          resources=_resources(spec.get("resources")), seed=seed))
            data_ids.append(job.id)

    # pretraining: methods x recipe x seeds per block
    # (source name, label, weights path, convert job id or None, pretraining seed or None)
    sources = []
    readout = grid.get("readout")
    convert_res = _resources((grid.get("convert") or {}).get("resources"))
    if readout is not None:
        _check_keys(readout, SCHEMA["readout"], "readout")
    _check_keys(grid.get("convert"), SCHEMA["convert"], "convert")
    knn = grid.get("knn")
    _check_keys(knn, SCHEMA["knn"], "knn")
    if knn is not None and readout is None:
        raise LocoError("grid: knn needs a readout section (knn.json goes beside readout.json)")

    def add_knn(source, ro_id, ro_dir, deps, **local):
        """kNN readout job (id knn/...) writing knn.json into readout job `ro_id`'s folder."""
        if knn is None:
            return
        argv = ["python", *CLI, "knn", *source, "--output-dir", ro_dir]
        add(Job("knn/" + ro_id.split("/", 1)[1], "knn",
                _python(argv + tpl(knn.get("args", []), **local)), ro_dir,
                done_file=os.path.join(ro_dir, "knn.json"), deps=deps,
                resources=_resources(knn.get("resources")), label=local["label"],
                seed=local.get("seed")))

    for i, block in enumerate(grid.get("pretrain") or []):
        _check_keys(block, SCHEMA["pretrain"][0], f"pretrain[{i}]")
        if "recipe" not in block or "methods" not in block:
            raise LocoError(f"grid: pretrain[{i}] needs methods and recipe")
        res = _resources(block.get("resources"))
        for method in block["methods"]:
            recipe = tpl(block["recipe"], method=method)
            recipe_path = _recipe_path(recipe)
            label = tpl(block.get("label", "{recipe}"), method=method,
                        recipe=_stem(recipe))
            for seed in block.get("seeds", [0]):
                local = dict(method=method, recipe=_stem(recipe), label=label, seed=seed)
                job_id, run_dir = path("pretrain", label, f"seed{seed}")
                argv = _pretrain_launcher(res) + [
                    *CLI, "pretrain", "--config-file", recipe_path, f"SEED={seed}"] + [
                    tpl(o, **local) for o in block.get("overrides", [])] + [
                    "--output-dir", run_dir]
                pre = add(Job(job_id, "pretrain", argv, run_dir,
                              done_file=os.path.join(run_dir, "summary.json"),
                              resume_file=os.path.join(run_dir, "checkpoint_last.pth"),
                              deps=list(data_ids), resources=res, label=label,
                              config=_stem(recipe), seed=seed))
                ckpt = os.path.join(run_dir, "checkpoint_last.pth")
                if readout is not None:
                    job_id, ro_dir = path("readout", label, f"seed{seed}")
                    add(Job(job_id, "readout", _python(
                        ["python", *CLI, "readout", "--checkpoint", ckpt,
                         "--output-dir", ro_dir] + tpl(readout.get("args", []), **local)),
                        ro_dir, done_file=os.path.join(ro_dir, "readout.json"),
                        deps=[pre.id], resources=_resources(readout.get("resources")),
                        label=label, seed=seed))
                    add_knn(["--checkpoint", ckpt], job_id, ro_dir, [pre.id], **local)
                job_id, pkl = path("weights", f"{label.replace('/', '_')}_seed{seed}.pkl")
                conv = add(Job(job_id, "convert", _python(
                    ["python", *CLI, "convert", ckpt, pkl, "--verify"]), pkl,
                    done_file=pkl, deps=[pre.id], resources=convert_res, label=label,
                    seed=seed))
                sources.append((f"{label}_seed{seed}", label, pkl, conv.id, seed))

    # checkpoints from elsewhere: the same readout, kNN, conversion and detection as a
    # pretrained row, from the file as it is (no pretraining seed: every detection seed runs)
    for i, spec in enumerate(grid.get("external") or []):
        _check_keys(spec, SCHEMA["external"][0], f"external[{i}]")
        if not spec.get("label") or not spec.get("path"):
            raise LocoError(f"grid: external[{i}] needs a label and a path")
        name, ckpt = str(tpl(str(spec["label"]))), tpl(str(spec["path"]))
        label = f"{name} {EXTERNAL_SUFFIX}"
        pick = external_options(spec, tpl)
        if readout is not None:
            local = dict(label=label, seed=0)
            job_id, ro_dir = path("readout", "external", name)
            add(Job(job_id, "readout", _python(
                ["python", *CLI, "readout", "--checkpoint", ckpt, *pick,
                 "--output-dir", ro_dir] + tpl(readout.get("args", []), **local)),
                ro_dir, done_file=os.path.join(ro_dir, "readout.json"), deps=list(data_ids),
                resources=_resources(readout.get("resources")), label=label, requires=[ckpt]))
            add_knn(["--checkpoint", ckpt, *pick], job_id, ro_dir, list(data_ids), **local)
        job_id, pkl = path("weights", f"external_{name.replace('/', '_')}.pkl")
        conv = add(Job(job_id, "convert", _python(
            ["python", *CLI, "convert", ckpt, pkl, "--verify", *pick]), pkl,
            done_file=pkl, resources=convert_res, label=label, requires=[ckpt]))
        sources.append((f"external_{name.replace('/', '_')}", label, pkl, conv.id, None))

    if readout is not None:
        random_init = readout.get("random_init") or {}
        _check_keys(random_init, SCHEMA["readout"]["random_init"], "readout.random_init")
        arch = random_init.get("arch")
        if not arch:
            raise LocoError("grid: readout.random_init.arch is required (the random-init "
                            "readout baseline)")
        for seed in random_init.get("seeds", [0]):   # seed S: the initial encoder of SEED=S
            job_id, ro_dir = path("readout", "random", f"seed{seed}")
            add(Job(job_id, "readout", _python(
                ["python", *CLI, "readout", "--random-init", "--arch", arch,
                 "--output-dir", ro_dir] + tpl(readout.get("args", []), label="random",
                                               seed=seed)),
                ro_dir, done_file=os.path.join(ro_dir, "readout.json"), deps=list(data_ids),
                resources=_resources(readout.get("resources")), label="random", seed=seed))
            add_knn(["--random-init", "--arch", arch], job_id, ro_dir, list(data_ids),
                    label="random", seed=seed)

    # baselines: random init always; supervised from a path (converted here unless a .pkl)
    det = grid.get("detection") or {}
    _check_keys(det, SCHEMA["detection"], "detection")
    sources.append(("random", "random", None, None, None))
    supervised = det.get("supervised_weights")
    supervised_missing = None
    if supervised:
        weights = tpl(str(supervised))   # relative paths: from the repo root, like configs
        if weights.endswith(".pkl"):
            sources.append((PUBLISHED_NAME, PUBLISHED_LABEL, weights, None, None))
        else:
            job_id, pkl = path("weights", PUBLISHED_NAME + ".pkl")
            conv = add(Job(job_id, "convert", _python(
                ["python", *CLI, "convert", weights, pkl, "--verify"]), pkl,
                done_file=pkl, resources=convert_res, label=PUBLISHED_LABEL,
                requires=[weights]))
            sources.append((PUBLISHED_NAME, PUBLISHED_LABEL, pkl, conv.id, None))
    elif det.get("configs"):
        supervised_missing = ("no published supervised-ImageNet weights given in the grid "
                              "(detection.supervised_weights): that baseline is not run")
        notes.append(supervised_missing)

    det_res = det.get("resources")
    for i, spec in enumerate(det.get("configs") or []):
        _check_keys(spec, SCHEMA["detection"]["configs"][0], f"detection.configs[{i}]")
        if "config" not in spec:
            raise LocoError(f"grid: detection.configs[{i}] needs a config")
        config = _det_config_path(spec["config"])
        res = _resources(det_res, spec.get("resources"))
        unpaired = sorted({str(src[4]) for src in sources if src[4] is not None}
                          - {str(x) for x in spec.get("seeds", [0])})
        if spec.get("pair_seeds") and unpaired:
            raise LocoError(f"grid: detection.configs[{i}] has pair_seeds but not the "
                            f"pretraining seed(s) {', '.join(unpaired)} among its seeds")
        overrides = dict(det.get("overrides") or {})
        overrides.update(spec.get("overrides") or {})
        for seed in spec.get("seeds", [0]):
            for name, label, weights, conv_id, pre_seed in sources:
                # pair_seeds: a pretrained backbone runs once, with its own pretraining seed
                # (n seeds = n runs of the whole chain); baselines run every seed
                if spec.get("pair_seeds") and pre_seed is not None and pre_seed != seed:
                    continue
                job_id, run_dir = path("det", _stem(config), name, f"seed{seed}")
                local = dict(label=label, seed=seed)
                opts = ["SEED", str(seed)]
                for key, value in overrides.items():
                    opts += [key, str(tpl(str(value), **local))]
                opts += ["LOCO_DET.LABEL", label]
                if weights is None:   # (a missing config: named by the preflight)
                    opts += ["LOCO_DET.FROM_SCRATCH", "True"] + (random_init_opts(
                        config, overrides) if os.path.isfile(Job._abs(config)) else [])
                opts += ["OUTPUT_DIR", run_dir, "MODEL.WEIGHTS", weights or ""]
                head = _python(["python", *CLI, "train", "--config-file", config,
                                "--num-gpus", str(max(int(res["gpus_per_node"]), 1))])
                if int(res["nodes"]) > 1:
                    head += ["--num-machines", str(res["nodes"]), "--machine-rank", "$NODE_RANK",
                             "--dist-url", f"tcp://$MASTER_ADDR:{DETECTION_PORT}"]
                add(Job(job_id, "detection", head + opts, run_dir,
                        done_file=os.path.join(run_dir, "results.json"),
                        resume_file=os.path.join(run_dir, "last_checkpoint"),
                        resume_at=len(head), deps=list(data_ids) + ([conv_id] if conv_id else []),
                        resources=res, label=label, config=_stem(config), seed=seed))
            if supervised_missing:
                missing.append(dict(kind="detection", label=PUBLISHED_LABEL,
                                    config=_stem(config), seed=seed, note=supervised_missing,
                                    output=path("det", _stem(config), PUBLISHED_NAME,
                                                f"seed{seed}")[0]))

    add(Job("report", "report", _python(["python", *CLI, "report", out_rel, "--output-dir", out_rel]),
            os.path.join(out_rel, "report.md"), deps=[j.id for j in jobs]))
    return jobs, notes, missing


TRAINABLE_NORMS = ("BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "GN")


@functools.lru_cache(maxsize=None)
def _det_cfg(path, mtime_ns):   # one load per file version: random_init_opts asks per job
    from .detection.config import setup_cfg

    return setup_cfg(path)


def config_value(config, dotted, overrides=None):
    """`dotted` as the grid's overrides, else the Detectron2 config file `config` (loaded by
    Detectron2's own loader: its _BASE_ chain over Detectron2's defaults) resolve it."""
    if overrides and dotted in overrides:
        return yaml.safe_load(str(overrides[dotted]))
    path = config if os.path.isabs(config) else os.path.join(REPO, config)
    try:
        node = _det_cfg(path, os.stat(path).st_mtime_ns if os.path.exists(path) else 0)
    except LocoError as e:
        raise LocoError(f"grid: detection config {config}: {e}") from None
    for part in dotted.split("."):
        node = node[part]
    return node


def random_init_opts(config, overrides=None):
    """Overrides that make the random-init baseline mean what it says. On a fine-tuning config
    (FREEZE_AT < 5) the whole backbone trains from scratch: FREEZE_AT 0, with a norm that can be
    trained from scratch (the config's if it trains, else SyncBN; BN in one process), as in He et
    al., "Rethinking ImageNet Pre-training". A frozen readout config (FREEZE_AT >= 5) stays
    frozen: that is what readout means."""
    if int(config_value(config, "MODEL.BACKBONE.FREEZE_AT", overrides)) >= 5:
        return []
    norm = config_value(config, "MODEL.RESNETS.NORM", overrides)
    return ["MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.RESNETS.NORM",
            norm if norm in TRAINABLE_NORMS else "SyncBN"]


def _pretrain_launcher(res):
    """python for one process; torchrun for several (one node: --standalone; several nodes:
    c10d rendezvous on the first node, filled in on the SLURM node)."""
    nproc, nodes = max(int(res["gpus_per_node"]), 1), int(res["nodes"])
    if nproc == 1 and nodes == 1:
        return [sys.executable]
    if nodes == 1:
        return [_torchrun(), "--standalone", "--nnodes", "1", "--nproc_per_node", str(nproc)]
    return [_torchrun(), "--nnodes", str(nodes), "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"$MASTER_ADDR:{PRETRAIN_PORT}",
            "--rdzv_id", "$JOB_ID"]


def write_manifest(out, grid_path, profile, sets, jobs, missing):
    """benchmark.json: what the grid expects, so the report lists runs that never started.
    Outputs are relative to the manifest's folder."""
    entries = [{"kind": job.stage, "id": job.id, "label": job.label, "config": job.config,
                "seed": job.seed, "output": job.id}
               for job in jobs if job.stage in ("pretrain", "readout", "detection")]
    entries += missing
    write_json(os.path.join(out, "benchmark.json"), {
        "kind": "benchmark_manifest", "grid": os.path.abspath(grid_path), "profile": profile,
        "set": list(sets), "jobs": entries})


# ----------------------------------------------------------------------------- running

def _fmt_time(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _res_text(res):
    gpus = int(res["gpus_per_node"])
    where = f"{res['nodes']} node(s) x {gpus} GPU(s)" if gpus else "CPU"
    return f"{where}, {res['cpus_per_task']} CPUs, {res['time_min']} min"


def dry_run(jobs, notes, missing, notices=(), blocked=None):
    """Print every command (with --resume where a checkpoint exists) and what would be skipped;
    `blocked` ({job id: input}) marks jobs whose input is missing."""
    w = sys.stdout.write
    blocked = blocked or {}
    for i, job in enumerate(jobs, 1):
        state = "skip: results exist" if job.is_done() else (
            f"cannot run: {blocked[job.id]} missing" if job.id in blocked else
            "resume" if job.resuming() else "run")
        w(f"# [{i}/{len(jobs)}] {job.stage} {job.id} ({state}; {_res_text(job.resources)})\n")
        w(shlex.join(job.command()) + "\n")
    for note in notes:
        w(f"# note: {note} ({len(missing)} runs)\n")
    for notice in notices:
        w(f"# note: {notice}\n")
    counts = {s: sum(j.stage == s for j in jobs) for s in STAGES}
    w(f"# {len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "\n")


def _log_path(out, job):
    return os.path.join(out, "logs", job.id.replace("/", "__") + ".log")


def _run_command(job, out, quiet, live=None, extra_env=None):
    """Run one job, streaming its output to the terminal (unless quiet) and to its log. `live`
    (a set) holds the running process, so that the caller can stop it from another thread;
    `extra_env` goes under the job's own environment."""
    log = _log_path(out, job)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    env = dict(os.environ, **(extra_env or {}), **job.env, PYTHONUNBUFFERED="1")
    try:   # never append through a link planted where the log goes
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        raise LocoError(f"cannot open the job log {log}: "
                        + ("it is a symbolic link; refusing to write through it"
                           if os.path.islink(log) else (e.strerror or str(e)))) from None
    with os.fdopen(fd, "ab") as f:
        f.write(f"$ {shlex.join(job.command())}\n".encode())
        f.flush()
        proc = subprocess.Popen(job.command(), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
        if live is not None:
            live.add(proc)
        try:
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                f.write(chunk)
                if not quiet:
                    if hasattr(sys.stdout, "buffer"):
                        sys.stdout.buffer.write(chunk)
                    else:
                        sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
            return proc.wait(), log
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        finally:
            if live is not None:
                live.discard(proc)


def _start_check(job, status, n_jobs):
    """Why `job` cannot start now ("skipped"/"blocked"/"failed" with a reason), "wait" while a
    dependency is unfinished, or None when it can run."""
    if job.is_done():
        return "skipped", f"results exist: {job.done_file}"
    if job.stage == "report":   # written in any case, after every other job
        return ("wait", "") if len(status) < n_jobs - 1 else None
    if any(d not in status for d in job.deps):
        return "wait", ""
    bad = [d for d in job.deps if status[d] in ("failed", "blocked")]
    if bad:
        return "blocked", f"dependency failed: {bad[0]}"
    missing = [p for p in job.requires if not os.path.exists(Job._abs(p))]
    if missing:
        return "failed", f"input not found: {missing[0]}"
    if int(job.resources["nodes"]) > 1:
        return "failed", f"needs {job.resources['nodes']} nodes: use --launcher slurm"
    return None


def local_env(workers, environ=None):
    """Environment additions for `workers` concurrent local jobs: each job gets an equal share of
    the CPUs as its thread count (OMP_NUM_THREADS), unless the caller set one; PyTorch's default
    (one thread per core in every process) would oversubscribe the machine."""
    environ = os.environ if environ is None else environ
    if workers <= 1 or "OMP_NUM_THREADS" in environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}


class GpuSlices:
    """CUDA_VISIBLE_DEVICES of concurrent local jobs (--jobs N > 1 on a machine with GPUs):
    each job gets `gpus_per_node` GPUs no running job holds, a CPU job (0) gets none, so that
    no two jobs share cuda:0. A job waits until enough GPUs are free. Inactive (no variable set)
    with one job at a time or no GPU: that job sees every GPU, as before."""

    def __init__(self, gpus, active):
        self.all, self.free = list(gpus), list(gpus)
        self.active = bool(active and self.all)

    @classmethod
    def for_machine(cls, workers, environ=None):
        environ = os.environ if environ is None else environ
        if workers <= 1:
            return cls([], False)
        if "CUDA_VISIBLE_DEVICES" in environ:
            gpus = [g.strip() for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
        else:
            import torch  # only here: a dry run or a single worker stays fast

            gpus = [str(i) for i in range(torch.cuda.device_count())]
        return cls(gpus, True)

    def take(self, job):
        """(environment additions, None) when the job can start now; (None, None) while it
        must wait; (None, reason) when this machine can never run it."""
        if not self.active:
            return {}, None
        n = int(job.resources["gpus_per_node"])
        if n > len(self.all):
            return None, f"needs {n} GPUs, this machine has {len(self.all)}"
        if n > len(self.free):
            return None, None
        ids, self.free = self.free[:n], self.free[n:]
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}, None

    def give(self, env):
        if self.active and env.get("CUDA_VISIBLE_DEVICES"):
            self.free += env["CUDA_VISIBLE_DEVICES"].split(",")


def run_local(jobs, notes, out, quiet=False, workers=1):
    """Run jobs in dependency order, up to `workers` at a time (each started as soon as its
    dependencies are done, in grid order); returns the exit status (0 only when every job is
    done or skipped). With several workers the jobs' output goes to their logs only."""
    import concurrent.futures as cf

    if workers < 1:
        raise LocoError(f"--jobs must be at least 1, got {workers}")
    status = {}   # id -> done | skipped | failed | blocked
    failed_logs = {}
    start_all = time.time()
    n = len(jobs)
    width = len(str(n))
    tags = {job.id: f"[{i:>{width}}/{n}]" for i, job in enumerate(jobs, 1)}
    extra_env = local_env(workers)
    gpus = GpuSlices.for_machine(workers)
    quiet = quiet or workers > 1
    for note in notes:
        print(f"note: {note}")
    if workers > 1:
        print(f"note: {workers} jobs at a time"
              + (f", OMP_NUM_THREADS={extra_env['OMP_NUM_THREADS']} each" if extra_env else "")
              + (f", GPUs {','.join(gpus.all)} shared out by gpus_per_node (CPU jobs get none)"
                 if gpus.active else "")
              + f"; their output goes to {_rel(os.path.join(out, 'logs'))}/", flush=True)
    live = set()
    running = {}   # future -> (job, start time)
    took_s = {}    # job id -> seconds it ran (for the estimate of what is left)
    pending = list(jobs)

    def run(job, devices):
        if job.stage == "report":
            return _write_report(out), None
        try:
            return _run_command(job, out, quiet, live, dict(extra_env, **devices))
        except LocoError as e:
            print(f"error: {job.id}: {e}", flush=True)
            return 1, None
        except OSError as e:
            print(f"error: {job.id}: cannot start {job.command()[0]}: {e.strerror}", flush=True)
            return 127, None

    pool = cf.ThreadPoolExecutor(max_workers=workers)
    try:
        while pending or running:
            for job in list(pending):
                if len(running) >= workers:
                    break
                check = _start_check(job, status, n)
                if check is not None and check[0] == "wait":
                    continue
                devices = {}
                if check is None and job.stage != "report":
                    devices, never = gpus.take(job)
                    if devices is None and never is None:
                        continue   # waits for GPUs that running jobs hold
                    if never is not None:
                        check = ("failed", never)
                pending.remove(job)
                if check is not None:
                    status[job.id] = check[0]
                    print(f"{tags[job.id]} {check[0]:<8} {job.id}  ({check[1]})", flush=True)
                    continue
                what = "resuming" if job.resuming() else "running"
                print(f"{tags[job.id]} {what} {job.id}: {shlex.join(job.command())}",
                      flush=True)
                running[pool.submit(run, job, devices)] = (job, time.time(), devices)
            if not running:
                if pending:   # cannot happen with dependencies on earlier jobs; never spin
                    raise LocoError(f"grid: job {pending[0].id} waits for a job that never runs")
                break
            finished, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                job, t0, devices = running.pop(fut)
                gpus.give(devices)
                rc, log = fut.result()
                took = _fmt_time(time.time() - t0)
                took_s[job.id] = time.time() - t0
                if rc == 0:
                    status[job.id] = "done"
                    print(f"{tags[job.id]} done     {job.id}  ({took}; "
                          f"{_progress_line(jobs, status, took_s, workers, start_all)})",
                          flush=True)
                else:
                    status[job.id] = "failed"
                    failed_logs[job.id] = log
                    print(f"{tags[job.id]} failed   {job.id}  (exit {rc}, {took}"
                          + (f"; log: {_rel(log)}" if log else "") + ")", flush=True)
    except BaseException:
        for proc in list(live):   # Ctrl-C / SIGTERM: stop every running job, then report
            proc.terminate()
        for proc in list(live):
            proc.wait()
        raise
    finally:
        pool.shutdown(wait=True)
    counts = {s: sum(v == s for v in status.values())
              for s in ("done", "skipped", "failed", "blocked")}
    print(f"summary: {n} jobs in {_fmt_time(time.time() - start_all)}: "
          + ", ".join(f"{v} {k}" for k, v in counts.items()), flush=True)
    for job_id, log in failed_logs.items():
        print(f"  failed: {job_id}" + (f" (log: {_rel(log)})" if log else ""))
    if status.get("report") == "done":
        print(f"report: {_rel(os.path.join(out, 'report.md'))}")
    return 1 if counts["failed"] or counts["blocked"] else 0


def _progress_line(jobs, status, took_s, workers, start_all):
    """"K/N settled, M elapsed, ~T left": the grid's overall progress after a job ends. What is
    left is estimated per stage from the jobs of that stage that ran here (a stage with none
    yet is left out and named), divided by the jobs run at a time."""
    seen = {}
    for job in jobs:
        if job.id in took_s and status.get(job.id) == "done":
            seen.setdefault(job.stage, []).append(took_s[job.id])
    left, unknown = 0.0, set()
    for job in jobs:
        if job.id in status:
            continue
        if job.stage in seen:
            left += sum(seen[job.stage]) / len(seen[job.stage])
        elif job.stage != "report":
            unknown.add(job.stage)
    text = (f"{len(status)}/{len(jobs)} settled, {_fmt_time(time.time() - start_all)} elapsed, "
            f"~{_fmt_time(left / workers)} left")
    if unknown:
        text += " + " + ", ".join(s for s in STAGES if s in unknown) + " (none timed yet)"
    return text


def _write_report(out):
    from .report import write_report

    try:
        write_report([out], out)
    except LocoError as e:
        print(f"error: report: {e}", flush=True)
        return 1
    return 0


class SlurmCommand:
    """What submitit pickles and runs on each node of a job's allocation: fills in the runtime
    placeholders, decides --resume there (a requeued job resumes), and runs the command."""

    def __init__(self, job):
        self.job = job

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        values = {"$MASTER_ADDR": env.hostnames[0], "$NODE_RANK": str(env.global_rank),
                  "$JOB_ID": str(env.job_id)}
        argv = self.job.command()
        for key, value in values.items():
            argv = [a.replace(key, value) for a in argv]
        subprocess.run(argv, cwd=REPO, env=dict(os.environ, **self.job.env), check=True)


def run_slurm(jobs, notes, out, slurm_options):
    """Submit every job that is not finished, each with afterok dependencies on its unfinished
    dependencies; the report job runs after all of them (afterany)."""
    if shutil.which("sbatch") is None:
        raise LocoError("--launcher slurm needs SLURM (sbatch not found on PATH)")
    import submitit

    for note in notes:
        print(f"note: {note}")
    submitted = {}
    # A submission that fails leaves nothing behind: jobs already queued are cancelled, and
    # what this call wrote (submitit's files below OUT/slurm/) is removed.
    before = _existing(out)
    try:
        _submit_all(jobs, out, slurm_options, submitted, submitit)
    except BaseException as e:
        cancelled = _cancel(submitted)
        _remove_new(out, before)
        if isinstance(e, Exception):
            raise LocoError(f"SLURM submission failed: {_one_line(e)}; {cancelled}nothing was "
                            "written") from None
        raise
    write_json(os.path.join(out, "slurm_jobs.json"), submitted)
    print(f"summary: {len(submitted)} jobs submitted, {len(jobs) - len(submitted)} skipped; "
          f"report after all: {_rel(os.path.join(out, 'report.md'))}")
    return 0


def _existing(out):
    """(whether `out` exists, the entries of OUT/slurm or None): what `_remove_new` keeps."""
    folder = os.path.join(out, "slurm")
    return os.path.isdir(out), (set(os.listdir(folder)) if os.path.isdir(folder) else None)


def _remove_new(out, before):
    """Remove what a failed submission wrote: submitit's files and job folders below OUT/slurm
    (new entries only: earlier jobs' folders stay), and OUT/slurm and OUT if they are new."""
    out_existed, entries = before
    folder = os.path.join(out, "slurm")
    if not out_existed:
        shutil.rmtree(out, ignore_errors=True)
    elif entries is None:
        shutil.rmtree(folder, ignore_errors=True)
    elif os.path.isdir(folder):
        for name in set(os.listdir(folder)) - entries:
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)


def _cancel(submitted):
    """scancel the jobs already queued; what the message says about them."""
    if not submitted:
        return ""
    ids = list(submitted.values())
    try:
        rc = subprocess.run(["scancel", *ids], capture_output=True).returncode
    except OSError:
        rc = None
    if rc == 0:
        return f"the {len(ids)} job(s) already queued were cancelled ({', '.join(ids)}); "
    return f"cancel the {len(ids)} job(s) already queued: scancel {' '.join(ids)}; "


def _submit_all(jobs, out, slurm_options, submitted, submitit):
    options = {k: v for k, v in (slurm_options or {}).items() if v is not None}
    additional = dict(options.pop("additional_parameters", None) or {})
    for job in jobs:
        if job.stage != "report" and job.is_done():
            print(f"skipped  {job.id}  (results exist: {job.done_file})")
            continue
        deps = [submitted[d] for d in job.deps if d in submitted]
        res = job.resources
        # SlurmExecutor directly: AutoExecutor's plugin discovery needs pkg_resources.
        cpus = int(res["cpus_per_task"])
        # srun does not inherit --cpus-per-task from sbatch on Slurm 22.05-23.02: without it
        # the task (torchrun, its ranks and their loader workers) would get one CPU.
        params = dict(options, job_name=f"loco_det:{job.id}", nodes=int(res["nodes"]),
                      ntasks_per_node=1, cpus_per_task=cpus, time=int(res["time_min"]),
                      srun_args=[*options.get("srun_args", []), f"--cpus-per-task={cpus}"])
        if int(res["gpus_per_node"]):
            params["gpus_per_node"] = int(res["gpus_per_node"])
        if res.get("mem_gb"):
            params["mem"] = f"{res['mem_gb']}GB"
        extra = dict(additional)
        if deps:
            kind = "afterany" if job.stage == "report" else "afterok"
            params["dependency"] = f"{kind}:" + ":".join(deps)
            extra["kill-on-invalid-dep"] = "yes"
        if extra:
            params["additional_parameters"] = extra
        executor = submitit.SlurmExecutor(folder=os.path.join(out, "slurm", "%j"))
        executor.update_parameters(**params)
        submitted[job.id] = str(executor.submit(SlurmCommand(job)).job_id)
        print(f"submitted {job.id}  (job {submitted[job.id]}; {_res_text(res)}"
              + (f"; after {', '.join(deps)}" if deps else "") + ")")
