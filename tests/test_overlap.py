"""Gradient all-reduce overlapping the backward: the model reports every parameter's gradient
final exactly once per step, and only once it is final; 2 gloo processes (torchrun) train to
the same weights as one process on the same global batch; the reducer's counters and timeline
show all-reduces launched while the backward was still running.

This file is also the torchrun worker of the 2-process test (run as a script)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from loco_det.pretrain import engine
from loco_det.pretrain.config import load_config
from loco_det.pretrain.model import LOCO_SCHEDULES, PretrainModel, build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ResNet-18, 32 px, 16 images, global batch 8: 2 steps. Plain SGD with a large rate, no
# warm-up: the weights move far enough from their start for the update to be compared.
TINY = ["SEED=123", "MODEL.ARCH=resnet18", "DATA.IMAGE_SIZE=32", "OPTIM.BATCH_SIZE=8",
        "OPTIM.EPOCHS=1", "OPTIM.WARMUP_EPOCHS=0", "OPTIM.NAME=sgd", "OPTIM.BASE_LR=3.0",
        "DATA.NUM_WORKERS=0", "RUN.LOG_PERIOD=1"]
# (method, schedule, accumulation steps): the plain path (e2e: one backward per unit), the
# default LoCo schedule (shared segments fused, the stem recomputed), and with accumulation
# (hook calls only in the last micro-batch's replay) LoCo's recompute-and-fuse schedule. Two
# processes cost ~10 s of imports alone; every other rule and schedule reports its gradients
# under the same contract, checked above on one process.
DIST_RUNS = [("loco", "fused_stem", 1), ("e2e", "fused", 1), ("loco", "hybrid", 2)]


# ----------------------------------------------------------------------------- the hook
RULE_CASES = ([("e2e", "fused"), ("gim", "fused"), ("supervised", "fused")]
              + [("loco", s) for s in LOCO_SCHEDULES]
              + [("loco_overlap2", "hybrid_stem"), ("loco_blocks", "recompute"),
                 ("loco_blocks", "fused_stem")])


@pytest.mark.parametrize("method,schedule", RULE_CASES)
def test_every_gradient_reported_once_and_only_when_final(method, schedule, one_torch_thread):
    """Every parameter with a gradient is reported exactly once, its `.grad` at that moment is
    its final one (nothing later in the step adds to it), and nothing else is reported but
    parameters without gradient; only the encoder's unused `fc` has none. Two steps, the
    second with the first's gradients kept (zero_grad(set_to_none=False))."""
    torch.manual_seed(0)
    model = build_model(method, "resnet18", loco_schedule=schedule,
                        num_classes=3 if method == "supervised" else None)
    names = {id(p): n for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    v1, v2 = (torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2))
    labels = torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        reported = []
        model.grads_ready_hook = lambda params: reported.extend(
            (names[id(p)], None if p.grad is None else p.grad.clone()) for p in params)
        model.forward_backward(v1, v2, labels)
        order = [n for n, _ in reported]
        assert len(order) == len(set(order)), [n for n in order if order.count(n) > 1]
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert set(order) >= with_grad
        for name, grad in reported:
            p = model.get_parameter(name)
            if grad is None:
                assert p.grad is None, f"{name} got a gradient after being reported"
            else:
                assert torch.equal(grad, p.grad), f"{name} changed after being reported final"
        unreported = {n for n, p in model.named_parameters() if p.requires_grad} - set(order)
        assert unreported == {"encoder.fc.weight", "encoder.fc.bias"}
        assert all(model.get_parameter(n).grad is None for n in unreported)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()


@pytest.mark.parametrize("method,schedule", [("e2e", "fused"), ("gim", "fused"),
                                             ("loco", "fused_stem"), ("loco", "hybrid")])
def test_accumulated_step_reports_once_in_the_last_replay(method, schedule, one_torch_thread):
    """With gradient accumulation every micro-batch's replay adds into `.grad`: each parameter
    is reported once per step, in the last replay, with its final (accumulated) gradient."""
    torch.manual_seed(0)
    model = build_model(method, "resnet18", loco_schedule=schedule)
    names = {id(p): n for n, p in model.named_parameters()}
    reported = []
    model.grads_ready_hook = lambda params: reported.extend(
        (names[id(p)], p.grad.clone(), model.last_micro_batch) for p in params)
    v = torch.randn(4, 3, 32, 32)
    model.forward_backward(v, v.flip(-1), accum_steps=2)
    order = [n for n, _, _ in reported]
    assert len(order) == len(set(order)) and all(last for _, _, last in reported)
    assert set(order) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad, _ in reported:
        assert torch.equal(grad, model.get_parameter(name).grad), name


