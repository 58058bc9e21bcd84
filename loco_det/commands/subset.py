"""Make a deterministic N-image subset of COCO train2017 (the paper's COCO-10K / COCO-1K).

Thin command line over `loco_det.coco_subset`; naming and registration are documented there.
"""
import argparse
import os
import sys


EXAMPLES = """\
examples:
  # the paper's limited-label splits (it averages 5 random splits: seeds 1..5 here)
  for s in 1 2 3 4 5; do python tools/make_coco_subset.py --size 10000 --seed $s; done
  python tools/make_coco_subset.py --size 1000 --seed 1

  # from another annotation file, to an explicit place
  python tools/make_coco_subset.py --size 500 --seed 0 --src my/instances_train2017.json --out sub.json

By default the file is written next to --src as instances_train2017_{N}_seed{S}.json, which
`import loco_det.detection` registers as the Detectron2 dataset coco_2017_train_{N/1000}k_seed{S}
(e.g. coco_2017_train_10k_seed1; sizes that are not multiples of 1000 keep the number:
coco_2017_train_500_seed0), with images from $DETECTRON2_DATASETS/coco/train2017.
The same --size and --seed always select the same images from the same source file.
"""


def build_parser():
    parser = argparse.ArgumentParser(
        description="Write a deterministic subset of COCO train2017 annotations: same --size "
                    "and --seed, same images (ids are sorted, then drawn by a seeded RNG).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, required=True, help="number of images to keep")
    parser.add_argument("--seed", type=int, required=True, help="selection seed")
    parser.add_argument("--src", default=None,
                        help="COCO instances file to draw from (default: "
                             "$DETECTRON2_DATASETS/coco/annotations/instances_train2017.json)")
    parser.add_argument("--output", "--out", dest="out", default=None,
                        help="output file (default: instances_train2017_{N}_seed{S}.json next "
                             "to --src, where loco_det registers it)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from loco_det import coco_subset
    from loco_det.utils import LocoError

    src = args.src or os.path.join(coco_subset.default_coco_root(), "annotations",
                                   "instances_train2017.json")
    try:
        out, subset = coco_subset.write_subset(src, args.size, args.seed, args.out)
    except LocoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    name = coco_subset.registered_name(out, args.size, args.seed)
    expected = coco_subset.subset_filename(args.size, args.seed)
    where = (f"dataset name {name}" if name else
             "not registered as a Detectron2 dataset (loco_det registers only "
             f"$DETECTRON2_DATASETS/coco/annotations/{expected}"
             "; elsewhere, register it with detectron2.data.datasets.register_coco_instances)")
    print(f"wrote {out}: {len(subset['images'])} images, {len(subset['annotations'])} annotations "
          f"(seed {args.seed}); {where}")
    return 0
