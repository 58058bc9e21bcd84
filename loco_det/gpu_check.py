"""The prepared GPU check (`make gpu-check`): every CUDA path of loco_det, once, in minutes.

On a machine with one NVIDIA GPU it runs, each as the real command-line tool in its own process:
the step-time / peak-memory benchmark (ResNet-50, 224 px, 128 images, bf16), 50 pretraining
steps through torchrun (nccl at world size 1, bf16 autocast, channels_last, SyncBN conversion),
a few steps of two gloo ranks sharing the GPU (RUN.DIST_BACKEND=gloo: GradientReducer,
gather_with_grad, SyncBN, LARS and the shared kNN monitor under bf16 and channels_last) whose
weights must match one process on the same global batches, the linear and kNN readouts of the
pretrained checkpoint, its conversion, 200 iterations of the frozen COCO-view Mask R-CNN on the
embedded data at 800 px plus evaluation, and plain Detectron2 `DefaultTrainer` iterations on
the same config for comparison. Parts that need numpy < 2 (the
Cityscapes evaluator) are skipped with a notice where numpy is 2.x. It prints one table (part,
status, key figures, seconds), writes it to $OUT/gpu_check_summary.txt when OUT is set, and
exits non-zero if any part failed.

`--cpu-smoke` runs the same parts on CPU at toy size (tiny data and images, a few steps, gloo
instead of nccl, float32), which is what the test suite runs so the check cannot rot unseen.
"""
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_NAME = "gpu_check_summary.txt"
LOGS_NAME = "gpu_check_logs.txt"  # every part's full output, one after the other
DET_CONFIG = "det_configs/cpu_synth_coco_R18_FPN_frozen.yaml"
CITYSCAPES_CONFIG = "det_configs/cpu_synth_cityscapes_R18_FPN_frozen.yaml"

# Sizes of the two modes. GPU: the sizes, inside an 8-minute budget. CPU smoke: the same
# code paths at the smallest sizes that still exercise them (a timed Detectron2 iteration needs
# more than IterationTimer's 3 warm-up iterations).
GPU = dict(
    device="cuda", budget_s=480, n_train=600, n_val=100, data_size="128x160",
    bench=["--arch", "resnet50", "--image-size", "224", "--batch", "128", "--rounds", "3",
           "--warmup", "1", "--amp"],
    pretrain_batch=60, pretrain_epochs=5, pretrain_size=64, workers=4,
    # float32 with TF32 off: 2 % of each update (measured on an H200: worst 0.006; TF32 alone
    # moves updates by 0.05-0.1, bf16 by 0.25-0.33, so neither can be held to a fixed tolerance)
    two_rank=dict(batch=32, steps=4, size=64, tolerance=0.02, bf16_pair=True),
    readout=[], knn=[],
    det_iters=200, det_steps="(150, 180)", det_warmup=50, plain_iters=100,
    det_sizes=["INPUT.MIN_SIZE_TRAIN", "(800,)", "INPUT.MAX_SIZE_TRAIN", "1333",
               "INPUT.MIN_SIZE_TEST", "800", "INPUT.MAX_SIZE_TEST", "1333",
               "MODEL.ANCHOR_GENERATOR.SIZES", "[[32], [64], [128], [256], [512]]"],
    timeouts=dict(data=90, bench=150, pretrain=120, two_rank=120, linear_readout=90,
                  knn_readout=90, convert=60, detection=200, plain_d2=120, cityscapes=120,
                  input=60),
)
CPU_SMOKE = dict(
    device="cpu", budget_s=1200, n_train=16, n_val=8, data_size="64x80",
    bench=["--arch", "resnet18", "--image-size", "32", "--batch", "4", "--rounds", "1",
           "--warmup", "0", "--loco-schedule", "fused", "--no-memory", "--threads", "1"],
    pretrain_batch=8, pretrain_epochs=1, pretrain_size=32, workers=0,
    two_rank=dict(batch=8, steps=2, size=32, tolerance=1e-3, bf16_pair=False),  # float32
    readout=["--epochs", "2"], knn=["--k", "5"],
    det_iters=5, det_steps="(4,)", det_warmup=1, plain_iters=5,
    det_sizes=["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
               "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
               "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
               "TEST.DETECTIONS_PER_IMAGE", "20"],
    # generous: a shared 2-core machine under load runs these several times slower than idle
    timeouts=dict(data=300, bench=300, pretrain=300, two_rank=300, linear_readout=300,
                  knn_readout=300, convert=300, detection=300, plain_d2=300, cityscapes=300,
                  input=300),
)
PARTS = ("data", "bench", "pretrain", "two_rank", "linear_readout", "knn_readout", "convert",
         "detection", "plain_d2", "cityscapes", "input")


