"""The README is a user's guide that points only inside the repository: short, every docs page
linked from it, and its real-scale section naming everything the paper grid runs."""
import os
import re
import subprocess

from loco_det import grid as benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_readme_is_short_and_opens_with_description_status_and_installs():
    text = _readme()
    lines = text.splitlines()
    assert len(lines) <= 200, len(lines)
    head = "\n".join(lines[:40])
    for part in ("**CPU**", "**CUDA**", "## Install on a CPU machine", "make test", "make demo",
                 "## Install on a GPU cluster", "install_detectron2.py", "numpy"):
        assert part in head, part
    # the GPU-cluster install is complete within the first 40 lines
    assert lines.index("## Quick start (CPU, minutes)") < 42


def test_every_docs_page_is_linked_from_the_readme():
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", _readme()))
    pages = {f"docs/{p}" for p in os.listdir(os.path.join(ROOT, "docs")) if p.endswith(".md")}
    assert pages <= linked, sorted(pages - linked)


def test_nothing_points_outside_the_repository():
    pattern = "shared" + "/\\|" + "REFERENCE" + ".md"   # spelt apart so this file is no hit
    res = subprocess.run(["git", "grep", "-n", pattern], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 1 and res.stdout == "", res.stdout   # 1: no match


def test_readme_names_every_command_variable_and_config_of_the_paper_grid():
    """A reader who follows only the README's real-scale section finds every tool, option,
    config override key, config file and environment variable the paper grid's jobs use."""
    text = _readme()
    section = text.split("## The real-scale pipeline")[1].split("\n## ")[0]
    grid = benchmark.load_grid(os.path.join(ROOT, "det_configs", "grids", "paper.yaml"))
    jobs, _, _ = benchmark.expand(grid, "runs/paper")
    seen = set()
    for job in jobs:
        argv = job.command()
        for i, arg in enumerate(argv):
            if arg.startswith("tools/") or arg.startswith("det_configs/") \
                    or arg.startswith("pretrain/"):
                seen.add(os.path.splitext(os.path.basename(arg))[0])
            elif arg.startswith("--") and "=" not in arg:
                seen.add(arg)
            elif re.fullmatch(r"[A-Z_]+(\.[A-Z_0-9]+)+", arg):   # Detectron2 KEY VALUE
                seen.add(arg)
            elif re.fullmatch(r"[A-Z_]+(\.[A-Z_0-9]+)*=.*", arg):  # pretrain KEY=VALUE
                seen.add(arg.split("=")[0])
        seen.update(job.env)
    flat = section + "\n" + " ".join(_expand_braces(w) for w in re.findall(r"\S*\{\S*", section))
    missing = sorted(s for s in seen if not re.search(rf"(?<![\w.-]){re.escape(s)}(?![\w-])",
                                                      flat))
    assert not missing, missing


def _expand_braces(word):
    """`pretrain/{gim,loco}_r50_{100,800}ep.yaml` -> the four names it stands for."""
    m = re.search(r"\{([^{}]*)\}", word)
    if not m:
        return word
    return " ".join(_expand_braces(word[:m.start()] + alt + word[m.end():])
                    for alt in m.group(1).split(","))
