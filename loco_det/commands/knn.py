"""Weighted kNN readout of a pretrained (or randomly initialised) encoder, stage by stage.

Thin command line over `loco_det.pretrain.knn`; see docs/formats.md, "kNN readout".
"""
import argparse
import os
import sys

from loco_det.utils import add_readout_source_args, check_readout_source

EXAMPLES = """\
examples:
  # beside the linear readout of a CPU-scale run (train/ and val/ found next to its DATA.ROOT)
  python tools/knn_readout.py --checkpoint runs/cpu_loco/checkpoint_last.pth \\
      --output-dir runs/cpu_loco/readout

  # the same encoder before pretraining (SEED=0 run)
  python tools/knn_readout.py --random-init --arch resnet18 --seed 0 --output-dir runs/random_r18

  # ImageNet (1.28M training features are kept in float16 on the host, ~9.8 GB for ResNet-50)
  python tools/knn_readout.py --checkpoint runs/loco_r50_800ep/checkpoint_last.pth \\
      --data /data/imagenet --workers 16 --output-dir runs/loco_r50_800ep/readout

protocol (InstDisc / DINO): frozen encoder, resize + center crop, each stage globally pooled and
L2-normalised; a validation image's k nearest training images vote with weight exp(cos / T);
k 20 and 200, T 0.07.
"""


def build_parser():
    parser = argparse.ArgumentParser(
        description="Weighted kNN classification on the frozen, pooled, L2-normalised features "
                    "of each ResNet stage (res2..res5); prints top-1 per stage and k and writes "
                    "DIR/knn.json.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_readout_source_args(parser)
    parser.add_argument("--k", type=int, nargs="+", default=[20, 200], metavar="K",
                        help="neighbour counts (default 20 200)")
    parser.add_argument("--temperature", type=float, default=0.07,
                        help="T of the vote weight exp(cos / T) (default 0.07)")
    parser.add_argument("--image-size", type=int,
                        help="default: the checkpoint's DATA.IMAGE_SIZE (random init: 64 up to "
                             "50,000 training images, else 224)")
    parser.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch")
    parser.add_argument("--workers", type=int, default=2, help="data-loading workers")
    parser.add_argument("--seed", type=int, default=-1,
                        help="seed of the random init (-1: draw one; recorded in knn.json)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_readout_source(parser, args)
    from loco_det.pretrain.knn import run_knn
    from loco_det.pretrain.readout import STAGE_NAMES
    from loco_det.utils import LocoError

    try:
        result = run_knn(args.output_dir, checkpoint=args.checkpoint, arch=args.arch,
                         data_dir=args.data, image_size=args.image_size, ks=tuple(args.k),
                         temperature=args.temperature, batch_size=args.batch_size,
                         workers=args.workers, seed=args.seed, progress=not args.no_progress,
                         device=args.device, take=args.take, prefix=args.prefix)
    except LocoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    p = result["protocol"]
    print(f"kNN readout, {result['method']} {result['arch']} (T {p['temperature']}, "
          f"{p['train_images']} train / {p['val_images']} val images, {p['image_size']} px; "
          f"majority class {p['majority_val_top1']:.1f}%)")
    for stage in STAGE_NAMES:
        print(f"  {stage}  " + "  ".join(
            f"k={k} top-1 {result['top1'][f'k{k}'][stage]:6.2f}" for k in p["ks"]))
    print(f"wrote {os.path.join(args.output_dir, 'knn.json')}")
    return 0
