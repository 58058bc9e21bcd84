"""Train and evaluate Mask R-CNN on a (converted) pretrained backbone: Detectron2's train_net
with loco_det's datasets, components, safe weight loading and results.json.

The command line is Detectron2's own (`default_argument_parser`), so recipes and cluster scripts
written for Detectron2 work unchanged. Outputs (docs/formats.md, "Detection run"): OUTPUT_DIR/
config.yaml, run_info.json, log.txt, metrics.json, model_final.pth and results.json.
"""
import argparse
import contextlib
import os
import re
import sys


from loco_det.utils import LocoError, interruptible, interrupted_line, exit_code, run_lock
# Detectron2 is imported inside the functions, after `import loco_det.detection` (compat layer,
# datasets and components first), so that a Ctrl-C during those imports is one line too.

EXAMPLES = """
Examples:

  # Readout (frozen backbone) on the embedded data, CPU scale:
  python tools/make_synthetic_data.py
  python tools/convert_to_detectron2.py ckpt/checkpoint_last.pth weights/loco_r18.pkl
  python tools/train_net.py --config-file cpu_synth_coco_R18_FPN_frozen \\
      MODEL.WEIGHTS=weights/loco_r18.pkl OUTPUT_DIR=runs/det_loco_frozen

  # Random-initialisation baseline (no pretrained weights):
  python tools/train_net.py --config-file det_configs/cpu_synth_coco_R18_FPN_finetune.yaml \\
      LOCO_DET.FROM_SCRATCH True MODEL.BACKBONE.FREEZE_AT 0 OUTPUT_DIR runs/det_random

  # The paper's COCO readout on 8 GPUs (batch sizes are totals over all GPUs):
  python tools/train_net.py --num-gpus 8 --config-file det_configs/coco_R50_FPN_1x_frozen.yaml \\
      MODEL.WEIGHTS weights/loco_r50.pkl OUTPUT_DIR runs/coco_frozen

  # Two machines (run on each, with its own --machine-rank):
  python tools/train_net.py --num-gpus 8 --num-machines 2 --machine-rank 0 \\
      --dist-url tcp://HOST0:29500 --config-file det_configs/coco_R50_FPN_1x_finetune.yaml ...

  # Resume an interrupted run (reads OUTPUT_DIR/last_checkpoint):
  python tools/train_net.py --config-file runs/coco_frozen/config.yaml --resume

  # Evaluate a finished run again, in a fresh process:
  python tools/train_net.py --eval-only --config-file runs/det_loco_frozen/config.yaml \\
      MODEL.WEIGHTS runs/det_loco_frozen/model_final.pth OUTPUT_DIR runs/det_loco_frozen_eval

Trailing KEY=VALUE (or Detectron2's KEY VALUE) pairs override config keys (Detectron2's keys
plus LOCO_DET.*: FROM_SCRATCH, LABEL, BENCHMARK, CONFIG_NAME). Errors print one line starting with 'error:' and exit 1.
"""


def _kept(output_dir):
    """What an interrupted run leaves to resume from, in words."""
    tag = os.path.join(output_dir or "", "last_checkpoint")
    if output_dir and os.path.isfile(tag):
        with open(tag) as f:
            return f"kept {os.path.join(output_dir, f.read().strip())} (the last checkpoint)"
    return "no checkpoint was written yet (a rerun starts over)"


def _run(args):
    """Per-process entry point (module-level so that Detectron2's launcher can pickle it)."""
    from loco_det.detection import train

    try:
        with interruptible():
            return train.main(args)
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM through `interruptible`
        from detectron2.utils import comm

        if comm.is_main_process():
            argv = getattr(args, "loco_det_argv", None) or sys.argv[1:]
            at = len(argv) - len(args.opts) if args.opts else None
            out = _output_dir_of(args)
            print(interrupted_line(e, _kept(out), argv, insert_at=at),
                  file=sys.stderr, flush=True)
        raise SystemExit(exit_code(e)) from None
    except LocoError as e:
        # In a spawned worker, re-raising would print a traceback per process; one line is the
        # contract, so print it here and leave with status 1.
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _output_dir_of(args):
    """OUTPUT_DIR as the run uses it (overrides win over the config file), without Detectron2."""
    opts = list(args.opts or [])
    for key, value in zip(opts[::2], opts[1::2]):
        if key == "OUTPUT_DIR":
            return value
    from loco_det.detection.config import setup_cfg

    try:
        return setup_cfg(args.config_file, args.opts).OUTPUT_DIR
    except LocoError:
        return None