class PartFailed(Exception):
    """The part ran and something in it is wrong (message: what)."""


class PartSkipped(Exception):
    """The part cannot run here (message: why); not a failure."""


def cityscapes_blocked(numpy_version):
    """Why the Cityscapes evaluator cannot run with this numpy, or None: cityscapesscripts 2.3.0
    calls `np.in1d` (gone in numpy 2.4) and its matches.json dump meets numpy integer scalars
    that `json` cannot encode (numpy 2.0-2.3)."""
    if int(numpy_version.split(".")[0]) >= 2:
        return (f"needs numpy < 2 (cityscapesscripts 2.3.0's evaluation fails with numpy "
                f"{numpy_version})")
    return None


class Check:
    """One run of the check: settings, work folder, environment of the child processes, the
    time budget, and the rows of the summary table."""

    def __init__(self, settings, work, site=None):
        self.s = settings
        self.work = work
        self.deadline = time.monotonic() + settings["budget_s"]
        self.rows = []
        self.logs = {}
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   DETECTRON2_DATASETS=os.path.join(work, "datasets"))
        path = [p for p in (site, ROOT, env.get("PYTHONPATH")) if p]
        env["PYTHONPATH"] = os.pathsep.join(path)
        if settings["device"] == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is the CPU path even on a GPU box
        self.env = env

    def path(self, *parts):
        return os.path.join(self.work, *parts)

    def tool(self, part, args, python_args=(), env=None):
        """Run `python [python_args] args` in the repo root (`env`: extra variables); its output
        goes to PART.log. Returns the output; a non-zero exit or the time limit is PartFailed."""
        limit = min(self.s["timeouts"][part], self.deadline - time.monotonic())
        if limit <= 0:
            raise PartFailed("not run: the check's time budget is spent")
        log = self.path(f"{part}.log")
        self.logs[part] = log
        cmd = [sys.executable, *python_args, *args]
        with open(log, "a") as f:
            f.write("+ " + " ".join(cmd) + "\n")
            f.flush()
            # Its own process group, so that a timeout also ends what it started (torchrun's
            # worker, data-loader workers).
            proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(self.env, **(env or {})), stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise PartFailed(f"timed out after {limit:.0f} s (log: {log})") from None
        with open(log) as f:
            out = f.read()
        if proc.returncode != 0:
            lines = [ln for ln in out.splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("error:")]
            last = (errors or lines or ["(no output)"])[-1]
            raise PartFailed(f"exit {proc.returncode}: {last[:200]}")
        return out

    def run_part(self, name, fn):
        start = time.monotonic()
        try:
            status, figures = "ok", fn()
        except PartSkipped as e:
            status, figures = "skipped", str(e)
        except PartFailed as e:
            status, figures = "FAIL", str(e)
        except Exception as e:  # a bug in a part's checks: its row says what, the others run
            status, figures = "FAIL", f"{type(e).__name__}: {e}"[:300]
        self.rows.append((name, status, figures, time.monotonic() - start))
        return status


def _json(path):
    if not os.path.isfile(path):
        raise PartFailed(f"{path} was not written")
    with open(path) as f:
        return json.load(f)


def _last_with(path, key):
    """The last record of a Detectron2 metrics.json (one JSON object per line) that has `key`."""
    if not os.path.isfile(path):
        raise PartFailed(f"{path} was not written")
    value = None
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if key in record:
                value = record[key]
    if value is None:
        raise PartFailed(f"{path}: no record with {key!r}")
    return value


# ----------------------------------------------------------------------------- the parts

def part_data(c):
    s = c.s
    c.tool("data", ["tools/make_synthetic_data.py", "--out", c.path("datasets", "loco_synth"),
                    "--num-train", str(s["n_train"]), "--num-val", str(s["n_val"]),
                    "--size", s["data_size"], "--no-progress"])
    return f"{s['n_train']} + {s['n_val']} scenes, {s['data_size']} px"


