"""Every tool's --help says what the tool does: each option is described, each example command
parses with the tool's own parser, and the lists in the text match the code."""
import importlib.util
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tools whose parser is built without running anything heavy (build_parser())
PARSER_TOOLS = ("convert_to_detectron2", "knn_readout", "linear_readout", "make_coco_subset",
                "make_synthetic_data", "pretrain")


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}",
                                                  os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _examples(text, name):
    """Argument lists of the example commands of tools/<name>.py in `text`, with backslash
    continuations joined (a continuation that the string swallowed leaves no backslash)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        marker = f"tools/{name}.py"
        if marker not in line or line.lstrip().startswith("#"):
            continue
        args = line.split(marker, 1)[1].split(";")[0].split(" #")[0]
        out.append([re.sub(r"\$\w+", "1", a) for a in shlex.split(args)])   # $s of a loop
    return out


@pytest.mark.parametrize("name", PARSER_TOOLS)
def test_every_option_is_described_and_every_example_parses(name):
    parser = _tool(name).build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{name}: {action.option_strings[0]} has no help text"
    examples = _examples(parser.format_help(), name)
    assert examples, f"{name}: no example of itself in --help"
    for args in examples:
        if "..." in args:   # an elided command line, not meant to run
            continue
        parser.parse_args(args)   # SystemExit (argparse's error) fails the test


def test_linear_readout_examples_keep_their_line_breaks():
    text = _tool("linear_readout").build_parser().format_help()
    assert not re.search(r"\S {3,}--", text), "a swallowed line continuation joined two lines"


def test_pretrain_help_names_every_rule_and_the_grid_port():
    from loco_det import grid as benchmark
    from loco_det.pretrain import rules

    text = _tool("pretrain").build_parser().format_help()
    flat = " ".join(text.split())
    for name in rules.RULES:
        assert re.search(rf"\b{name}\b", flat), f"rule {name} not named in pretrain --help"
    ports = set(re.findall(r"--rdzv-endpoint \S+:(\d+)", text))
    assert ports == {str(benchmark.PRETRAIN_PORT)}


def test_make_synthetic_data_help_counts_the_views_it_writes(tmp_path):
    tool = _tool("make_synthetic_data")
    out = tmp_path / "synth"
    assert tool.main(["--out", str(out), "--num-train", "4", "--num-val", "2", "--size", "48x64",
                      "--no-progress"]) == 0
    views = sorted(p.name for p in out.iterdir() if p.is_dir())
    words = {3: "three", 4: "four", 5: "five", 6: "six"}
    flat = " ".join(tool.build_parser().format_help().split())
    assert f"in {words[len(views)]} views" in flat, views
