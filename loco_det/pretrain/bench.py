"""What e2e, GIM and LoCo cost on one machine: step time, peak memory and fvcore accounting.

Timing runs every variant in one process, interleaved round by round (e2e, gim, loco..., bare,
e2e, ...) after warm-up rounds: machine drift (other jobs, thermal state) hits all variants
alike. Times are medians over rounds; ratios are medians of the same-round ratios, which also
cancel a burst that slows one whole round. Process CPU time is shown beside wall time: on a
shared machine it is the less disturbed of the two.

Peak memory is measured per variant in its own spawned process, because a process's peak RSS
only grows: on CPU, peak RSS (VmHWM) of a process that builds the model and inputs and runs one
step, minus that of a baseline process that builds the same and runs no step; on CUDA,
`torch.cuda.max_memory_allocated` over the step minus what was allocated before.

"bare" is a plain torchvision forward + backward of the same 2N views (sum of the logits as the
loss): the floor that e2e's decoder and loss are measured against.

Gradient modes (`grad_modes`): "none" sets every `.grad` to None before each step (the training
loop's `zero_grad(set_to_none=True)`); "kept" keeps the gradient buffers and zeroes them in place
(`zero_grad(set_to_none=False)`), so every step accumulates into existing `.grad`, as gradient
accumulation does. Both modes run in the same rounds of the same process; each has its own
table. Memory of a "kept" step counts the kept buffers: the worker allocates them before the
step, over the same no-step baseline.

`accum_steps` > 1 adds, after each e2e/gim/loco row, the same variant run with
`forward_backward(..., accum_steps=N)` (row "<name>/accumN"), interleaved with it: the time and
memory cost of exact gradient accumulation against one full-batch step.
"""
import contextlib
import importlib
import importlib.util
import multiprocessing
import os
import resource
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

from .model import LOCO_SCHEDULES, NUM_STAGES, build_encoder, build_model, run_stage, \
    stage_channels

# The LoCo paper's per-stage shares for ResNet-50, percent (Xiong, Ren and Urtasun, NeurIPS
# 2020, arXiv:2008.01342).
PAPER_ACTIVATION_SHARE = (43.64, 29.09, 21.82, 5.45)
PAPER_FLOP_SHARE = (19.39, 25.09, 35.80, 19.73)
STAGE_LABELS = ("S1 stem+res2", "S2 res3", "S3 res4", "S4 res5")
# Efficiency targets: step time and peak memory against e2e (and e2e's overhead over bare
# torchvision), defined for ResNet-50, 224 px, 16 images; as (row, column, ratio limit).
TARGETS = (("loco", "time", 1.15), ("loco", "memory", 0.80), ("gim", "memory", 0.70),
           ("e2e/bare", "time", 1.10))
LOCO_LIMITS = {column: limit for row, column, limit in TARGETS if row == "loco"}


# A second loco_det checkout (e.g. the commit before a change of the engine): when this
# environment variable names one, every e2e/gim/loco row also runs from that checkout as
# "ref:<row>", interleaved with its own row, so that before and after come from one run.
REFERENCE_ENV = "LOCO_DET_BENCH_REFERENCE"


GRAD_MODES = ("none", "kept")
ACCUM_SUFFIX = "/accum"


def variants(loco_schedules, accum_steps=1):
    """Names of the rows to measure: e2e, gim, one loco row per schedule, bare (each but bare
    followed by its "ref:" row when $LOCO_DET_BENCH_REFERENCE names a checkout, and by its
    "<row>/accumN" row when accum_steps N > 1)."""
    rows = ["e2e", "gim", *[f"loco:{s}" for s in loco_schedules]]
    own = rows
    if os.environ.get(REFERENCE_ENV):
        rows = [r for row in rows for r in (row, f"ref:{row}")]
    if accum_steps > 1:
        rows = [r for row in rows for r in (
            (row, f"{row}{ACCUM_SUFFIX}{accum_steps}") if row in own else (row,))]
    return [*rows, "bare"]


def step_kwargs(name):
    """forward_backward's keyword arguments for row `name` (accum_steps of a "/accumN" row)."""
    _, suffix, steps = name.partition(ACCUM_SUFFIX)
    return {"accum_steps": int(steps)} if suffix else {}


