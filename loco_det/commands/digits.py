"""Write the real handwritten digits scikit-learn ships as an ImageFolder (train/ and val/).

Thin command line over `loco_det.digits.write`; the split and layout are in docs/formats.md,
"Digits". No download: the 1797 scans come with scikit-learn.

examples:
  python tools/make_digits.py --output-dir datasets/digits            # 32 px (default)
  python tools/make_digits.py --output-dir datasets/digits64 --size 64
then:
  python tools/pretrain.py --config pretrain/cpu_loco.yaml DATA.ROOT=datasets/digits/train \\
      DATA.IMAGE_SIZE=32 --output-dir runs/digits_loco
  python tools/linear_readout.py --checkpoint runs/digits_loco/checkpoint_last.pth \\
      --data datasets/digits --image-size 32 --output-dir runs/digits_loco/readout
"""
import argparse
import sys



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", "--out", dest="out", required=True, metavar="DIR",
                        help="folder to create (train/<digit>/*.png, val/<digit>/*.png, "
                             "meta.json); an existing digits folder of the same size is reused")
    parser.add_argument("--size", type=int, default=32,
                        help="side of the written images in pixels (default 32)")
    args = parser.parse_args(argv)

    from loco_det import digits
    from loco_det.utils import LocoError

    try:
        meta = digits.write(args.out, size=args.size)
    except LocoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"digits: {meta['counts']['train']} train / {meta['counts']['val']} val scans at "
          f"{meta['size']} px in {args.out} (sha256 {meta['sha256'][:12]})")
    return 0
