"""Measure the pretraining input pipeline, one thread, side by side in one run: the reference
torchvision augmentation, the fast CPU path, the CPU part of the GPU-augmentation path and
decoding alone (PIL's and the fast paths'); images/s per core, ratios, and cores per GPU.

Examples:
  # the ImageNet recipe on scikit-learn's two photos if installed, else generated 500x375 JPEGs
  python tools/bench_input.py

  # on your own JPEGs (e.g. one ImageNet class), 4 passes
  python tools/bench_input.py --images /data/imagenet/train/n01440764 --limit 50 --rounds 4

  # generated JPEGs even with scikit-learn installed
  python tools/bench_input.py --synthetic 16

  # also the GPU's share of DATA.AUGMENT_DEVICE=cuda, on batches of 256 images
  python tools/bench_input.py --device cuda --device-batch 256
"""
import argparse
import os
import tempfile

from loco_det.pretrain import input_bench
from loco_det.pretrain.config import load_config
from loco_det.recipes import ROOT as REPO  # the checkout: recipes live there
from loco_det.recipes import resolve


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", "--config", dest="config",
                        default=os.path.join(REPO, "pretrain", "loco_r50_800ep.yaml"),
                        help="recipe whose DATA settings are measured, a path or a shipped name "
                             "(default: the ImageNet LoCo recipe)")
    parser.add_argument("--images", metavar="DIR", help="measure these JPEGs (recursive)")
    parser.add_argument("--limit", type=int, default=50, help="at most this many of --images")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="use N generated 500x375 JPEGs (default without scikit-learn: 8)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the images")
    parser.add_argument("--gpu-images-per-s", type=float, default=1300.0,
                        help="source images/s one GPU consumes, for the cores/GPU column "
                             "(default 1300: ResNet-50 two views, AMP, one A100-class GPU)")
    parser.add_argument("--device", help="also time the device's share of "
                        "DATA.AUGMENT_DEVICE=cuda (jitter, grayscale, blur, normalise) here: "
                        "cuda, cpu, ...")
    parser.add_argument("--device-batch", type=int, default=128, metavar="N",
                        help="images per batch for --device (default 128)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("limit", "rounds", "device_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.device and args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
    return args


def main(argv=None):
    args = parse_args(argv)
    args.config = resolve(args.config, "pretrain")
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
        result = {"config": os.path.relpath(args.config, REPO), "images": source,
                  "cpu_s_per_image": per_image}
        if args.device:
            import torch
            rate = input_bench.device_augment_rate(cfg, paths, torch.device(args.device),
                                                   args.device_batch, seed=args.seed)
            print(f"{args.device}: jitter, grayscale, blur, normalise of both views, batches of "
                  f"{args.device_batch}: {rate:.0f} images/s")
            result["device"] = {"name": args.device, "batch": args.device_batch,
                                "images_per_s": rate}
    if args.json:
        from loco_det.utils import write_json
        write_json(args.json, result)
    return 0