def part_bench(c):
    out = c.path("bench.json")
    c.tool("bench", ["tools/bench_pretrain.py", "--device", c.s["device"], *c.s["bench"],
                     "--json", out])
    r = _json(out)
    locos = {n: v for n, v in r["time_ratio"].items() if n.startswith("loco")}
    best = min(locos, key=locos.get)
    e2e_rate = r["batch"] / r["time"]["e2e"]
    flops = (f" (flop/e2e {r['flops'][best] / r['flops']['e2e']:.2f})" if r.get("flops")
             else "")
    fig = (f"{r['arch']} {r['image_size']} px x{r['batch']}: e2e {e2e_rate:.0f} img/s; "
           f"time/e2e {best} {locos[best]:.2f}{flops}, gim {r['time_ratio']['gim']:.2f}")
    mem = r["memory"]
    if c.s["device"] == "cuda":
        if not mem or mem["e2e"] <= 0:
            raise PartFailed(f"no CUDA peak memory measured ({mem})")
        ratios = {n: mem[n] / mem["e2e"] for n in locos}
        best_m = min(ratios, key=ratios.get)
        fig += (f"; max_memory_allocated e2e {mem['e2e'] / 2**20:.0f} MiB, mem/e2e {best_m} "
                f"{ratios[best_m]:.2f}, gim {mem['gim'] / mem['e2e']:.2f}")
    return fig


def part_input(c):
    """The input pipeline against the step: per-core CPU rates of both DATA.AUGMENT_DEVICE
    paths on generated 500x375 JPEGs (tools/bench_input.py) times this machine's cores, the
    device's share of the cuda path, and the fastest step of the bench part; says which
    paths would leave the step input-bound on this machine."""
    out = c.path("input.json")
    smoke = c.s["device"] == "cpu"
    c.tool("input", ["tools/bench_input.py", "--synthetic", "2" if smoke else "8", "--rounds",
                     "1", "--device", c.s["device"], "--device-batch", "4" if smoke else "128",
                     "--json", out])
    r = _json(out)
    cores = len(os.sched_getaffinity(0))
    per = r["cpu_s_per_image"]
    cpu_rate = cores / per["cpu (DATA.AUGMENT_DEVICE=cpu)"]
    cuda_rate = min(cores / per["cuda, CPU part (decode+crop+flip)"],
                    r["device"]["images_per_s"])
    fig = (f"loader on {cores} cores: cpu path {cpu_rate:.0f} img/s, cuda path {cuda_rate:.0f} "
           f"img/s ({c.s['device']} share {r['device']['images_per_s']:.0f} img/s)")
    bench = c.path("bench.json")
    if os.path.isfile(bench):
        b = _json(bench)
        step = b["batch"] / min(b["time"].values())
        bound = [name for name, rate in (("cpu", cpu_rate), ("cuda", cuda_rate)) if rate < step]
        fig += (f"; step {step:.0f} img/s: input-bound with "
                f"{', '.join(bound) if bound else 'neither path'}")
    return fig


def pretrain_overrides(c):
    s = c.s
    return [f"DATA.ROOT={c.path('datasets', 'loco_synth', 'imagefolder', 'train')}",
            f"DATA.IMAGE_SIZE={s['pretrain_size']}", f"DATA.NUM_WORKERS={s['workers']}",
            f"OPTIM.BATCH_SIZE={s['pretrain_batch']}", f"OPTIM.EPOCHS={s['pretrain_epochs']}",
            "OPTIM.WARMUP_EPOCHS=1", "SEED=0", "RUN.AMP=bf16", "RUN.CHANNELS_LAST=True",
            "MODEL.SYNC_BN=True", "RUN.LOG_PERIOD=10"]


