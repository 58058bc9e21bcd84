"""Generate loco_det's embedded dataset (textured-shape scenes with instance masks).

Thin command line over `loco_det.synthetic.generate`; layout in docs/formats.md, "Embedded data".
"""
import argparse
import os
import re
import sys
import time


# The embedded data's identity: the demo, the tests and the docs refer to "seed 0" data.
DEFAULT_SEED = 0
DEFAULT_TRAIN = 600
DEFAULT_VAL = 100
DEFAULT_SIZE = "128x160"

EXAMPLES = """\
examples:
  # the default dataset used by the demo ($DETECTRON2_DATASETS/loco_synth, 600 + 100 images)
  python tools/make_synthetic_data.py

  # a second, independent dataset at another place
  python tools/make_synthetic_data.py --out /data/loco_synth_s1 --seed 1

  # bigger images, more of them; replace what is in --out
  python tools/make_synthetic_data.py --size 192x256 --num-train 2000 --num-val 200 --overwrite

then, with DETECTRON2_DATASETS pointing at the parent of --out:
  python tools/pretrain.py ...          # reads DIR/imagefolder/{train,val} or DIR/objects/...
  python tools/train_net.py ...         # datasets loco_synth_coco_{train,val},
                                        # loco_synth_cityscapes_instance_seg_{train,val},
                                        # loco_synth_cityscapes_sem_seg_{train,val},
                                        # loco_synth_voc_{train,val}

Running it again with the same arguments is a no-op; different arguments on an existing dataset
are refused unless --overwrite (two datasets are never mixed in one folder).
"""


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 128x160, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def build_parser():
    parser = argparse.ArgumentParser(
        description="Write the embedded dataset: deterministic scenes of textured, overlapping "
                    "shapes (6 categories, each mapped to a Cityscapes instance class) in five "
                    "views: ImageFolder (label = category of the largest object), object crops "
                    "(one per instance, labelled by its category), COCO instance segmentation, "
                    "the Cityscapes layout (instance and semantic labels) and PASCAL VOC "
                    "detection. Layout: docs/formats.md.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", "--out", dest="out", default=None,
                        help="output folder (default: $DETECTRON2_DATASETS/loco_synth, "
                             "DETECTRON2_DATASETS defaulting to 'datasets')")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"dataset seed; same seed and sizes give bit-identical files "
                             f"(default {DEFAULT_SEED}: the embedded data)")
    parser.add_argument("--num-train", type=int, default=DEFAULT_TRAIN,
                        help=f"training images (default {DEFAULT_TRAIN})")
    parser.add_argument("--num-val", type=int, default=DEFAULT_VAL,
                        help=f"validation images (default {DEFAULT_VAL})")
    parser.add_argument("--size", type=parse_size, default=parse_size(DEFAULT_SIZE),
                        metavar="HxW", help=f"image height x width in pixels (default {DEFAULT_SIZE})")
    parser.add_argument("--min-objects", type=int, default=None,
                        help="fewest shapes attempted per scene (default 2)")
    parser.add_argument("--max-objects", type=int, default=None,
                        help="most shapes attempted per scene (default 6)")
    parser.add_argument("--typical-surfaces", type=float, default=None, metavar="P",
                        help="chance that an instance other than the main one wears its "
                             "category's typical surface (default 0: a random surface; "
                             "docs/formats.md)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset in --out (only one written by this tool)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from loco_det import synthetic
    from loco_det.utils import LocoError, interruptible

    out = args.out or os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "loco_synth")
    params = {k: v for k, v in (("min_objects", args.min_objects),
                                ("max_objects", args.max_objects),
                                ("other_typical_texture_prob", args.typical_surfaces))
              if v is not None}
    height, width = args.size
    total = args.num_train + args.num_val
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="generating", dynamic_ncols=True)
    done = [0]

    def progress(split, index):
        done[0] += 1
        if bar is not None:
            bar.update(1)

    start = time.time()
    try:
        with interruptible():  # SIGTERM (a stopped grid job) also removes the temporary folder
            meta = synthetic.generate(out, seed=args.seed, n_train=args.num_train, n_val=args.num_val,
                                      height=height, width=width, params=params,
                                      overwrite=args.overwrite, progress=progress)
    except LocoError as e:
        if bar is not None:
            bar.close()  # the error starts its own line
            bar = None
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.time() - start
    generated = done[0] > 0
    counts = meta["counts"]
    verb = "wrote" if generated else "already up to date:"
    print(f"{verb} {os.path.abspath(out)} (seed {meta['seed']}, {meta['height']}x{meta['width']}): "
          f"train {counts['train']['images']} images / {counts['train']['instances']} instances, "
          f"val {counts['val']['images']} images / {counts['val']['instances']} instances"
          + (f" in {elapsed:.1f} s" if generated else ""))
    return 0
