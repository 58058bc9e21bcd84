"""Shipped recipes and configs by name: `cpu_loco` is pretrain/cpu_loco.yaml of the checkout this
package lives in (the Makefile installs it editable), so commands run from any folder."""
import difflib
import os

from .utils import LocoError

# The checkout holding this package: recipes, det configs and grids live beside it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {"pretrain": "pretrain", "detection": "det_configs", "grid": os.path.join("det_configs", "grids")}


def shipped(kind):
    """Names (without .yaml) of the shipped files of `kind`, sorted."""
    folder = os.path.join(ROOT, FOLDERS[kind])
    if not os.path.isdir(folder):
        return []
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def resolve(value, kind, option="--config-file"):
    """The file `value` names: an existing path as given, a path relative to the checkout, or a
    shipped name of `kind` with or without `.yaml`. A bare name that is none of these is one line
    with the nearest names; any other missing path is returned as given (the caller says it is
    missing, in its own words)."""
    if value is None or os.path.isfile(value) or os.path.isabs(value):
        return value
    stem = value[:-5] if value.endswith(".yaml") else value
    for path in (os.path.join(ROOT, value), os.path.join(ROOT, FOLDERS[kind], stem + ".yaml")):
        if os.path.isfile(path):
            return path
    if os.path.dirname(value):
        return value
    names = shipped(kind)
    near = difflib.get_close_matches(stem, names, n=3, cutoff=0.5)
    hint = (f"did you mean {', '.join(near)}?" if near
            else f"shipped in {FOLDERS[kind]}/: {', '.join(names[:8])}"
            + (", ..." if len(names) > 8 else ""))
    raise LocoError(f"{option} {value}: no such file, and no shipped {kind} config of that "
                    f"name ({hint})")