def part_pretrain(c):
    s = c.s
    out_dir = c.path("pretrain")
    out = c.tool("pretrain", ["--standalone", "--nproc_per_node", "1", "tools/pretrain.py",
                              "--config", "pretrain/cpu_loco.yaml", "--output-dir", out_dir,
                              *pretrain_overrides(c)],
                 python_args=["-m", "torch.distributed.run"])
    summary = _json(os.path.join(out_dir, "summary.json"))
    expected = s["pretrain_epochs"] * (s["n_train"] // s["pretrain_batch"])
    if not summary.get("finished") or summary["steps"] != expected:
        raise PartFailed(f"summary.json: {summary.get('steps')} steps, expected {expected}")
    if summary["world_size"] != 1:
        raise PartFailed(f"world size {summary['world_size']}, expected 1")
    cuda_notices = ("MODEL.SYNC_BN has no effect", "MODEL.SYNC_BN ignored",
                    "apply on CUDA only")
    if s["device"] == "cuda":
        for n in cuda_notices:
            if n in out:
                raise PartFailed(f"a CUDA path was not taken: {n!r} in the output")
    elif "MODEL.SYNC_BN ignored on CPU" not in out:
        raise PartFailed("expected the process group (gloo) and SyncBN's CPU notice")
    with open(os.path.join(out_dir, "run_info.json")) as f:
        device = json.load(f).get("device")
    losses = ", ".join(f"{u} {v:.2f}" for u, v in summary["final_losses"].items())
    backend = "nccl" if s["device"] == "cuda" else "gloo"
    return (f"{summary['steps']} steps, {backend} world 1 on {device}, "
            f"{summary['wall_time_s']:.0f} s in all; losses {losses}")


TWO_RANK_CHILD = ("import sys; from loco_det.gpu_check import two_rank_main; "
                  "sys.exit(two_rank_main(sys.argv[1:]))")


def two_rank_overrides(c, folder, amp):
    t = c.s["two_rank"]
    return [folder, f"DATA.ROOT={c.path('datasets', 'loco_synth', 'imagefolder', 'train')}",
            f"DATA.MAX_IMAGES={t['batch'] * t['steps']}", f"DATA.IMAGE_SIZE={t['size']}",
            f"OPTIM.BATCH_SIZE={t['batch']}", "OPTIM.EPOCHS=1", "OPTIM.WARMUP_EPOCHS=0",
            "OPTIM.NAME=lars", "OPTIM.BASE_LR=0.3", "SEED=0", "DATA.NUM_WORKERS=0",
            f"RUN.AMP={amp}", "RUN.CHANNELS_LAST=True", "MODEL.SYNC_BN=True",
            "RUN.DIST_BACKEND=gloo", f"RUN.LOG_PERIOD={t['steps']}", "RUN.KNN_PERIOD=1"]


# TF32 off in every library that would use it (cuDNN convolutions, cuBLAS matmuls): the exact pair
# compares float32 arithmetic, where only summation order differs between 2 ranks and 1 process.
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0"}


def _two_rank_pair(c, name, amp):
    """Pretrain the same global batches on 2 gloo ranks and in 1 process; returns the folders,
    the 2-rank run's output and summary, after checking its steps, world size and equal rank
    weights."""
    t = c.s["two_rank"]
    two, one = c.path("two_rank", name, "ranks2"), c.path("two_rank", name, "ranks1")
    env = NO_TF32 if amp == "off" else None
    out2 = c.tool("two_rank", ["--standalone", "--nproc_per_node", "2", "--no-python",
                               sys.executable, "-c", TWO_RANK_CHILD,
                               *two_rank_overrides(c, two, amp)],
                  python_args=["-m", "torch.distributed.run"], env=env)
    c.tool("two_rank", ["-c", TWO_RANK_CHILD, *two_rank_overrides(c, one, amp)], env=env)
    summary = _json(os.path.join(two, "summary.json"))
    if summary.get("steps") != t["steps"] or summary.get("world_size") != 2:
        raise PartFailed(f"two ranks ({name}): {summary.get('steps')} steps at world size "
                         f"{summary.get('world_size')}, expected {t['steps']} at 2")
    if len(set(summary["param_sha256"])) != 1:
        raise PartFailed(f"the two ranks ({name}) ended with different weights")
    return two, one, out2, summary


def part_two_rank(c):
    """Two gloo ranks on one device (GradientReducer, gather_with_grad, SyncBN on CUDA,
    channels_last, the kNN monitor shared by the ranks) against one process on the same global
    batches, in float32 (TF32 off): every tensor's update must agree within the mode's tolerance
    (CPU: BN on fixed statistics, as SyncBN is CUDA-only). On CUDA a bf16 pair follows: its
    2-rank vs 1-process difference must stay within bf16's own effect (bf16 vs float32, 1
    process), the only scale a bf16 comparison can be held to."""
    t = c.s["two_rank"]
    two, one, out2, summary = _two_rank_pair(c, "fp32", "off")
    buckets = len(summary.get("comm_last_step", {}).get("buckets", []))
    if not buckets:
        raise PartFailed("no GradientReducer buckets recorded: gradients were not averaged")
    facts = [_json(os.path.join(two, f"setup_rank{r}.json")) for r in (0, 1)]
    if c.s["device"] == "cuda":
        want = {"sync_bn": True, "autocast": "None", "channels_last": True}
        for r, f in enumerate(facts):
            wrong = {k: f.get(k) for k, v in want.items() if f.get(k) != v}
            if wrong or not f["device"].startswith("cuda"):
                raise PartFailed(f"rank {r} did not take the CUDA paths: {f}")
        if "MODEL.SYNC_BN ignored" in out2:
            raise PartFailed("SyncBN was not used by the two ranks")
    knn = {}
    for label, folder in (("2 ranks", two), ("1 process", one)):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if "knn/k20/res5" in line]
        if not records:
            raise PartFailed(f"{label}: no kNN readout in metrics.jsonl (RUN.KNN_PERIOD=1)")
        knn[label] = records[-1]["knn/k20/res5"]
    worst, name = two_rank_difference(os.path.join(one, "checkpoint_last.pth"),
                                      os.path.join(two, "checkpoint_last.pth"),
                                      os.path.join(one, "initial.pth"))
    if not worst <= t["tolerance"]:
        raise PartFailed(f"2 ranks vs 1 process: {name}'s update differs by {worst:.2g} of its "
                         f"norm (tolerance {t['tolerance']:g})")
    text = (f"{t['steps']} steps x{t['batch']}, gloo 2 ranks on {facts[0]['device']}"
            f"{' (SyncBN, float32, channels_last)' if c.s['device'] == 'cuda' else ' (fixed BN)'}, "
            f"{buckets} buckets/step; vs 1 process: largest update difference {worst:.2g} "
            f"({name}), tolerance {t['tolerance']:g}; kNN shared by the ranks: k20 res5 "
            f"{knn['2 ranks']:.1f} (1 process {knn['1 process']:.1f})")
    if not t["bf16_pair"]:
        return text
    two_b, one_b, _, _ = _two_rank_pair(c, "bf16", "bf16")
    for r in (0, 1):
        f = _json(os.path.join(two_b, f"setup_rank{r}.json"))
        if f.get("autocast") != "torch.bfloat16" or not f.get("sync_bn"):
            raise PartFailed(f"rank {r} of the bf16 pair did not take the bf16 SyncBN path: {f}")
    worst_b, name_b = two_rank_difference(os.path.join(one_b, "checkpoint_last.pth"),
                                          os.path.join(two_b, "checkpoint_last.pth"),
                                          os.path.join(one_b, "initial.pth"))
    scale, _ = two_rank_difference(os.path.join(one, "checkpoint_last.pth"),
                                   os.path.join(one_b, "checkpoint_last.pth"),
                                   os.path.join(one, "initial.pth"))
    if not worst_b <= scale:
        raise PartFailed(f"bf16: 2 ranks vs 1 process differ by {worst_b:.2g} ({name_b}), more "
                         f"than bf16 itself moves the updates (bf16 vs float32: {scale:.2g})")
    return (text + f"; bf16 pair: largest difference {worst_b:.2g} ({name_b}), within bf16's own "
            f"{scale:.2g}")


