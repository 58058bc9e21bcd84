"""Exact gradient accumulation (OPTIM.ACCUM_STEPS, GradCache): with BatchNorm on fixed
statistics, ACCUM_STEPS micro-batches give the full batch's gradients and losses for every rule
and schedule; with batch statistics, BN running statistics move once per micro-batch; a batch
that does not split is one clear error; one engine step with ACCUM_STEPS=2 runs end to end."""
import copy

import pytest
import torch
import yaml

from loco_det.pretrain.config import load_config
from loco_det.pretrain.engine import train
from loco_det.pretrain.model import build_model
from loco_det.utils import ConfigError

from test_pretrain_data import make_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def views(batch=8, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=gen),
            torch.randn(batch, 3, size, size, generator=gen))


def fixed_bn_model(method, schedule="fused", labels=None, **kwargs):
    """A resnet18 model whose BN layers use (and keep) running statistics, moved away from
    their initial values by one training step so that fixed-statistics BN is not trivial."""
    torch.manual_seed(0)
    model = build_model(method, "resnet18", loco_schedule=schedule, **kwargs)
    model.forward_backward(*views(seed=1), labels)
    return model.eval()


def step(model, accum_steps, labels=None):
    model.zero_grad(set_to_none=True)
    losses = model.forward_backward(*views(), labels, accum_steps=accum_steps)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def assert_same_grads(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        scale = b[name].abs().max().item() + 1e-12
        torch.testing.assert_close(a[name] / scale, b[name] / scale, rtol=0, atol=2e-5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method,schedule", [("e2e", "fused"), ("gim", "fused"),
                                             ("loco", "fused"), ("loco", "recompute"),
                                             ("loco", "hybrid_stem")])
def test_accumulated_gradients_equal_full_batch(method, schedule):
    """4 micro-batches of 2 images = one batch of 8: every encoder and decoder gradient and
    every unit's loss (each loss sees all 16 views' negatives)."""
    model = fixed_bn_model(method, schedule)
    full_losses, full = step(model, 1)
    accum_losses, accum = step(model, 4)
    assert accum_losses.keys() == full_losses.keys() == set(model.unit_names)
    for unit in full_losses:
        assert accum_losses[unit] == pytest.approx(full_losses[unit], rel=1e-6)
    assert_same_grads(accum, full)
    assert any(n.startswith("decoders.") for n in full) and any(n.startswith("encoder.")
                                                                for n in full)


@pytest.mark.parametrize("supervised_views", [1, 2])
def test_accumulated_supervised_equals_full_batch(supervised_views):
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    model = fixed_bn_model("supervised", labels=labels, num_classes=3,
                           supervised_views=supervised_views)
    full_losses, full = step(model, 1, labels)
    accum_losses, accum = step(model, 2, labels)
    assert accum_losses["unit1"] == pytest.approx(full_losses["unit1"], rel=1e-6)
    assert_same_grads(accum, full)


def test_accumulated_block_rule_equals_full_batch():
    model = fixed_bn_model("loco_blocks", "fused_stem")
    full_losses, full = step(model, 1)
    accum_losses, accum = step(model, 2)
    assert accum_losses == pytest.approx(full_losses, rel=1e-6)
    assert_same_grads(accum, full)


def test_accumulated_gradients_add_to_kept_ones():
    """Like a plain step, an accumulated step adds into existing .grad."""
    model = fixed_bn_model("loco", "fused_stem")
    _, once = step(model, 2)
    model.forward_backward(*views(), accum_steps=2)
    for name, p in model.named_parameters():
        if name in once:
            torch.testing.assert_close(p.grad, 2 * once[name])