_OPTIONS = ("--config-file", "--config", "--resume", "--eval-only", "--num-gpus", "--num-machines",
            "--machine-rank", "--dist-url")


_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$|OUTPUT_DIR$|SEED$|VERSION$|VIS_PERIOD$|CUDNN_BENCHMARK$")


def split_overrides(opts):
    """Detectron2's KEY VALUE list from overrides given as KEY VALUE or KEY=VALUE (mixed):
    a token in key position splits at its first `=` when what precedes it is a config key
    (values are never split: `OUTPUT_DIR a=b` keeps its value)."""
    out, expect_key = [], True
    for token in opts:
        key, eq, value = token.partition("=")
        if expect_key and eq and _KEY.match(key):
            out += [key, value]
            continue
        out.append(token)
        expect_key = not expect_key
    return out


def main(argv=None):
    import loco_det.detection  # noqa: F401  (compat layer, datasets and components first)
    from detectron2.engine import default_argument_parser

    parser = default_argument_parser(epilog=EXAMPLES)
    parser.description = __doc__.split("\n\n")[0]
    for action in parser._actions:   # Detectron2's text also describes LazyConfig, unused here
        if action.dest == "opts":
            action.help = ("config overrides, after every option: KEY=VALUE or Detectron2's "
                           "KEY VALUE, e.g. SOLVER.MAX_ITER=300 OUTPUT_DIR runs/x")
        if action.dest == "config_file":
            action.help = ("Detectron2 config: a path, or a shipped name such as "
                           "cpu_synth_coco_R18_FPN_frozen (det_configs/)")
    parser.add_argument("--config", dest="config_file", metavar="FILE",
                        default=argparse.SUPPRESS, help="the same as --config-file")
    args = parser.parse_args(argv)
    args.opts = split_overrides(args.opts)
    args.loco_det_argv = list(sys.argv[1:] if argv is None else argv)  # for the resume hint
    misplaced = [o for o in args.opts if o.split("=")[0] in _OPTIONS]
    if misplaced:
        print(f"error: {misplaced[0]} comes after the KEY VALUE config overrides; options go "
              f"before them (e.g. train_net.py {misplaced[0]} ... --config-file CFG KEY VALUE)",
              file=sys.stderr)
        return 1
    from loco_det.recipes import resolve

    try:
        if args.config_file:
            args.config_file = resolve(args.config_file, "detection")
    except LocoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.num_machines == 1 and not any(a.split("=")[0] == "--dist-url"
                                          for a in args.loco_det_argv):
        # Detectron2's default is one port per user: two jobs on one machine would collide.
        args.dist_url = "auto"   # a free port of this machine
    world = args.num_gpus * args.num_machines
    if args.num_gpus < 1 or args.num_machines < 1:
        print("error: --num-gpus and --num-machines must be at least 1", file=sys.stderr)
        return 1
    # one writer per run folder (the first machine's main process holds it for the run)
    out = _output_dir_of(args) if args.machine_rank == 0 else None
    try:
        lock = run_lock(out, what="OUTPUT_DIR") if out else contextlib.nullcontext()
        with lock:
            return _train(args, world)
    except LocoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _train(args, world):
    from detectron2.engine import launch

    if world > 1:
        import torch

        have = torch.cuda.device_count()
        if have < args.num_gpus:
            print(f"error: --num-gpus {args.num_gpus} needs that many CUDA GPUs per machine "
                  f"(Detectron2's launcher uses NCCL); this machine has {have}", file=sys.stderr)
            return 1
        import torch.multiprocessing as mp

        try:
            launch(_run, args.num_gpus, num_machines=args.num_machines,
                   machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: a training process failed: {first} (its output is above)",
                  file=sys.stderr)
            return 1
        return 0
    try:
        _run(args)
    except SystemExit as e:
        return e.code
    return 0