def two_rank_difference(path_one, path_two, path_initial):
    """(largest relative difference, its tensor): over every floating-point tensor that moved,
    ||update_two - update_one|| / ||update_one||, updates taken from the initial weights."""
    import torch

    one, two, initial = (torch.load(p, map_location="cpu", weights_only=True)
                         for p in (path_one, path_two, path_initial))
    worst, name, moved = 0.0, "", 0
    for part in ("encoder", "decoders"):
        if one[part].keys() != two[part].keys():
            raise PartFailed(f"the checkpoints' {part} tensors differ in names")
        for key, w1 in one[part].items():
            if not w1.is_floating_point() or key.endswith(("running_mean", "running_var")):
                continue
            w0, w2 = initial[f"{part}.{key}"].float(), two[part][key].float()
            d1 = (w1.float() - w0).norm().item()
            if d1 == 0:
                continue
            moved += 1
            rel = (w2 - w1.float()).norm().item() / d1
            if not rel <= worst:   # also catches NaN
                worst, name = rel, f"{part}.{key}"
    if moved < 10:
        raise PartFailed(f"only {moved} tensors moved: nothing to compare")
    return worst, name


def two_rank_main(argv):
    """Child process of the two_rank part (one of two ranks, or the one process): pretrains
    pretrain/cpu_loco.yaml with KEY=VALUE overrides into OUT (argv[0]), recording what the
    model setup did (setup_rank<r>.json) and, on rank 0, the initial weights (initial.pth).
    On CPU every BatchNorm keeps fixed statistics: torch's SyncBN is CUDA-only, and per-rank
    BN statistics would legitimately differ from one process's."""
    import torch

    from loco_det.pretrain import engine
    from loco_det.pretrain.config import load_config

    out, overrides = argv[0], argv[1:]
    rank = int(os.environ.get("RANK", "0"))
    setup = engine.setup_model

    def recording_setup(cfg, env, num_classes=None):
        model = setup(cfg, env, num_classes)
        if env.device.type == "cpu":
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
                    m.train = lambda mode=True, m=m: m
        os.makedirs(out, exist_ok=True)
        conv = model.encoder.conv1.weight
        facts = {"device": str(env.device), "autocast": str(model.autocast_dtype),
                 "sync_bn": any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()),
                 "channels_last": conv.is_contiguous(memory_format=torch.channels_last)
                 and not conv.is_contiguous()}
        with open(os.path.join(out, f"setup_rank{rank}.json"), "w") as f:
            json.dump(facts, f)
        if rank == 0:
            torch.save({n: t.detach().cpu().clone() for n, t in model.state_dict().items()},
                       os.path.join(out, "initial.pth"))
        return model

    engine.setup_model = recording_setup
    engine.train(load_config(os.path.join(ROOT, "pretrain", "cpu_loco.yaml"), overrides), out)
    return 0