def test_loco_reports_s1_before_the_upper_units_run(one_torch_thread):
    """LoCo's S1 (stem + layer1) and unit 1's decoder are final after unit 1: they are reported
    before unit 2's decoder, i.e. before units 2 and 3 run their forward and backward."""
    model = build_model("loco", "resnet18")
    names = {id(p): n for n, p in model.named_parameters()}
    order = []
    model.grads_ready_hook = lambda params: order.extend(names[id(p)] for p in params)
    v = torch.randn(4, 3, 32, 32)
    model.forward_backward(v, v.flip(-1))
    first_upper = order.index("decoders.1.mlp.0.weight")
    assert {"encoder.conv1.weight", "encoder.layer1.1.conv2.weight",
            "decoders.0.mlp.0.weight"} <= set(order[:first_upper])
    assert not any(n.startswith(("encoder.layer3", "encoder.layer4")) for n in order[:first_upper])


# ----------------------------------------------------------------------------- the reducer
@pytest.fixture
def gloo_world_of_one(tmp_path):
    """A one-process gloo group in this process (removed afterwards: other tests must not see
    it)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_reducer_buckets_divides_and_refuses_a_broken_contract(gloo_world_of_one):
    """On one rank the all-reduce is the identity, so with world_size=2 every reported gradient
    comes back halved, in as many buckets as the byte limit asks for; a parameter reported twice,
    or left with a gradient it never reported, is an error."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    w, b, w2, b2 = model.parameters()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    want = {id(p): p.grad / 2 for p in model.parameters()}
    reducer = engine.GradientReducer(model, world_size=2, bucket_bytes=13 * 4)
    reducer.begin()
    reducer([w, b])        # 12 + 3 floats: two buckets under a 13-float limit
    reducer([w2, b2])
    stats = reducer.wait()
    assert [e["first"] for e in reducer.timeline] == ["0.weight", "0.bias", "1.weight"]
    assert stats["buckets"] == 3 and stats["early"] == 2
    for p in model.parameters():
        torch.testing.assert_close(p.grad, want[id(p)], rtol=0, atol=0)
    reducer.begin()
    reducer([w, b])
    with pytest.raises(RuntimeError, match="0.bias reported twice"):
        reducer([b])
    reducer([w2, b2])
    reducer.wait()  # finishes what was launched
    reducer.begin()
    reducer([w, b, w2])
    with pytest.raises(RuntimeError, match="never reported final, so not averaged: 1.bias"):
        reducer.wait()
    reducer.begin()
    reducer([w])
    with pytest.raises(RuntimeError, match="never waited for"):
        reducer.begin()
    reducer([b, w2, b2])
    reducer.wait()


