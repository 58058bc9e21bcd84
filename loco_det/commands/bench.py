"""Compare e2e (SimCLR), GIM and LoCo side by side: step time and peak memory, or (--analyze)
fvcore's per-stage FLOPs and activations and what each method's decoders add.

Examples:
  # the efficiency targets' setting (step time and peak memory against e2e): ResNet-50,
  # 224 px, 16 images (32 views), every LoCo schedule
  python tools/bench_pretrain.py --arch resnet50 --image-size 224 --batch 16 --rounds 3

  # quick look on a laptop
  python tools/bench_pretrain.py --arch resnet18 --image-size 64 --batch 8 --rounds 2

  # two LoCo schedules, fair-baseline decoders (one conv block, 4-layer MLP for every method)
  python tools/bench_pretrain.py --loco-schedule fused,fused_stem --conv-blocks 1 --mlp-layers 4

  # on a busy shared machine: one thread, more rounds, compare the cpu/e2e column
  python tools/bench_pretrain.py --threads 1 --rounds 7 --no-memory

  # on a GPU (memory from torch.cuda.max_memory_allocated), bf16 autocast
  python tools/bench_pretrain.py --device cuda --batch 128 --amp

  # gradients kept and accumulated (zero_grad(set_to_none=False)) beside .grad=None, one run:
  # two tables, each with its ratios against e2e
  python tools/bench_pretrain.py --accumulate --loco-schedule fused_stem --rounds 5

  # exact gradient accumulation: every variant with 4 micro-batches beside one full batch
  python tools/bench_pretrain.py --accum-steps 4 --loco-schedule fused_stem

  # stage shares of FLOPs / activations against the paper's table, decoder costs
  python tools/bench_pretrain.py --analyze --arch resnet50 --image-size 224
"""
import argparse

from loco_det.pretrain import bench
from loco_det.pretrain.model import ARCHS, LOCO_SCHEDULES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", choices=ARCHS,
                        help="torchvision ResNet (default resnet50)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="square input side in pixels (default 224)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (views: 2x)")
    parser.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--conv-blocks", type=int, default=0, choices=(0, 1, 2),
                        help="residual conv blocks in every decoder (MODEL.DECODER.CONV_BLOCKS)")
    parser.add_argument("--mlp-layers", type=int, default=2, choices=(2, 4),
                        help="MLP layers in every decoder (MODEL.DECODER.MLP_LAYERS)")
    parser.add_argument("--loco-schedule", default="all",
                        help="LoCo schedule(s) to measure, one row each: 'all' or a comma-"
                             f"separated list of {', '.join(LOCO_SCHEDULES)} (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, help="intra-op CPU threads (default: torch's)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for every variant")
    parser.add_argument("--no-memory", action="store_true", help="no peak-memory measurement")
    parser.add_argument("--no-flops", action="store_true",
                        help="no counted step per variant (GFLOP and flop/e2e columns)")
    parser.add_argument("--accumulate", action="store_true",
                        help="also measure every variant with its gradients kept and zeroed in "
                             "place before each step (zero_grad(set_to_none=False)), in the same "
                             "rounds; prints a second table")
    parser.add_argument("--accum-steps", type=int, default=1, metavar="N",
                        help="add a row per variant running forward_backward(accum_steps=N) "
                             "(exact gradient accumulation over N micro-batches) beside it")
    parser.add_argument("--seed", type=int, default=0, help="weights and inputs")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    parser.add_argument("--analyze", action="store_true",
                        help="fvcore FLOPs/activations per stage and decoder costs; no timing")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch", "rounds", "accum_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch % args.accum_steps:
        parser.error(f"--accum-steps {args.accum_steps} does not divide --batch {args.batch}")
    if args.loco_schedule == "all":
        args.loco_schedule = LOCO_SCHEDULES
    else:
        args.loco_schedule = tuple(args.loco_schedule.split(","))
        unknown = [s for s in args.loco_schedule if s not in LOCO_SCHEDULES]
        if unknown:
            parser.error(f"--loco-schedule: unknown schedule {unknown[0]!r}; choose from "
                         f"all, {', '.join(LOCO_SCHEDULES)}")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
    return args


def main(argv=None):
    args = parse_args(argv)
    decoder_options = {"conv_blocks": args.conv_blocks, "mlp_layers": args.mlp_layers}
    if args.analyze:
        result = bench.analyze(args.arch, args.image_size, decoder_options)
        print(bench.format_analysis(result))
    else:
        schedules = args.loco_schedule
        result = bench.run_benchmark(
            arch=args.arch, image_size=args.image_size, batch=args.batch, rounds=args.rounds,
            warmup=args.warmup, loco_schedules=schedules, decoder_options=decoder_options,
            device=args.device, seed=args.seed, amp=args.amp, measure_memory=not args.no_memory,
            threads=args.threads, accumulate=args.accumulate, accum_steps=args.accum_steps,
            count_flops=not args.no_flops)
        print(bench.format_benchmark(result))
        if args.accumulate:
            print("\n" + bench.format_benchmark(result["kept"]))
    if args.json:
        from loco_det.utils import write_json
        write_json(args.json, result)
    return 0