def test_batch_statistics_per_micro_batch():
    """In train mode BN normalises each micro-batch with its own statistics, and running
    statistics move once per micro-batch (the embedding pass leaves them alone): after one
    accumulated step the encoder's BN buffers are those of plain forwards of the micro-batches,
    in order, each of its slice of view1 followed by the same slice of view2."""
    torch.manual_seed(0)
    model = build_model("loco", "resnet18", loco_schedule="hybrid_stem")
    plain = copy.deepcopy(model.encoder)
    v1, v2 = views()
    model.forward_backward(v1, v2, accum_steps=2)
    with torch.no_grad():
        for part in (slice(0, 4), slice(4, 8)):
            plain(torch.cat([v1[part], v2[part]]))
    for (name, a), b in zip(model.encoder.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_only_the_last_micro_batch_is_final(monkeypatch):
    """`last_micro_batch` (checked before announcing final gradients) is True only during the
    last replay, and again after the step."""
    model = build_model("gim", "resnet18")
    seen = []
    replay = model._step

    def spy(x, labels, cached=None):
        seen.append((cached is not None, model.last_micro_batch, x.shape[0]))
        return replay(x, labels, cached)
    monkeypatch.setattr(model, "_step", spy)
    model.forward_backward(*views(), accum_steps=4)
    assert seen == [(True, False, 4), (True, False, 4), (True, False, 4), (True, True, 4)]
    assert model.last_micro_batch
    seen.clear()
    model.forward_backward(*views())
    assert seen == [(False, True, 16)]


def test_indivisible_batch_is_an_error_naming_the_numbers():
    model = build_model("e2e", "resnet18")
    with pytest.raises(ValueError, match=r"batch of 8 images does not split into 3 .*"
                                         r"accum_steps=3"):
        model.forward_backward(*views(), accum_steps=3)
    with pytest.raises(ConfigError, match=r"OPTIM.ACCUM_STEPS=3 does not divide "
                                          r"OPTIM.BATCH_SIZE=8"):
        load_config(None, ["OPTIM.BATCH_SIZE=8", "OPTIM.ACCUM_STEPS=3"])
    with pytest.raises(ConfigError, match=r"OPTIM.ACCUM_STEPS: 0 must be a positive integer"):
        load_config(None, ["OPTIM.ACCUM_STEPS=0"])


def test_per_process_batch_must_divide(tmp_path, monkeypatch):
    """8 images on 2 processes: 4 per process do not split into 8 micro-batches; nothing is
    written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(None, ["OPTIM.BATCH_SIZE=8", "OPTIM.ACCUM_STEPS=8"])
    with pytest.raises(ConfigError, match=r"OPTIM.ACCUM_STEPS=8 does not divide the batch of "
                                          r"each process, 4 \(OPTIM.BATCH_SIZE=8 on 2 "):
        train(cfg, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_accum_steps_is_part_of_the_fingerprint():
    """Part of the identity (BN statistics per micro-batch) except at 1, what runs recorded
    before the key existed computed: those keep their fingerprint and resume."""
    from loco_det.fingerprint import PRETRAIN_RUN_ONLY, pretrain_fingerprint, pretrain_identity

    assert "OPTIM.ACCUM_STEPS" not in PRETRAIN_RUN_ONLY
    one = load_config(None, ["SEED=0", "OPTIM.BATCH_SIZE=8"])
    two = load_config(None, ["SEED=0", "OPTIM.BATCH_SIZE=8", "OPTIM.ACCUM_STEPS=2"])
    assert pretrain_fingerprint(one) != pretrain_fingerprint(two)
    # A run recorded before the key existed computed ACCUM_STEPS=1: same fingerprint.
    before = yaml.safe_load(one.dump())
    del before["OPTIM"]["ACCUM_STEPS"]
    assert pretrain_fingerprint(before) == pretrain_fingerprint(one)
    assert pretrain_identity(before) == pretrain_identity(one)


def test_engine_step_with_accumulation(tmp_path):
    """One optimizer step through the training loop with ACCUM_STEPS=2: finite losses logged,
    a checkpoint whose config records the key."""
    import json

    root = make_folder(tmp_path / "data", n_per_class=4)
    cfg = load_config(None, [f"DATA.ROOT={root}", "MODEL.METHOD=loco", "MODEL.ARCH=resnet18",
                             "SEED=1", "DATA.IMAGE_SIZE=32", "OPTIM.BATCH_SIZE=8",
                             "OPTIM.ACCUM_STEPS=2", "OPTIM.EPOCHS=1", "OPTIM.WARMUP_EPOCHS=0",
                             "DATA.NUM_WORKERS=0", "RUN.LOG_PERIOD=1"])
    out = tmp_path / "run"
    summary = train(cfg, str(out))
    assert summary["finished"] and summary["steps"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert all(torch.isfinite(torch.tensor(records[0][f"loss/unit{k}"])) for k in (1, 2, 3))
    ckpt = torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert yaml.safe_load(ckpt["config"])["OPTIM"]["ACCUM_STEPS"] == 2



# ---- tools/bench_pretrain.py: --accumulate and --accum-steps ----------------------------------

def test_bench_kept_gradients_and_accumulation_rows(capsys):
    """One run measures both gradient modes (two tables) and the "/accum2" rows beside their
    own rows; "kept" zeroes existing buffers in place instead of dropping them."""
    import importlib.util
    import pathlib
    import re

    from loco_det.pretrain import bench

    model = build_model("gim", "resnet18")
    bench.prepare_grads(model, "kept")
    buffers = [p.grad for p in model.parameters()]
    assert all(g is not None and not g.any() for g in buffers)
    model.forward_backward(*views(batch=2))
    bench.prepare_grads(model, "kept")
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), buffers))
    bench.prepare_grads(model, "none")
    assert all(p.grad is None for p in model.parameters())
    assert bench.variants(["fused"], 2) == ["e2e", "e2e/accum2", "gim", "gim/accum2",
                                            "loco:fused", "loco:fused/accum2", "bare"]
    assert bench.step_kwargs("loco:fused/accum2") == {"accum_steps": 2}
    assert bench.step_kwargs("loco:fused") == {}

    tool = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_pretrain.py"
    spec = importlib.util.spec_from_file_location("bench_pretrain_cli_accum", tool)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--arch", "resnet18", "--image-size", "32", "--batch", "2", "--rounds", "1",
                     "--warmup", "0", "--threads", "1", "--no-memory", "--loco-schedule",
                     "fused", "--accumulate", "--accum-steps", "2"]) == 0
    out = capsys.readouterr().out
    tables = out.split("bench_pretrain: ")[1:]
    assert len(tables) == 2
    assert "None (zero_grad(set_to_none=True))" in tables[0]
    assert "zero_grad(set_to_none=False)" in tables[1]
    for table in tables:
        for name in ["e2e", "e2e/accum2", "gim/accum2", "loco:fused", "loco:fused/accum2"]:
            assert re.search(rf"^{re.escape(name)}(\s+[\d.]+){{7}}$", table, re.M), name
        assert re.search(r"^  loco:fused\s+time x[\d.]+\s+cpu x[\d.]+$", table, re.M)
        assert re.search(r"^  e2e \d+, e2e/accum2 \d+, ", table, re.M)
    with pytest.raises(SystemExit):
        cli.main(["--batch", "3", "--accum-steps", "2"])
    assert "--accum-steps 2 does not divide --batch 3" in capsys.readouterr().err


@pytest.mark.parametrize("method,schedule,accum", [("e2e", "fused", 1), ("gim", "fused", 1),
                                                   ("loco", "fused_stem", 1),
                                                   ("loco", "recompute", 1),
                                                   ("loco", "hybrid_stem", 2)])
def test_loss_scale_reaches_every_gradient(method, schedule, accum):
    """RUN.AMP=fp16's GradScaler (here its CPU form): every backward of the schedule (the
    units' losses, the shared stages' summed gradients, the stem's recompute, the GradCache
    replays) carries the scale, so every gradient is exactly scale x the unscaled one, and
    the losses are reported unscaled."""
    model = fixed_bn_model(method, schedule)
    plain_losses, plain = step(model, accum)
    model.loss_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled_losses, scaled = step(model, accum)
    assert scaled_losses == pytest.approx(plain_losses, rel=1e-6)
    assert_same_grads({n: g / 1024.0 for n, g in scaled.items()}, plain)
    assert min(g.abs().max().item() for g in scaled.values()) > 0
