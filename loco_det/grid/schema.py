"""A grid file: what it may hold (the schema), loading it with a profile's and --set's
dotted-path overrides (a path the schema lacks is an error with a did-you-mean hint), the
per-section key checks, and `{name}` templates from the grid's vars.

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

Resources: nodes, gpus_per_node (0 = CPU), cpus_per_task, mem_gb, time_min. Runtime
placeholders in commands ($MASTER_ADDR, $NODE_RANK, $JOB_ID) are filled in on the SLURM node.
Jobs run in the repository root, so relative paths in a grid are relative to it; {out} is the
output folder (--out, relative to the current directory) as seen from there.
"""
import copy
import os
import re

import yaml

from ..utils import LocoError, did_you_mean
from .jobs import DEFAULT_RESOURCES

# slurm: keys a grid may set without --allow-commands. submitit's `setup` and `srun_args`, and
# sbatch options such as --wrap, --output or --chdir, run commands or write outside --out.
SLURM_KEYS = ("partition", "account", "qos", "constraint", "comment", "exclude", "nodelist",
              "reservation", "signal_delay_s", "max_num_timeout", "additional_parameters")
SLURM_EXTRA_KEYS = ("exclusive", "gres", "hint", "mail_type", "mail_user", "requeue",
                    "cpus_per_gpu", "mem_per_cpu", "gpus_per_task", "nice", "begin", "licenses",
                    "switches", "kill-on-invalid-dep")


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


class Templates:
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


def check_keys(mapping, allowed, where):
    """A misspelt key (seed: instead of seeds:) would silently change the grid: refuse it."""
    if mapping is None:
        return
    if not isinstance(mapping, dict):
        raise LocoError(f"grid: {where} must be a mapping")
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise LocoError(f"grid: {where}: unknown key(s) {', '.join(unknown)} "
                        f"(known: {', '.join(allowed)}){did_you_mean(unknown[0], allowed)}")
