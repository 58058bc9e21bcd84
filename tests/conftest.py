"""Shared test fixtures.

`synth_root` generates one small embedded dataset per test session (a few seconds), so every
test that needs real files on disk in the docs/formats.md layout uses the same data instead of
each writing its own. Treat it as read-only: other tests share it.
"""
import logging
import os
import pathlib
import signal

import pytest

# The suite interrupts the tools it runs with SIGINT. A shell without job control that starts it
# in the background (`make test &`, nohup, some CI runners) hands every process SIGINT ignored;
# exec keeps that, and Python then never raises KeyboardInterrupt, so the tools would run to the
# end. A handler (not SIG_IGN) in this process is reset to the default in every process it
# starts. pytest-xdist's workers import this file too.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    """The tests marked slow (minutes each) run first: pytest-xdist hands tests out one at a
    time in this order (--maxschedchunk=1, pyproject.toml), so the long ones start at once on
    both workers and the short ones fill in around them, instead of one long test running alone
    at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# Small enough to generate in about a second, large enough for a few Mask R-CNN iterations and a
# readout with every category present. Tests may rely on these values via SYNTH_* below.
SYNTH_SEED = 0
SYNTH_TRAIN = 24
SYNTH_VAL = 8
SYNTH_HEIGHT = 96
SYNTH_WIDTH = 128


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """pathlib.Path of a generated embedded dataset: `<tmp>/datasets/loco_synth`, so that
    `DETECTRON2_DATASETS=<tmp>/datasets` finds it where loco_det's registration looks.
    24 train / 8 val images of 96x128 px, seed 0. Read-only: shared by the whole session."""
    from loco_det import synthetic

    root = tmp_path_factory.mktemp("synth") / "datasets" / "loco_synth"
    synthetic.generate(str(root), seed=SYNTH_SEED, n_train=SYNTH_TRAIN, n_val=SYNTH_VAL,
                       height=SYNTH_HEIGHT, width=SYNTH_WIDTH)
    return root


@pytest.fixture
def synth_env(synth_root, monkeypatch):
    """Points DETECTRON2_DATASETS at the session's embedded dataset (for this test only) and
    (re)registers loco_det's Detectron2 datasets so that `loco_synth_*` resolve to it.
    Returns the same path as `synth_root`. Subprocesses started by the test inherit the env."""
    monkeypatch.setenv("DETECTRON2_DATASETS", os.fspath(synth_root.parent))
    from loco_det.detection import datasets

    datasets.register_all()
    return pathlib.Path(synth_root)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of small convolutions: with several test processes sharing a few cores,
    torch's intra-op threads mostly wait on each other (10x slower here). Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def restore_loggers():
    """Tests that run a tool's main() in this process run Detectron2's setup_logger, which stops
    these loggers from propagating (a later test's caplog would see nothing) and adds console
    and file handlers; put them back as they were after every test."""
    names = ("loco_det", "detectron2", "fvcore")
    saved = {n: (logging.getLogger(n).propagate, list(logging.getLogger(n).handlers),
                 logging.getLogger(n).level) for n in names}
    yield
    for n, (propagate, handlers, level) in saved.items():
        logger = logging.getLogger(n)
        for h in logger.handlers:
            if h not in handlers:
                h.close()
        logger.handlers[:] = handlers
        logger.propagate, logger.level = propagate, level


@pytest.fixture(scope="session")
def pkl_r18(tmp_path_factory):
    """pathlib.Path of a Detectron2 .pkl converted by the project's converter from a loco_det
    checkpoint of a seeded (torch seed 0) random torchvision ResNet-18 (method "loco").
    Read-only: shared by the whole session."""
    import torch
    import torchvision

    from loco_det.weights import convert

    d = tmp_path_factory.mktemp("pkl_r18")
    torch.manual_seed(0)
    ckpt = d / "checkpoint_last.pth"
    torch.save({"encoder": torchvision.models.resnet18().state_dict(), "method": "loco",
                "arch": "resnet18"}, ckpt)
    convert.convert(str(ckpt), str(d / "loco_r18.pkl"))
    return d / "loco_r18.pkl"