def prepare_grads(model, mode):
    """Before a step: "none" sets every .grad to None; "kept" zeroes them in place, allocating
    those that do not exist yet (zero_grad(set_to_none=False) after a first step)."""
    if mode not in GRAD_MODES:
        raise ValueError(f"unknown gradient mode {mode!r}; choose one of: {', '.join(GRAD_MODES)}")
    for p in model.parameters():
        if mode == "none":
            p.grad = None
        elif p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.zero_()


def reference_build_model():
    """build_model of the checkout named by $LOCO_DET_BENCH_REFERENCE, imported as the package
    `loco_det_reference` (loco_det's imports are relative, so it uses its own modules)."""
    root = os.path.join(os.environ[REFERENCE_ENV], "loco_det")
    name = "loco_det_reference"
    if name not in sys.modules:
        init = os.path.join(root, "__init__.py")
        if not os.path.isfile(init):
            raise FileNotFoundError(f"{REFERENCE_ENV}: {init} not found")
        spec = importlib.util.spec_from_file_location(name, init,
                                                      submodule_search_locations=[root])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.pretrain.model").build_model


def make_inputs(batch, image_size, seed, device="cpu"):
    """Two batches of random views; a seeded generator makes every process draw the same."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 3, image_size, image_size)
    return (torch.randn(shape, generator=gen).to(device),
            torch.randn(shape, generator=gen).to(device))


def training_layout(model):
    """channels_last weights, the layout pretraining uses on CUDA (RUN.CHANNELS_LAST's
    default), for every variant (the encoder, and the decoders where there are any)."""
    for part in (model.encoder, getattr(model, "decoders", None)):
        if part is not None:
            part.to(memory_format=torch.channels_last)
    return model


class BareStep:
    """Plain torchvision forward + backward of both views as one batch (no decoder, no loss)."""

    def __init__(self, arch):
        self.encoder = build_encoder(arch)
        self.autocast_dtype = None

    def parameters(self):
        return self.encoder.parameters()

    def to(self, device):
        self.encoder.to(device)
        return self

    def forward_backward(self, view1, view2):
        x = torch.cat([view1, view2])
        ctx = (torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        with ctx:
            out = self.encoder(x)
        out.float().sum().backward()
        return {}


def build_variant(name, arch, seed, decoder_options):
    """Model for one row; every row's encoder starts from the same seeded weights."""
    torch.manual_seed(seed)
    if name == "bare":
        return BareStep(arch)
    name = name.partition(ACCUM_SUFFIX)[0]
    build = build_model
    if name.startswith("ref:"):
        build, name = reference_build_model(), name[len("ref:"):]
    method, _, schedule = name.partition(":")
    if schedule:
        decoder_options = dict(decoder_options, loco_schedule=schedule)
    return build(method, arch, **decoder_options)


def _shape(t):
    return t.shape if isinstance(t, torch.Tensor) else t


class _FlopCount(TorchDispatchMode):
    """Counts, per aten op, the FLOPs of every op torch.utils.flop_counter has a formula for
    (convolutions forward and backward, matmuls: 2 per multiply-add), as they execute. A
    dispatch mode, unlike FlopCounterMode's module hooks, sees autograd.grad(inputs=...)."""

    def __init__(self):
        super().__init__()
        self.by_op = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            n = formula(*tree_map(_shape, args), **tree_map(_shape, kwargs),
                        out_val=tree_map(_shape, out))
            name = str(func._overloadpacket)
            self.by_op[name] = self.by_op.get(name, 0) + n
        return out


def step_flops(model, views, **kwargs):
    """FLOPs one `forward_backward(*views, **kwargs)` executes, per aten op: the work the
    schedule really does (every recompute and every extra input-gradient pass included), which
    a compute-bound device's step time follows. Leaves every .grad None."""
    zero_grads(model)
    counter = _FlopCount()
    with counter:
        model.forward_backward(*views, **kwargs)
    zero_grads(model)
    return counter.by_op


