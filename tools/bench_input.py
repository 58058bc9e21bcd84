#!/usr/bin/env python
"""Measure the pretraining input pipeline, one thread, side by side in one run: the reference
torchvision augmentation, the fast CPU path, the CPU part of the GPU-augmentation path and
decoding alone; images/s per core, ratios, and cores per GPU.

Examples:
  # the ImageNet recipe on scikit-learn's two photos if installed, else generated 500x375 JPEGs
  python tools/bench_input.py

  # on your own JPEGs (e.g. one ImageNet class), 4 passes
  python tools/bench_input.py --images /data/imagenet/train/n01440764 --limit 50 --rounds 4

  # generated JPEGs even with scikit-learn installed
  python tools/bench_input.py --synthetic 16
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loco_det.pretrain import input_bench  # noqa: E402
from loco_det.pretrain.config import load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "pretrain", "loco_r50_800ep.yaml"),
                        help="recipe whose DATA settings are measured (default: the ImageNet "
                             "LoCo recipe)")
    parser.add_argument("--images", metavar="DIR", help="measure these JPEGs (recursive)")
    parser.add_argument("--limit", type=int, default=50, help="at most this many of --images")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="use N generated 500x375 JPEGs (default when scikit-learn is absent: 8)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the images")
    parser.add_argument("--gpu-images-per-s", type=float, default=1300.0,
                        help="source images/s one GPU consumes, for the cores/GPU column "
                             "(default 1300: ResNet-50 two views, AMP, one A100-class GPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("limit", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            paths = input_bench.find_jpegs(args.images, args.limit)
            if not paths:
                raise SystemExit(f"{args.images}: no .jpg/.jpeg files found")
            source = f"{len(paths)} JPEGs from {args.images}"
        elif not args.synthetic and input_bench.sklearn_photos():
            paths = input_bench.sklearn_photos()
            source = "scikit-learn's sample photos (china.jpg, flower.jpg, 640x427)"
        else:
            n = args.synthetic or 8
            paths = input_bench.make_jpegs(tmp, n, seed=args.seed)
            source = f"{n} generated 500x375 JPEGs (input_bench.make_jpegs, seed {args.seed})"
        print(f"{os.path.relpath(args.config, REPO)}: {cfg.DATA.IMAGE_SIZE} px, two views; "
              f"{source}; {args.rounds} rounds")
        per_image = input_bench.measure(cfg, paths, rounds=args.rounds, seed=args.seed)
    print(input_bench.format_table(per_image, args.gpu_images_per_s))
    return 0


if __name__ == "__main__":
    from loco_det.utils import run_tool

    sys.exit(run_tool(main))