def _checkpoint(c):
    ckpt = c.path("pretrain", "checkpoint_last.pth")
    if not os.path.isfile(ckpt):
        raise PartFailed("no pretraining checkpoint (the pretrain part failed)")
    return ckpt


def part_linear_readout(c):
    out = c.path("readout")
    c.tool("linear_readout", ["tools/linear_readout.py", "--checkpoint", _checkpoint(c),
                              "--output-dir", out, "--workers", str(c.s["workers"]),
                              "--no-progress", *c.s["readout"]])
    r = _json(os.path.join(out, "readout.json"))
    return "top-1 " + ", ".join(f"{k} {v:.1f}" for k, v in r["top1"].items())


def part_knn_readout(c):
    if not os.path.isfile(os.path.join(ROOT, "tools", "knn_readout.py")):
        raise PartSkipped("tools/knn_readout.py is not in this tree")
    out = c.path("readout")
    c.tool("knn_readout", ["tools/knn_readout.py", "--checkpoint", _checkpoint(c),
                           "--output-dir", out, "--device", c.s["device"],
                           "--workers", str(c.s["workers"]), "--no-progress", *c.s["knn"]])
    r = _json(os.path.join(out, "knn.json"))
    return "top-1 res5 " + ", ".join(f"{k} {v['res5']:.1f}" for k, v in r["top1"].items())


def part_convert(c):
    c.tool("convert", ["tools/convert_to_detectron2.py", _checkpoint(c),
                       c.path("weights.pkl"), "--verify"])
    return "converted and verified against the checkpoint's encoder"


def detection_opts(c, out_dir, iters):
    s = c.s
    return ["MODEL.DEVICE", s["device"], "OUTPUT_DIR", out_dir, "SEED", "0",
            "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", s["det_steps"],
            "SOLVER.WARMUP_ITERS", str(s["det_warmup"]), "SOLVER.CHECKPOINT_PERIOD", "100000",
            "DATALOADER.NUM_WORKERS", str(s["workers"]), *s["det_sizes"]]


