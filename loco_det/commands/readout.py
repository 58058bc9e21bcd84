"""Linear readout of a pretrained (or randomly initialised) encoder, stage by stage.

Thin command line over `loco_det.pretrain.readout`; see docs/formats.md, "Linear readout".
"""
import argparse
import os
import sys

from loco_det.utils import add_readout_source_args, check_readout_source

EXAMPLES = """\
examples:
  # a CPU-scale run on the embedded data (train/ and val/ found next to its DATA.ROOT)
  python tools/linear_readout.py --checkpoint runs/cpu_loco/checkpoint_last.pth \\
      --output-dir runs/cpu_loco/readout

  # the same encoder before pretraining (SEED=0 run): the floor any pretraining must beat
  python tools/linear_readout.py --random-init --arch resnet18 --seed 0 \\
      --output-dir runs/random_r18

  # ImageNet with the LoCo paper's protocol (auto-selected above 50,000 training images)
  python tools/linear_readout.py --checkpoint runs/loco_r50_800ep/checkpoint_last.pth \\
      --data /data/imagenet --workers 16 --output-dir runs/loco_r50_800ep/readout

protocols (override any value with the flags below):
  small  features computed once (resize + center crop), standardised, then SGD momentum 0.9,
         lr 0.1 cosine, 200 epochs, batch 256, wd 5e-4 on the cached features
  paper  LoCo paper: random-resized-crop + flip, SGD without momentum, lr 30 /10 at epochs
         30, 60, 90, 100 epochs, batch 256, wd 0, raw pooled features
"""


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train a linear classifier on the frozen, globally pooled features of each "
                    "ResNet stage (res2..res5) and print top-1 per stage; writes "
                    "DIR/readout.json.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_readout_source_args(parser)
    parser.add_argument("--protocol", default="auto", choices=("auto", "small", "paper"),
                        help="default auto: small up to 50,000 training images, else paper")
    parser.add_argument("--epochs", type=int,
                        help="classifier training epochs (default: small 200, paper 100)")
    parser.add_argument("--lr", type=float,
                        help="base learning rate (default: small 0.1 cosine, paper 30 divided "
                             "by 10 at epochs 30, 60, 90)")
    parser.add_argument("--batch-size", type=int, help="images per step (default 256)")
    parser.add_argument("--weight-decay", type=float,
                        help="classifier weight decay (default: small 5e-4, paper 0)")
    parser.add_argument("--momentum", type=float,
                        help="SGD momentum (default: small 0.9, paper 0)")
    parser.add_argument("--image-size", type=int,
                        help="default: the checkpoint's DATA.IMAGE_SIZE (random init: 64 small, "
                             "224 paper)")
    parser.add_argument("--feature-norm", choices=("none", "bn", "standardize"),
                        help="what precedes each classifier (default: small standardize, "
                             "paper none); bn: a non-affine BatchNorm1d; standardize: the "
                             "training set's per-dimension mean and std, cached features only")
    parser.add_argument("--workers", type=int, default=2, help="data-loading workers")
    parser.add_argument("--seed", type=int, default=-1,
                        help="seed of the random init and the classifiers (-1: draw one; it is "
                             "recorded in readout.json). --random-init --seed S is exactly the "
                             "initial encoder of a pretraining run with SEED=S")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_readout_source(parser, args)
    from loco_det.pretrain.readout import STAGE_NAMES, run_readout
    from loco_det.utils import LocoError, exit_code, interruptible

    overrides = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                 "weight_decay": args.weight_decay, "momentum": args.momentum,
                 "image_size": args.image_size, "feature_norm": args.feature_norm}
    try:
        with interruptible():
            result = run_readout(args.output_dir, checkpoint=args.checkpoint, arch=args.arch,
                                 data_dir=args.data, protocol=args.protocol,
                                 overrides=overrides, workers=args.workers, seed=args.seed,
                                 progress=not args.no_progress, take=args.take,
                                 prefix=args.prefix)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through `interruptible`
        from loco_det.utils import signal_name

        print(f"interrupted by {signal_name(e)}; nothing was kept (a readout writes readout.json "
              "only at the end); rerun the same command", file=sys.stderr)
        return exit_code(e)
    except LocoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    p = result["protocol"]
    print(f"linear readout, {result['method']} {result['arch']} ({p['name']} protocol, "
          f"{p['train_images']} train / {p['val_images']} val images, {p['image_size']} px; "
          f"majority class {p['majority_val_top1']:.1f}%)")
    for stage in STAGE_NAMES:
        print(f"  {stage}  top-1 {result['top1'][stage]:6.2f}  "
              f"(+- {result['top1_stderr'][stage]:.1f})")
    print(f"wrote {os.path.join(args.output_dir, 'readout.json')}")
    return 0
