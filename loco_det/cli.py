"""`loco-det`: every loco_det tool as a subcommand, e.g. `loco-det pretrain --config-file cpu_loco`.

The same code runs as `python -m loco_det.cli SUB ...` and as `python tools/SCRIPT.py ...`
(thin wrappers kept for Detectron2 habits and existing scripts). Conventions shared by every
subcommand: docs/command_line.md.
"""
import importlib
import os
import sys

# subcommand -> (module in loco_det.commands, script in tools/, what it does)
COMMANDS = {
    "data": ("data", "make_synthetic_data", "generate the embedded dataset (every format)"),
    "digits": ("digits", "make_digits", "write scikit-learn's digits as an ImageFolder"),
    "subset": ("subset", "make_coco_subset", "a seeded subset of a COCO annotation file"),
    "pretrain": ("pretrain", "pretrain", "pretrain a ResNet with a learning rule"),
    "readout": ("readout", "linear_readout", "linear readout of each stage of an encoder"),
    "knn": ("knn", "knn_readout", "weighted kNN readout of each stage of an encoder"),
    "convert": ("convert", "convert_to_detectron2", "convert a checkpoint to Detectron2 weights"),
    "train": ("train", "train_net", "train and evaluate a Detectron2 model (train_net)"),
    "report": ("report", "report", "tables and plots from finished runs"),
    "grid": ("grid", "run_benchmark", "run a benchmark grid (data to report)"),
    "bench": ("bench", "bench_pretrain", "time and measure the learning rules' cost"),
    "bench-input": ("bench_input", "bench_input", "time the pretraining input pipeline"),
    "gpu-check": ("gpu_check", "gpu_check", "the prepared check on a GPU machine"),
}


def _usage():
    width = max(map(len, COMMANDS))
    lines = [__doc__.split("\n\n")[0], "", "usage: loco-det SUBCOMMAND [options]   "
             "(loco-det SUBCOMMAND --help for its options)", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {what}  (tools/{script}.py)"
              for name, (_, script, what) in COMMANDS.items()]
    return "\n".join(lines)


def invocation(sub):
    """The words that start `sub` the way this process was started."""
    if os.path.basename(sys.argv[0]) in ("cli.py", "__main__.py") or sys.argv[0] == "-m":
        return ["python", "-m", "loco_det.cli", sub]
    return [os.path.basename(sys.argv[0]) or "loco-det", sub]


def run_command(sub, argv, script=False):
    """Run subcommand `sub` with `argv`; its exit status. `script`: started as tools/SCRIPT.py
    (help and resume lines then name that script)."""
    from . import utils

    module = importlib.import_module(f"loco_det.commands.{COMMANDS[sub][0]}")
    if not script:
        words = invocation(sub)
        utils.INVOCATION[:] = words
        sys.argv[0] = " ".join(words)   # argparse's prog (and Detectron2's examples)
    try:
        return utils.run_tool(lambda: module.main(list(argv)))
    except utils.LocoError as e:   # one line, for the commands that leave it to us
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    sub = argv[0]
    if sub not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(sub, COMMANDS, n=1)
        print(f"error: unknown subcommand {sub!r}"
              + (f" (did you mean {near[0]}?)" if near else "")
              + f"; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(sub, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