def part_detection(c):
    weights = c.path("weights.pkl")
    if not os.path.isfile(weights):
        raise PartFailed("no converted weights (the convert part failed)")
    out_dir = c.path("det")
    c.tool("detection", ["tools/train_net.py", "--config-file", DET_CONFIG, "MODEL.WEIGHTS",
                         weights, *detection_opts(c, out_dir, c.s["det_iters"])])
    r = _json(os.path.join(out_dir, "results.json"))
    c.det_time = _last_with(os.path.join(out_dir, "metrics.json"), "time")
    box, mask = (r.get(k) or {} for k in ("bbox", "segm"))
    return (f"{c.s['det_iters']} it, {c.det_time:.3f} s/it = {1 / c.det_time:.2f} it/s (median "
            "of the last 20); "
            f"box AP {box.get('AP', float('nan')):.1f}, mask AP {mask.get('AP', float('nan')):.1f}")


def part_plain_d2(c):
    out_dir = c.path("plain_d2")
    c.tool("plain_d2", ["-c", "import sys; from loco_det.gpu_check import plain_trainer_main; "
                              "sys.exit(plain_trainer_main(sys.argv[1:]))", DET_CONFIG,
                        *detection_opts(c, out_dir, c.s["plain_iters"])])
    plain = _last_with(os.path.join(out_dir, "metrics.json"), "time")
    fig = f"{c.s['plain_iters']} it, {plain:.3f} s/it = {1 / plain:.2f} it/s"
    if getattr(c, "det_time", None):
        fig += f"; loco_det Trainer / plain DefaultTrainer time per it {c.det_time / plain:.2f}"
    return fig


def part_cityscapes(c):
    import numpy

    why = cityscapes_blocked(numpy.__version__)
    if why:
        raise PartSkipped(why)
    weights = c.path("weights.pkl")
    if not os.path.isfile(weights):
        raise PartFailed("no converted weights (the convert part failed)")
    out_dir = c.path("det_cityscapes")
    c.tool("cityscapes", ["tools/train_net.py", "--config-file", CITYSCAPES_CONFIG,
                          "MODEL.WEIGHTS", weights, *detection_opts(c, out_dir, c.s["det_iters"])])
    r = _json(os.path.join(out_dir, "results.json"))
    segm = r.get("segm") or {}
    return f"{c.s['det_iters']} it; mask AP {segm.get('AP', float('nan')):.1f} (cityscapesscripts)"


PART_FUNCS = {name: globals()[f"part_{name}"] for name in PARTS}


def plain_trainer_main(argv):
    """Child process of the plain_d2 part: Detectron2's own DefaultTrainer on CONFIG with
    KEY VALUE overrides, loco_det used only to read the config and register the datasets. The
    weights are not loaded (the timing does not depend on their values) and there is no
    evaluation (DefaultTrainer has no evaluator of its own)."""
    import torch

    from loco_det.detection import train as det_train
    from loco_det.detection.config import apply_single_process_norm, setup_cfg
    from detectron2.engine import DefaultTrainer
    from detectron2.utils.logger import setup_logger

    config_file, opts = argv[0], argv[1:]
    det_train._register_datasets()
    cfg = setup_cfg(config_file, opts)
    cfg.defrost()
    apply_single_process_norm(cfg, 1)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TEST = ()
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    setup_logger(cfg.OUTPUT_DIR)
    DefaultTrainer(cfg).train()
    return 0


# ----------------------------------------------------------------------------- install