# ----------------------------------------------------------------------------- 2 processes
def fixed_bn(model):
    """Every BatchNorm normalises with its running statistics (eval mode) and stays so when
    the loop calls model.train(): what a layer computes no longer depends on the batch."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.train = lambda mode=True, m=m: m
    return model


def run_cfg(root, method, schedule, accum=1):
    return load_config(None, [f"DATA.ROOT={root}", f"MODEL.METHOD={method}",
                              f"MODEL.LOCO_SCHEDULE={schedule}", *TINY]
                       + ([f"OPTIM.ACCUM_STEPS={accum}"] if accum > 1 else []))


def run_name(method, schedule, accum):
    return f"{method}_{schedule}_x{accum}"


def worker(out_root, data_root):
    """torchrun worker: every DIST_RUNS run in one process group, BN fixed."""
    dist.init_process_group("gloo")  # the engine joins it and leaves it open between runs
    torch.set_num_threads(1)
    setup = engine.setup_model
    engine.setup_model = lambda *a, **k: fixed_bn(setup(*a, **k))
    for run in DIST_RUNS:
        engine.train(run_cfg(data_root, *run), os.path.join(out_root, run_name(*run)))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    from test_pretrain_data import make_folder
    return make_folder(tmp_path_factory.mktemp("overlap_data") / "train", n_per_class=8)


@pytest.fixture(scope="module")
def two_process_runs(data16, tmp_path_factory):
    out = tmp_path_factory.mktemp("overlap_2proc")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"),
                                         env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
           os.path.abspath(__file__), str(out), str(data16)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("method,schedule,accum", DIST_RUNS)
def test_two_gloo_processes_equal_one_process(method, schedule, accum, two_process_runs, data16,
                                              tmp_path, monkeypatch, one_torch_thread):
    """Same global batches (the sampler gives rank r a contiguous slice of each), same
    augmentations (seeded per image), NT-Xent over the gathered global batch: the averaged
    gradient is the one-process gradient, up to float summation order. BatchNorm is the one
    thing that would differ, legitimately: in training mode each rank normalises with its own
    half batch's statistics (MODEL.SYNC_BN is CUDA-only). With BN in fixed-statistics mode
    (fixed_bn) every layer's output depends on its own image only, so the weights after two
    SGD steps must agree, on both ranks and with one process (which does not accumulate: with
    BN fixed, accumulation is exact too)."""
    initial = {}

    def setup(*a, **k):
        model = fixed_bn(setup_model(*a, **k))
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    setup_model = engine.setup_model
    monkeypatch.setattr(engine, "setup_model", setup)
    one = engine.train(run_cfg(data16, method, schedule), str(tmp_path))
    assert one["steps"] == 2 and "comm_last_step" not in one  # one process: nothing to reduce
    run = two_process_runs / run_name(method, schedule, accum)
    two = json.loads((run / "summary.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == 2
    assert two["param_sha256"][0] == two["param_sha256"][1]
    a, b = load(tmp_path / "checkpoint_last.pth"), load(run / "checkpoint_last.pth")
    moved = 0
    for part, prefix in (("encoder", "encoder."), ("decoders", "decoders.")):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            w1, w2, w0 = a[part][key], b[part][key], initial[prefix + key]
            if not w1.is_floating_point():
                assert torch.equal(w1, w2), key
                continue
            step = (w1 - w0).abs().max().item()
            moved += step > 0
            # float summation order only: up to ~1.5e-4 of the step, depending on the pixels
            # (a missing average or gather would be of the order of the step itself)
            torch.testing.assert_close(w2 - w0, w1 - w0, rtol=0, atol=3e-4 * step + 1e-7,
                                       msg=lambda m: f"{key}: {m}")
    assert moved > 50  # the comparison is of real updates


def test_all_reduces_run_during_the_backward(two_process_runs):
    """The metrics and the last step's timeline on rank 0: in LoCo, S1's all-reduce is launched
    before unit 3's decoder reports (which follows unit 3's forward and loss backward); in e2e
    the encoder is one segment, final only when the one backward ends."""
    trained = [n for n, _ in build_model("loco", "resnet18").named_parameters()
               if not n.startswith("encoder.fc.")]
    for run in [r for r in DIST_RUNS if r[0] == "loco"]:
        loco = json.loads((two_process_runs / run_name(*run) / "summary.json").read_text())
        timeline = loco["comm_last_step"]["buckets"]
        firsts = [b["first"] for b in timeline]
        s1, unit3 = firsts.index("encoder.conv1.weight"), firsts.index("decoders.2.mlp.0.weight")
        assert s1 < unit3
        assert timeline[s1]["launch_s"] < timeline[unit3]["launch_s"] \
            < loco["comm_last_step"]["backward_end_s"]
        assert sum(b["params"] for b in timeline) == len(trained)  # each reduced once
        records = [json.loads(line) for line in (two_process_runs / run_name(*run)
                                                 / "metrics.jsonl").read_text().splitlines()]
        for r in records:
            assert r["comm/buckets"] == len(timeline) and r["comm/early"] >= 5
            assert 0 <= r["comm/done_at_wait"] <= r["comm/buckets"] and r["comm/wait_s"] >= 0
    e2e = json.loads((two_process_runs / "e2e_fused_x1" / "summary.json").read_text())
    records = [json.loads(line) for line in
               (two_process_runs / "e2e_fused_x1" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["comm/early"] < r["comm/buckets"] for r in records)
    assert e2e["comm_last_step"]["buckets"][-1]["first"].startswith("encoder.")


if __name__ == "__main__":
    worker(*sys.argv[1:])
