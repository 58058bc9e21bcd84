"""The paper's reported numbers (loco_det/paper_reference.yaml) and the differences it
reports between methods: printed in their own section and file, never in a measured table."""
import os

import yaml

from ..utils import LocoError


# The paper's numbers live in one data file in the package, with the paper cited.
PAPER_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "paper_reference.yaml")


def load_paper_reference(path=PAPER_FILE):
    """(citation, tables) of the paper's reference numbers (loco_det/paper_reference.yaml)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise LocoError(f"{path}: cannot read the paper's reference numbers: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tables"), list):
        raise LocoError(f"{path}: expected a mapping with 'citation' and a list 'tables'")
    for i, table in enumerate(data["tables"]):
        for key in ("title", "header", "rows"):
            if key not in table:
                raise LocoError(f"{path}: tables[{i}] has no '{key}'")
        for row in table["rows"]:
            if len(row) != len(table["header"]):
                raise LocoError(f"{path}: tables[{i}] ({table['title']}): row {row} has "
                                f"{len(row)} cells for {len(table['header'])} columns")
    return str(data.get("citation", "")), data["tables"]


PAPER_CITATION, PAPER_TABLES = load_paper_reference()



def _paper_cell(value, i):
    """The i-th number of a paper cell ("32.2 / 29.9" -> 32.2 for i=0), or None."""
    parts = [x.strip() for x in str(value).split("/")]
    try:
        return float(parts[i])
    except (IndexError, ValueError):
        return None


def paper_differences(tables=None):
    """The paper's own differences, method - baseline, per table, pretraining length and column:
    what our comparisons can be read beside (never mixed with them). Each table's
    `differences` node (loco_det/paper_reference.yaml) names its baseline row."""
    out = []
    for table in PAPER_TABLES if tables is None else tables:
        spec = table.get("differences")
        if not spec:
            continue
        header, rows = table["header"], table["rows"]
        keys = table.get("keys", 2 if header[0] == "pretraining" else 1)
        name, metrics = keys - 1, spec.get("metrics", ["top-1"])
        if header[0] == "pretraining":   # one baseline per pretraining length
            lengths = sorted({r[0] for r in rows})
            blocks = [(n, [r for r in rows if r[0] == n]) for n in lengths]
        else:
            blocks = [(spec["pretraining"], rows)]
        for length, block in blocks:
            base = next((r for r in block if r[name] == spec["baseline"]), None)
            if base is None:
                continue
            for row in block:
                if row is base:
                    continue
                for col in range(keys, len(header)):
                    for i, metric in enumerate(metrics):
                        a, b = _paper_cell(row[col], i), _paper_cell(base[col], i)
                        if a is not None and b is not None:
                            out.append([table.get("short", table["title"]), length,
                                        f"{row[name]} - {base[name]}",
                                        spec.get("benchmark", header[col]), metric,
                                        f"{a - b:+.1f}"])
    return out