def zero_grads(model):
    for p in model.parameters():
        p.grad = None


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(models, views, rounds, warmup, device, grad_modes=("none",)):
    """Per gradient mode and model, the wall and process CPU seconds of each timed step, timing
    the models round-robin (one step each per round and mode) so that drift hits every model
    and mode alike. Returns wall seconds, process CPU seconds and minor page faults of this
    process, each as {mode: {name: [per step]}}."""
    wall = {mode: {name: [] for name in models} for mode in grad_modes}
    cpu = {mode: {name: [] for name in models} for mode in grad_modes}
    faults = {mode: {name: [] for name in models} for mode in grad_modes}
    for r in range(warmup + rounds):
        for mode in grad_modes:
            for name, model in models.items():
                prepare_grads(model, mode)
                _sync(device)
                start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start, start_cpu = time.perf_counter(), time.process_time()
                model.forward_backward(*views, **step_kwargs(name))
                _sync(device)
                if r >= warmup:
                    wall[mode][name].append(time.perf_counter() - start)
                    cpu[mode][name].append(time.process_time() - start_cpu)
                    faults[mode][name].append(
                        resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
    for model in models.values():
        zero_grads(model)
    return wall, cpu, faults


def paired_ratio(times, name, ref):
    """Median over rounds of time[name] / time[ref] within the same round: a slow round (a
    neighbour's burst on a shared machine) slows both and cancels."""
    return statistics.median(a / b for a, b in zip(times[name], times[ref]))


def _vm_hwm_bytes():
    """Peak resident set size of this process (Linux /proc), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _memory_worker(conn, lock, job):
    """Child process: once it holds `lock` (one measurement at a time, so that the next child's
    slow imports overlap this one's step, not its memory), build the model and inputs, run
    job["steps"] steps and send back the peak RSS."""
    try:
        torch.set_num_threads(job["threads"])
        with lock:
            model = build_variant(job["name"], job["arch"], job["seed"], job["decoder_options"])
            model.autocast_dtype = torch.bfloat16 if job["amp"] else None
            views = make_inputs(job["batch"], job["image_size"], job["seed"])
            for _ in range(job["steps"]):
                prepare_grads(model, job["grad_mode"])
                model.forward_backward(*views, **step_kwargs(job["name"]))
            conn.send(("ok", _vm_hwm_bytes()))
    except Exception as e:  # reported to the parent, which raises it with the variant's name
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _start_worker(ctx, lock, job):
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_worker, args=(child, lock, job))
    proc.start()
    child.close()
    return proc, parent


def _collect(job, proc, conn):
    try:
        status, value = conn.recv()
    except EOFError:
        status, value = "error", "worker died without a result"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"memory measurement of {job['name']} failed: {value} "
                           f"(exit code {proc.exitcode})")
    return value


def peak_memory_cpu(names, arch, seed, decoder_options, batch, image_size, amp=False,
                    grad_modes=("none",)):
    """Peak RSS of one step over a no-step baseline, per gradient mode and variant, each in its
    own process ("kept": the gradient buffers are allocated, zeroed, before the step).

    Returns ({mode: {name: bytes}}, baseline bytes). At most two workers live at a time: one
    measuring, the next one importing (importing torch and loco_det dominates a small run)."""
    ctx = multiprocessing.get_context("spawn")
    lock = ctx.Lock()
    common = dict(arch=arch, seed=seed, decoder_options=decoder_options, batch=batch,
                  image_size=image_size, amp=amp, threads=torch.get_num_threads())
    jobs = [dict(common, name="e2e", steps=0, grad_mode="none", label="baseline")]
    jobs += [dict(common, name=name, steps=1, grad_mode=mode, label=(mode, name))
             for mode in grad_modes for name in names]
    peaks, live = {}, []
    try:
        for job in jobs:
            live.append((job, _start_worker(ctx, lock, job)))
            if len(live) == 2:
                job0, (proc, conn) = live[0]
                peaks[job0["label"]] = _collect(job0, proc, conn)
                live.pop(0)
        while live:
            job0, (proc, conn) = live[0]
            peaks[job0["label"]] = _collect(job0, proc, conn)
            live.pop(0)
    finally:
        for _, (proc, _conn) in live:  # after a failure: leave no worker behind
            proc.terminate()
            proc.join()
    base = peaks.pop("baseline")
    return {mode: {name: peaks[(mode, name)] - base for name in names}
            for mode in grad_modes}, base


def peak_memory_cuda(models, views, device, grad_modes=("none",)):
    """max_memory_allocated during one step, over what was allocated before it with no
    gradient buffers ("kept": the zeroed buffers are allocated after that, before the step),
    per gradient mode and variant."""
    peaks = {mode: {} for mode in grad_modes}
    for mode in grad_modes:
        for name, model in models.items():
            for other in models.values():
                zero_grads(other)
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            prepare_grads(model, mode)
            model.forward_backward(*views, **step_kwargs(name))
            torch.cuda.synchronize(device)
            peaks[mode][name] = torch.cuda.max_memory_allocated(device) - before
    for model in models.values():
        zero_grads(model)
    return peaks


def run_benchmark(arch="resnet50", image_size=224, batch=16, rounds=3, warmup=1,
                  loco_schedules=LOCO_SCHEDULES, decoder_options=None, device="cpu", seed=0,
                  amp=False, measure_memory=True, threads=None, accumulate=False, accum_steps=1,
                  count_flops=True):
    """Time (and measure memory of) every variant; returns a dict the table printer reads.
    `count_flops`: also run one counted step per variant (`step_flops`; the same in both
    gradient modes).
    `threads`: intra-op threads here and in the memory processes (default: torch's).
    `accumulate`: also measure the "kept" gradient mode in the same rounds; its result (same
    shape) is under "kept". `accum_steps` > 1: "/accumN" rows (module docstring)."""
    if threads is not None:
        torch.set_num_threads(threads)
    decoder_options = dict(decoder_options or {})
    names = variants(loco_schedules, accum_steps)
    modes = GRAD_MODES if accumulate else GRAD_MODES[:1]
    cuda = torch.device(device).type == "cuda"
    if cuda:  # as pretraining runs on CUDA (engine.py): cuDNN picks the fastest kernels
        torch.backends.cudnn.benchmark = True
    models = {}
    for name in names:
        model = build_variant(name, arch, seed, decoder_options).to(device)
        model.autocast_dtype = torch.bfloat16 if amp else None
        if cuda:
            training_layout(model)
        models[name] = model
    views = make_inputs(batch, image_size, seed, device)
    if cuda:
        views = tuple(v.contiguous(memory_format=torch.channels_last) for v in views)
    head = {"arch": arch, "image_size": image_size, "batch": batch, "views": 2 * batch,
            "rounds": rounds, "warmup": warmup, "device": str(device), "amp": amp,
            "memory_format": "channels_last" if cuda else "contiguous",
            "threads": torch.get_num_threads(), "decoder_options": decoder_options,
            "accum_steps": accum_steps, "memory_method": None, "memory_baseline": None}
    wall, cpu, faults = time_interleaved(models, views, rounds, warmup, device, modes)
    flops = None
    if count_flops:
        flops = {name: sum(step_flops(model, views, **step_kwargs(name)).values())
                 for name, model in models.items()}
    results = {mode: dict(head, grad_mode=mode, memory=None, **_summarise(wall[mode], cpu[mode]),
                          page_faults={n: statistics.median(f) for n, f in faults[mode].items()},
                          flops=flops)
               for mode in modes}
    if measure_memory:
        if torch.device(device).type == "cuda":
            memory = peak_memory_cuda(models, views, device, modes)
            method, base = "torch.cuda.max_memory_allocated during one step", None
        else:
            del models
            memory, base = peak_memory_cpu(names, arch, seed, decoder_options, batch, image_size,
                                           amp, modes)
            method = ("peak RSS (VmHWM) of a process running one step minus that of one "
                      "building the same model and inputs")
        for mode in modes:
            results[mode].update(memory=memory[mode], memory_method=method,
                                 memory_baseline=base)
    result = results["none"]
    if accumulate:
        result["kept"] = results["kept"]
    return result


def _summarise(wall, cpu):
    """Medians and same-round ratios of one gradient mode's timings."""
    names = list(wall)
    return {"time_rounds": wall, "cpu_rounds": cpu,
            "time": {name: statistics.median(t) for name, t in wall.items()},
            "cpu_time": {name: statistics.median(t) for name, t in cpu.items()},
            "time_ratio": {name: paired_ratio(wall, name, "e2e") for name in names},
            "cpu_ratio": {name: paired_ratio(cpu, name, "e2e") for name in names},
            "e2e_over_bare": paired_ratio(wall, "e2e", "bare")}


def _ratio(a, b):
    return a / b if b else float("nan")


def _loco_rows(names):
    """This checkout's full-batch LoCo rows (no "ref:" or "/accumN" rows)."""
    return [n for n in names if n.startswith("loco") and ACCUM_SUFFIX not in n]


def target_checks(result):
    """(description, value, limit, met) for the efficiency targets. For the loco rows, the schedule
    with the best ratio is shown per target, then for each schedule whether it meets both."""
    rt, m = result["time_ratio"], result["memory"]
    locos = _loco_rows(rt)
    rm = {n: _ratio(m[n], m["e2e"]) for n in rt} if m else {}
    checks = []
    for row, column, limit in TARGETS:
        if row == "e2e/bare":
            value, label = result["e2e_over_bare"], "e2e step time / bare torchvision"
        elif row == "gim":
            if not m:
                continue
            value, label = rm["gim"], "gim peak memory / e2e"
        else:
            table = {n: (rt if column == "time" else rm)[n] for n in locos} if (
                column == "time" or m) else {}
            if not table:
                continue
            name = min(table, key=table.get)
            what = "step time" if column == "time" else "peak memory"
            value, label = table[name], f"{name} {what} / e2e"
        checks.append((label, value, limit, value <= limit))
    if m:
        for name in locos:
            both = rt[name] <= LOCO_LIMITS["time"] and rm[name] <= LOCO_LIMITS["memory"]
            checks.append((f"{name} meets both loco targets", float(both), 1.0, both))
    return checks


def format_benchmark(result):
    """The side-by-side table: step time (wall and process CPU), ratios against e2e (median of
    per-round ratios), peak memory and its ratio, e2e against bare torchvision, the targets."""
    t, cpu, m = result["time"], result["cpu_time"], result["memory"]
    rt, rc = result["time_ratio"], result["cpu_ratio"]
    opts = result["decoder_options"]
    lines = [f"bench_pretrain: {result['arch']}, {result['image_size']} px, {result['batch']} "
             f"images ({result['views']} views), device {result['device']}, "
             f"{result['threads']} threads, amp {result['amp']}, decoder "
             f"conv_blocks={opts.get('conv_blocks', 0)} mlp_layers={opts.get('mlp_layers', 2)}",
             "gradients before each step: " + (
                 "kept and zeroed in place (zero_grad(set_to_none=False)): every step "
                 "accumulates into existing .grad" if result.get("grad_mode") == "kept" else
                 "None (zero_grad(set_to_none=True))"),
             f"time: {result['rounds']} interleaved rounds after {result['warmup']} warm-up "
             "round(s); step s = median wall time, cpu s = median process CPU time; ratios = "
             "median over rounds of the same-round ratio"]
    if m is not None:
        lines.append(f"memory: {result['memory_method']}")
    w = max(18, max(map(len, t)) + 2)
    header = (f"{'variant':<{w}}{'step s':>8}{'img/s':>7}{'time/e2e':>9}{'cpu s':>8}"
              f"{'cpu/e2e':>8}")
    if m is not None:
        header += f"{'peak MiB':>9}{'mem/e2e':>8}"
    fl = result.get("flops")
    if fl is not None:
        lines.append("flops: one counted step per variant (torch.utils.flop_counter's formulas: "
                     "convolutions forward and backward and matmuls, 2 per multiply-add; "
                     "elementwise ops not counted)")
        header += f"{'GFLOP':>8}{'flop/e2e':>9}"
    lines += ["", header, "-" * len(header)]
    for name in t:
        row = (f"{name:<{w}}{t[name]:>8.3f}{result['batch'] / t[name]:>7.2f}{rt[name]:>9.3f}"
               f"{cpu[name]:>8.3f}{rc[name]:>8.3f}")
        if m is not None:
            row += f"{m[name] / 2**20:>9.0f}{_ratio(m[name], m['e2e']):>8.3f}"
        if fl is not None:
            row += f"{fl[name] / 1e9:>8.4g}{_ratio(fl[name], fl['e2e']):>9.3f}"
        lines.append(row)
    accum = [n for n in t if ACCUM_SUFFIX in n]
    if accum:
        lines += ["", f"exact gradient accumulation ({result['accum_steps']} micro-batches) against "
                      "one full-batch step of the same variant (time: median of same-round "
                      "ratios):"]
        for name in accum:
            plain = name.partition(ACCUM_SUFFIX)[0]
            row = (f"  {plain:<22} time x{paired_ratio(result['time_rounds'], name, plain):.3f}"
                   f"  cpu x{paired_ratio(result['cpu_rounds'], name, plain):.3f}")
            if m is not None:
                row += f"  peak memory x{_ratio(m[name], m[plain]):.3f}"
            lines.append(row)
    if result.get("page_faults"):
        lines += ["", "minor page faults of this process per step (median, thousands; on CPU each "
                      "is kernel time inside the step, fresh memory from the allocator):",
                  "  " + ", ".join(f"{n} {f / 1e3:.0f}" for n, f in result["page_faults"].items())]
    lines += ["", f"e2e / bare torchvision step time: {result['e2e_over_bare']:.3f}",
              "", "efficiency targets (step time and peak memory vs e2e; defined for resnet50, "
              "224 px, 16 images):"]
    for label, value, limit, met in target_checks(result):
        if label.endswith("both loco targets"):
            lines.append(f"  {label:<48} {'yes' if met else 'no'}")
        else:
            lines.append(f"  {label:<48} {value:6.3f} <= {limit:.2f}  "
                         f"{'met' if met else 'NOT met'}")
    locos = _loco_rows(t)
    if fl is not None and locos:
        lines += ["", "step FLOPs / e2e: the step-time ratio of a device whose step time follows "
                      "its FLOPs (time below it comes from e2e's other costs, e.g. page faults):"]
        lines += [f"  {n:<48} {_ratio(fl[n], fl['e2e']):6.3f}" for n in locos]
    return "\n".join(lines)


# ---- fvcore cost accounting ------------------------------------------------------------------

def _quiet(analysis):
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis


def _stage_counts(by_module):
    """Per-stage totals from fvcore's by_module(), the stem counted in S1."""
    stem = sum(by_module.get(k, 0) for k in ("conv1", "bn1", "relu", "maxpool"))
    return stem, [stem + by_module.get("layer1", 0)] + [by_module.get(f"layer{s + 1}", 0)
                                                         for s in range(1, NUM_STAGES)]


def block_output_counts(encoder, x):
    """Sum of residual-block output sizes per stage: the counting that reproduces the paper's
    activation table (for ResNet-50 exactly 8 : 5.33 : 4 : 1)."""
    counts = [0] * NUM_STAGES
    hooks = []
    for s in range(NUM_STAGES):
        for block in getattr(encoder, f"layer{s + 1}"):
            hooks.append(block.register_forward_hook(
                lambda mod, inp, out, s=s: counts.__setitem__(s, counts[s] + out[0].numel())))
    try:
        with torch.no_grad():
            encoder(x)
    finally:
        for h in hooks:
            h.remove()
    return counts


def analyze(arch="resnet50", image_size=224, decoder_options=None):
    """fvcore FLOPs and activations per stage of the encoder, and what each method's decoders
    add (per image). Returns a dict the printer reads."""
    from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis

    decoder_options = dict(decoder_options or {})
    encoder = build_encoder(arch).eval()
    x = torch.zeros(1, 3, image_size, image_size)
    flops = _quiet(FlopCountAnalysis(encoder, x))
    acts = _quiet(ActivationCountAnalysis(encoder, x))
    stem_flops, stage_flops = _stage_counts(flops.by_module())
    stem_acts, stage_acts = _stage_counts(acts.by_module())
    blocks = block_output_counts(encoder, x)
    enc_params = sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("fc."))
    enc_flops = sum(stage_flops)

    # Stage output shapes, to cost each decoder on its real input.
    shapes, h = [], x
    with torch.no_grad():
        for s in range(NUM_STAGES):
            h = run_stage(encoder, s, h)
            shapes.append(tuple(h.shape))
    methods = {}
    for method in ("e2e", "gim", "loco"):
        model = build_model(method, arch, **decoder_options).eval()
        params = flop = 0
        for unit, decoder in zip(model.units, model.decoders):
            params += sum(p.numel() for p in decoder.parameters())
            flop += _quiet(FlopCountAnalysis(decoder, torch.zeros(shapes[unit[-1]]))).total()
        methods[method] = {"units": len(model.units), "params": params, "flops": flop}
    return {"arch": arch, "image_size": image_size, "decoder_options": decoder_options,
            "stage_flops": stage_flops, "stage_acts": stage_acts, "stem_flops": stem_flops,
            "stem_acts": stem_acts, "block_outputs": blocks, "encoder_params": enc_params,
            "encoder_flops": enc_flops, "channels": stage_channels(encoder), "methods": methods}


def _pct(part, total):
    return 100.0 * part / total if total else float("nan")


def format_analysis(a):
    fl, ac, bo = a["stage_flops"], a["stage_acts"], a["block_outputs"]
    paper = a["arch"] == "resnet50" and a["image_size"] == 224
    opts = a["decoder_options"]
    lines = [f"bench_pretrain --analyze: {a['arch']}, {a['image_size']} px, per image",
             "fvcore FlopCountAnalysis / ActivationCountAnalysis of the torchvision encoder (one "
             "multiply-add = one flop, fvcore's convention);",
             "fc excluded; the stem (conv1, bn1, relu, maxpool) is counted in S1 with res2.", ""]
    head = (f"{'stage':<14}{'GFLOPs':>8}{'FLOPs %':>9}{'paper %':>9}{'act (M)':>9}{'act %':>8}"
            f"{'blockout %':>11}{'paper %':>9}")
    lines += [head, "-" * len(head)]
    for s in range(NUM_STAGES):
        paper_flops = f"{PAPER_FLOP_SHARE[s]:.2f}" if paper else "-"
        paper_acts = f"{PAPER_ACTIVATION_SHARE[s]:.2f}" if paper else "-"
        lines.append(
            f"{STAGE_LABELS[s]:<14}{fl[s] / 1e9:>8.3f}{_pct(fl[s], sum(fl)):>9.2f}"
            f"{paper_flops:>9}{ac[s] / 1e6:>9.3f}{_pct(ac[s], sum(ac)):>8.2f}"
            f"{_pct(bo[s], sum(bo)):>11.2f}{paper_acts:>9}")
    lines += [f"{'total':<14}{sum(fl) / 1e9:>8.3f}{'':>18}{sum(ac) / 1e6:>9.3f}", "",
              f"stem alone: {_pct(a['stem_flops'], sum(fl)):.2f} % of FLOPs, "
              f"{_pct(a['stem_acts'], sum(ac)):.2f} % of activations.",
              "act % = fvcore activation count (every conv output); blockout % = only the "
              "output of each residual block, the counting the paper's table matches.",
              "paper % columns: the LoCo paper's ResNet-50 table (NeurIPS 2020)"
              + ("" if paper else "; shown only for resnet50 at 224 px") + ".", ""]
    lines.append(f"decoders (conv_blocks={opts.get('conv_blocks', 0)}, "
                 f"mlp_layers={opts.get('mlp_layers', 2)}, proj_dim={opts.get('proj_dim', 128)}); "
                 f"encoder without fc: {a['encoder_params'] / 1e6:.2f} M params, "
                 f"{a['encoder_flops'] / 1e9:.3f} GFLOPs")
    head = (f"{'method':<8}{'units':>6}{'params (M)':>12}{'% of enc':>10}{'GFLOPs':>9}"
            f"{'% of enc':>10}")
    lines += [head, "-" * len(head)]
    for method, d in a["methods"].items():
        lines.append(f"{method:<8}{d['units']:>6}{d['params'] / 1e6:>12.3f}"
                     f"{_pct(d['params'], a['encoder_params']):>10.2f}{d['flops'] / 1e9:>9.4f}"
                     f"{_pct(d['flops'], a['encoder_flops']):>10.2f}")
    return "\n".join(lines)


__all__ = ["analyze", "format_analysis", "run_benchmark", "format_benchmark", "variants",
           "make_inputs", "time_interleaved", "target_checks", "prepare_grads", "step_kwargs"]
