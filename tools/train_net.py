#!/usr/bin/env python
"""Train and evaluate Mask R-CNN on a (converted) pretrained backbone: Detectron2's train_net
with loco_det's datasets, components, safe weight loading and results.json.

The command line is Detectron2's own (`default_argument_parser`), so recipes and cluster scripts
written for Detectron2 work unchanged. Outputs (docs/formats.md, "Detection run"): OUTPUT_DIR/
config.yaml, run_info.json, log.txt, metrics.json, model_final.pth and results.json.
"""
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Detectron2 v0.6 scripts a few helpers at import; torch 2.x warns about it on every start. The
# warning is about Detectron2's code, not the user's run, and would bury the one-line errors.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

import loco_det  # noqa: E402,F401  (compat shims, datasets and components registered first)
from loco_det.detection import compat  # noqa: E402
from loco_det.utils import LocoError  # noqa: E402

from detectron2.engine import default_argument_parser, launch  # noqa: E402

EXAMPLES = """
Examples:

  # Readout (frozen backbone) on the embedded data, CPU scale:
  python tools/make_synthetic_data.py
  python tools/convert_to_detectron2.py ckpt/checkpoint_last.pth weights/loco_r18.pkl
  python tools/train_net.py --config-file det_configs/cpu_synth_coco_R18_FPN_frozen.yaml \\
      MODEL.WEIGHTS weights/loco_r18.pkl OUTPUT_DIR runs/det_loco_frozen

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

Trailing KEY VALUE pairs override config keys (Detectron2's keys plus LOCO_DET.*: FROM_SCRATCH,
LABEL, BENCHMARK, CONFIG_NAME). Errors print one line starting with 'error:' and exit 1.
"""


def _run(args):
    """Per-process entry point (module-level so that Detectron2's launcher can pickle it)."""
    from loco_det.detection import train

    try:
        return train.main(args)
    except (LocoError, compat.CompiledOpsMissing) as e:
        # In a spawned worker, re-raising would print a traceback per process; one line is the
        # contract, so print it here and leave with status 1.
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def main(argv=None):
    parser = default_argument_parser(epilog=EXAMPLES)
    parser.description = __doc__.split("\n\n")[0]
    args = parser.parse_args(argv)
    world = args.num_gpus * args.num_machines
    if args.num_gpus < 1 or args.num_machines < 1:
        print("error: --num-gpus and --num-machines must be at least 1", file=sys.stderr)
        return 1
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


if __name__ == "__main__":
    sys.exit(main())
