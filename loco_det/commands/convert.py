"""Convert a pretrained ResNet checkpoint into Detectron2's weights format (.pkl).

Thin command line over `loco_det.weights.convert`; see docs/formats.md, "Converted weights"
and "Accepted checkpoint layouts".
"""
import argparse
import sys
import warnings


EXAMPLES = """\
examples:
  # a loco_det pretraining checkpoint (the encoder is taken, decoders are dropped)
  python tools/convert_to_detectron2.py runs/loco_r50/checkpoint_last.pth r50_loco.pkl --verify

  # torchvision / timm weights, MoCo v1/v2/v3, SwAV, BYOL, Lightning, solo-learn, mmselfsup,
  # VISSL: the layout is recognised and reported
  python tools/convert_to_detectron2.py resnet50-19c8e357.pth r50_tv.pkl
  python tools/convert_to_detectron2.py moco_v2_800ep_pretrain.pth.tar r50_moco.pkl

  # DINO / iBOT: the teacher by default (as DINO evaluates), or the student
  python tools/convert_to_detectron2.py dino_checkpoint.pth r50_dino.pkl --take student

  # the encoder sits under an unusual prefix
  python tools/convert_to_detectron2.py ckpt.pth out.pkl --prefix online_network.encoder.

then train with (det_configs/ already set the matching preprocessing):
  python tools/train_net.py --config-file det_configs/coco_R50_FPN_1x_frozen.yaml \\
      MODEL.WEIGHTS r50_loco.pkl

The weights need INPUT.FORMAT RGB, torchvision's PIXEL_MEAN/PIXEL_STD and STRIDE_IN_1X1 False;
the .pkl records this and train_net refuses a config that disagrees. A file that is already in
Detectron2's format (a converted .pkl, a model_final.pth) is refused: use it directly.
"""


def build_parser():
    parser = argparse.ArgumentParser(
        description="Convert a torchvision-style ResNet-18/34/50/101/152 checkpoint (loco_det, "
                    "torchvision, timm, Lightning, solo-learn, mmselfsup/MMPretrain, VISSL, MoCo, "
                    "DINO/iBOT, SwAV, BYOL) into Detectron2's .pkl weights format, with a "
                    "metadata record of the preprocessing the weights need.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="checkpoint to convert (read with torch.load(weights_only=True); "
                                      "other objects in it are left unread, never unpickled)")
    parser.add_argument("output", nargs="?",
                        help="Detectron2 weights file to write (must end in .pkl); or --output")
    parser.add_argument("--output", dest="output_option", metavar="FILE.pkl",
                        help="the same as the positional output (the spelling of the other tools)")
    parser.add_argument("--verify", action="store_true",
                        help="before writing, load the weights into Detectron2's own ResNet and "
                             "check that res2..res5 equal torchvision's layer1..layer4 on random "
                             "input (fails above a relative error of 1e-4)")
    parser.add_argument("--take", default=None, metavar="NAME",
                        help="when the file holds several encoders, take the one under this "
                             "path component: teacher|student (DINO/iBOT; default teacher), "
                             "state_dict_ema, encoder_k, ... (the error lists the choices)")
    parser.add_argument("--prefix", default=None,
                        help="take the encoder from the keys under this dotted prefix (full path "
                             "such as state_dict.module.encoder_q., or its tail; default: found "
                             "automatically)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.output is None) == (args.output_option is None):
        parser.error("give the output file once: positionally or as --output")
    args.output = args.output or args.output_option
    # Detectron2 v0.6 calls torch.jit.script at import; newer torch warns about it on stderr,
    # which would bury the one-line result/error of this tool.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                            category=FutureWarning)
    from loco_det.utils import LocoError, interruptible

    try:
        from loco_det.weights.convert import convert

        with interruptible():  # SIGTERM like Ctrl-C: one line from run_tool, no partial output
            result = convert(args.input, args.output, prefix=args.prefix, verify=args.verify,
                             take=args.take)
    except LocoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    method = f", method {result.method}" if result.method else ""
    print(f"layout: {result.layout}; encoder at {result.prefix!r} ({result.reason})")
    print(f"converted ResNet-{result.depth} from {args.input}{method}: "
          f"{result.num_tensors} tensors -> {result.output}")
    if result.placeholders:
        print(f"left unread (not weights, never unpickled): {', '.join(result.placeholders)}")
    if result.dropped:
        print(f"dropped {len(result.dropped)} keys that are not part of the ResNet encoder:")
        for key in result.dropped:
            print(f"  {key}")
    else:
        print("dropped no keys")
    if result.verify_error is not None:
        stages = ", ".join(f"{k} {v:.2e}" for k, v in result.stage_errors.items())
        print(f"verify: max relative error {result.verify_error:.2e} ({stages}) <= 1e-04: OK")
    return 0
