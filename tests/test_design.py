"""docs/design.md's module map lists every module of loco_det, and only those."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mapped():
    """Package-relative paths named in the map's loco_det/ tree (indentation gives the folder)."""
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        text = f.read()
    tree = text.split("## Module map", 1)[1].split("\n    loco_det/\n", 1)[1]
    out, folder = set(), ""
    for line in tree.splitlines():
        m = re.match(r"^( {6,})(\S+)", line)
        if not m:
            break   # the end of the loco_det/ tree
        if len(m.group(1)) not in (6, 8):
            continue   # a description's continuation line
        depth, name = (len(m.group(1)) - 6) // 2, m.group(2)
        if name.endswith("/"):
            folder = name
        else:
            out.add((folder if depth else "") + name)
    return out


def _files():
    out = set()
    base = os.path.join(ROOT, "loco_det")
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        for name in filenames:
            if name.endswith((".py", ".yaml")):
                out.add(os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/"))
    return out


def test_the_module_map_matches_the_package():
    mapped, files = _mapped(), _files()
    assert len(mapped) > 30
    assert not files - mapped, f"modules missing from docs/design.md: {sorted(files - mapped)}"
    assert not mapped - files, f"docs/design.md names modules that do not exist: " \
                               f"{sorted(mapped - files)}"
