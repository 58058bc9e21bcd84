"""Self-supervised pretraining (SimCLR end-to-end, GIM or LoCo) of a torchvision ResNet.

Thin command line over `loco_det.pretrain.train`; see docs/formats.md, "Pretraining run".
"""
import argparse
import contextlib
import os
import sys


EXAMPLES = """\
examples:
  # CPU-scale LoCo on the embedded data (python tools/make_synthetic_data.py first)
  python tools/pretrain.py --config-file cpu_loco --output-dir runs/cpu_loco

  # override any key; batch sizes are global (over all processes)
  python tools/pretrain.py --config-file cpu_e2e OPTIM.EPOCHS=5 SEED=0 \\
      --output-dir runs/cpu_e2e

  # continue a killed or preempted run exactly where its last checkpoint left off
  python tools/pretrain.py --config-file cpu_loco --output-dir runs/cpu_loco --resume

  # ImageNet, 8 GPUs on one node (nccl); on CPU the same command uses gloo
  torchrun --nproc_per_node 8 tools/pretrain.py --config-file loco_r50_100ep \\
      DATA.ROOT=/data/imagenet/train --output-dir runs/loco_r50_100ep

  # several nodes
  torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      tools/pretrain.py --config-file loco_r50_800ep --output-dir runs/loco_r50_800ep

then read out the frozen features:
  python tools/linear_readout.py --checkpoint runs/cpu_loco/checkpoint_last.pth \\
      --output-dir runs/cpu_loco/readout
"""


def build_parser():
    parser = argparse.ArgumentParser(
        description="Pretrain a torchvision ResNet with a learning rule (MODEL.METHOD): e2e "
                    "(SimCLR), gim, loco, supervised, loco_overlap2, loco_blocks, or your own "
                    "(an import path or a loco_det.rules entry point; docs/pretraining.md). "
                    "Writes config.yaml, run_info.json, metrics.jsonl, TensorBoard logs, "
                    "checkpoint_last.pth and summary.json to --output-dir.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", "--config", dest="config", metavar="YAML",
                        help="recipe: a path, or a shipped name such as cpu_loco "
                             "(pretrain/cpu_loco.yaml; default: built-in defaults)")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help="run directory (refuses one holding another run's checkpoint "
                             "unless --resume)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (by default one bar for the whole run, with its ETA)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from DIR/checkpoint_last.pth (from scratch if absent)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. OPTIM.EPOCHS=10 DATA.ROOT=/data/train")
    return parser


def rank_prefix():
    """"rank R of W: " in a run of several processes (torchrun's variables), else ""."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"rank {os.environ.get('RANK', '0')} of {world}: " if world > 1 else ""


def main(argv=None):
    args = build_parser().parse_args(argv)
    from loco_det.pretrain.config import load_config
    from loco_det.pretrain.engine import train
    from loco_det.utils import LocoError, exit_code, interruptible, interrupted_line, run_lock

    from loco_det.recipes import resolve

    try:
        with interruptible():
            args.config = resolve(args.config, "pretrain")
            cfg = load_config(args.config, args.overrides)
            # one writer per run folder (rank 0 of a torchrun job holds it for all ranks)
            with (run_lock(args.output_dir) if os.environ.get("RANK", "0") == "0"
                  else contextlib.nullcontext()):
                train(cfg, args.output_dir, resume=args.resume, config_file=args.config,
                      progress=not args.no_progress)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through `interruptible`
        if os.environ.get("RANK", "0") == "0":
            ckpt = os.path.join(args.output_dir, "checkpoint_last.pth")
            kept = (f"kept {ckpt} (the last checkpoint)" if os.path.isfile(ckpt)
                    else "no checkpoint was written yet (a rerun starts over)")
            print(interrupted_line(e, kept, sys.argv[1:] if argv is None else argv),
                  file=sys.stderr, flush=True)
        return exit_code(e)
    except LocoError as e:
        # Each rank prints its own error: most checks fail alike on every rank, but some (a
        # rank's unreadable images) fail on one rank only.
        print(f"error: {rank_prefix()}{e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # a bug or a failed collective: say which rank, then the traceback
        if rank_prefix():
            print(f"error: {rank_prefix()}{type(e).__name__}: {str(e)[:500]} (traceback "
                  f"follows)", file=sys.stderr, flush=True)
        raise
    return 0
