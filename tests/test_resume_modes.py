"""Exact resume beyond one process without accumulation: under torchrun (2 gloo processes)
and with OPTIM.ACCUM_STEPS=2, a pretraining stopped mid-epoch after step 3 and resumed from its
checkpoint ends bit-identical to the same run in one go (weights, optimizer state, losses).

Stopping uses the engine's stop_after_steps (as if the process were killed right after that
step's checkpoint); the resume restores everything from the checkpoint file, under torchrun in
new processes as after a kill. This file is also the torchrun worker of the 2-process test
(run as a script)."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 16 images, global batch 8: 2 steps per epoch, 4 steps; a checkpoint after every step.
TINY = ["SEED=123", "MODEL.METHOD=loco", "MODEL.ARCH=resnet18", "DATA.IMAGE_SIZE=32",
        "OPTIM.BATCH_SIZE=8", "OPTIM.EPOCHS=2", "OPTIM.WARMUP_EPOCHS=1", "DATA.NUM_WORKERS=0",
        "RUN.LOG_PERIOD=1", "RUN.CHECKPOINT_PERIOD=1"]
STOP = 3   # mid-epoch 2


def cfg(data_root, accum):
    from loco_det.pretrain.config import load_config

    return load_config(None, [f"DATA.ROOT={data_root}", *TINY, f"OPTIM.ACCUM_STEPS={accum}"])


def straight_and_stopped(data_root, out_root, accum):
    """The run in one go (out_root/straight), and the same run stopped after STOP
    (out_root/resumed); every rank takes part in both."""
    from loco_det.pretrain.engine import train

    c = cfg(data_root, accum)
    train(c, os.path.join(out_root, "straight"))
    assert train(c, os.path.join(out_root, "resumed"), stop_after_steps=STOP) is None


def resume(data_root, out_root, accum):
    from loco_det.pretrain.engine import train

    train(cfg(data_root, accum), os.path.join(out_root, "resumed"), resume=True)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_resumed_equals_straight(out_root, world):
    a = load(os.path.join(out_root, "straight", "checkpoint_last.pth"))
    b = load(os.path.join(out_root, "resumed", "checkpoint_last.pth"))
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (4, 2)
    for part in ("encoder", "decoders"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["optimizer"]["state"], "no optimizer state"
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][k][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]

    def records(run):
        with open(os.path.join(out_root, run, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(l).items() if k == "step" or k == "lr"
                     or k.startswith("loss/")} for l in f]

    assert records("straight") == records("resumed")
    info = json.load(open(os.path.join(out_root, "resumed", "run_info.json")))
    assert info["world_size"] == world and info["resumes"][0]["from_step"] == STOP
    summary = json.load(open(os.path.join(out_root, "resumed", "summary.json")))
    assert summary["world_size"] == world and len(set(summary["param_sha256"])) == 1


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    from test_pretrain_data import make_folder
    return make_folder(tmp_path_factory.mktemp("resume_data") / "train", n_per_class=8)


def test_accumulation_resume_is_bit_identical(data16, tmp_path, one_torch_thread):
    straight_and_stopped(str(data16), str(tmp_path), accum=2)
    resume(str(data16), str(tmp_path), accum=2)
    assert_resumed_equals_straight(str(tmp_path), world=1)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_torchrun_resume_is_bit_identical(data16, tmp_path, accum):
    """2 gloo processes; the rendezvous port is the OS's choice at bind time (localhost:0)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"),
                                         env.get("PYTHONPATH", "")])
    for part in ("first", "resume"):   # the resume in new processes, as after a kill
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
               os.path.abspath(__file__), part, str(data16), str(tmp_path), str(accum)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert_resumed_equals_straight(str(tmp_path), world=2)


if __name__ == "__main__":   # torchrun worker: first|resume, data root, output root, accum steps
    import torch.distributed as dist

    dist.init_process_group("gloo")   # the engine joins it and leaves it open between runs
    torch.set_num_threads(1)
    part = {"first": straight_and_stopped, "resume": resume}[sys.argv[1]]
    part(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    dist.destroy_process_group()