def install_wheels(wheel_dir, site):
    """Install the carried wheels and the Detectron2 sdist (without its C++ extension, and
    patched, as tools/install_detectron2.py does) into `site` with this interpreter; nothing is
    fetched."""
    from . import gpu_wheels

    d2 = _install_detectron2_module()
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    errors = gpu_wheels.check_folder(wheel_dir, d2.sdist_name(), here)
    if errors:
        raise PartFailed("; ".join(errors))
    wheels = sorted(os.path.join(wheel_dir, f) for f in os.listdir(wheel_dir)
                    if f.endswith(".whl"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--upgrade", "--target", site]
    subprocess.run(pip + wheels, check=True)
    sdist = os.path.join(wheel_dir, d2.sdist_name())
    if d2.sha256_of(sdist) != d2.SHA256:
        raise PartFailed(f"{sdist} does not have the pinned sha256 {d2.SHA256}")
    top = f"{d2.PACKAGE}-{d2.VERSION}"
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(sdist) as tar:
        tar.extractall(tmp, members=list(d2._safe_members(tar, os.path.join(top, "detectron2"))))
        src = os.path.join(tmp, top)
        with open(os.path.join(src, "setup.py"), "w") as f:
            f.write(d2.SETUP_PY)
        subprocess.run(pip[:-3] + ["--no-build-isolation", "--target", site, src], check=True)
    try:  # the recorded patch for this stack, as tools/install_detectron2.py applies it
        d2.patch_detectron2(os.path.join(site, "detectron2"))
    except d2.PatchError as e:
        raise PartFailed(str(e)) from None


def _install_detectron2_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "install_detectron2", os.path.join(ROOT, "tools", "install_detectron2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- summary

def format_table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [("part", "status", "key figures", "s")])
              for i in range(3)]
    lines = [header, "",
             f"{'part':<{widths[0]}}  {'status':<{widths[1]}}  {'seconds':>7}  key figures",
             "-" * (widths[0] + widths[1] + 20 + min(widths[2], 60))]
    for name, status, figures, secs in rows:
        lines.append(f"{name:<{widths[0]}}  {status:<{widths[1]}}  {secs:>7.1f}  {figures}")
    failed = [r[0] for r in rows if r[1] == "FAIL"]
    lines += ["", f"{len(rows) - len(failed)} of {len(rows)} parts passed or were skipped"
              + (f"; FAILED: {', '.join(failed)}" if failed else "")]
    return "\n".join(lines)


def environment_line(device):
    import numpy
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (CPU smoke run)"
    return (f"gpu_check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: GPU {gpu}; "
            f"python {sys.version.split()[0]}, torch {torch.__version__}, numpy "
            f"{numpy.__version__}")


def run(cpu_smoke=False, work=None, wheels=None, site=None, parts=PARTS, out_dir=None):
    """Run the check; returns (exit status, summary text). `work`: scratch folder (a fresh
    temporary one if None); `wheels`: the carried folder to install first (into `site`)."""
    import torch

    settings = CPU_SMOKE if cpu_smoke else GPU
    if not cpu_smoke and not torch.cuda.is_available():
        raise PartFailed("no CUDA device here; the CPU form of this check is --cpu-smoke")
    work = work or tempfile.mkdtemp(prefix="loco_det_gpu_check_")
    os.makedirs(work, exist_ok=True)
    start = time.monotonic()
    rows = []
    if wheels:
        site = site or os.path.join(work, "site")
        t = time.monotonic()
        try:
            install_wheels(wheels, site)
            rows.append(("install", "ok", f"wheels from {wheels} into {site}",
                         time.monotonic() - t))
        except (PartFailed, subprocess.CalledProcessError) as e:
            rows.append(("install", "FAIL", str(e)[:200], time.monotonic() - t))
    check = Check(settings, work, site)
    check.rows = rows
    if not any(r[1] == "FAIL" for r in rows):
        for name in parts:
            check.run_part(name, lambda n=name: PART_FUNCS[n](check))
    header = environment_line(settings["device"]) + (
        f"; {time.monotonic() - start:.0f} s in all, budget {settings['budget_s']} s")
    text = format_table(check.rows, header)
    for name, status, _, _ in check.rows:
        if status == "FAIL" and name in check.logs:
            with open(check.logs[name]) as f:
                tail = f.read().splitlines()[-25:]
            text += (f"\n\n--- last lines of {name}'s log ({check.logs[name]}) ---\n"
                     + "\n".join(tail))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        logs = []
        for name, log in check.logs.items():
            with open(log) as f:
                logs.append(f"===== {name} ({log})\n{f.read()}")
        for name, content in ((SUMMARY_NAME, text + "\n"), (LOGS_NAME, "\n".join(logs))):
            tmp = os.path.join(out_dir, name + ".part")
            with open(tmp, "w") as f:
                f.write(content)
            os.replace(tmp, os.path.join(out_dir, name))
    failed = any(r[1] == "FAIL" for r in check.rows)
    return (1 if failed else 0), text


__all__ = ["run", "PARTS", "GPU", "CPU_SMOKE", "cityscapes_blocked", "format_table",
           "install_wheels", "plain_trainer_main", "two_rank_main", "PartFailed",
           "PartSkipped"]
