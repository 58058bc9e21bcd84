"""tools/bench_pretrain.py: output structure of --analyze and of the timing/memory table
(tiny settings; speed itself is not asserted: CI machines are shared)."""
import importlib.util
import pathlib
import re

import pytest
import torch

from loco_det.pretrain import bench

TOOL = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_pretrain.py"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("bench_pretrain_cli", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_has_examples(cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--analyze" in out and "Examples:" in out and "--loco-schedule" in out


def test_unknown_arch_is_one_line_error(cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--arch", "resnet200"])
    assert exit_info.value.code == 2
    assert "resnet200" in capsys.readouterr().err


def test_unknown_loco_schedule_is_an_error(cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--loco-schedule", "fused,fastest"])
    assert exit_info.value.code == 2
    assert "'fastest'" in capsys.readouterr().err


def test_analyze_resnet18_64px(cli, capsys):
    assert cli.main(["--analyze", "--arch", "resnet18", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): m for m in re.finditer(
        r"^(S\d) [^\n]*?\s+([\d.]+)\s+([\d.]+)\s+(-|[\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
        out, re.M)}
    assert sorted(rows) == ["S1", "S2", "S3", "S4"]
    flop_share = sum(float(rows[s].group(3)) for s in rows)
    act_share = sum(float(rows[s].group(6)) for s in rows)
    assert flop_share == pytest.approx(100, abs=0.05) and act_share == pytest.approx(100, abs=0.05)
    assert "paper" in out and "stem" in out
    for method in ("e2e", "gim", "loco"):
        assert re.search(rf"^{method}\s+\d+\s+[\d.]+\s+[\d.]+", out, re.M), method


def test_analyze_resnet50_matches_paper_counting():
    """The block-output counting reproduces the paper's activation table exactly, and fvcore's
    FLOP shares (stem in S1) are within 0.1 point of the paper's."""
    a = bench.analyze("resnet50", 224)
    blocks = [100 * b / sum(a["block_outputs"]) for b in a["block_outputs"]]
    assert blocks == pytest.approx(bench.PAPER_ACTIVATION_SHARE, abs=0.01)
    flops = [100 * f / sum(a["stage_flops"]) for f in a["stage_flops"]]
    assert flops == pytest.approx(bench.PAPER_FLOP_SHARE, abs=0.1)
    assert a["methods"]["gim"]["units"] == 4 and a["methods"]["loco"]["units"] == 3


def test_timing_table(cli, capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    assert cli.main(["--arch", "resnet18", "--image-size", "32", "--batch", "2", "--rounds", "1",
                     "--warmup", "0", "--threads", "1", "--no-memory",
                     "--loco-schedule", "fused,hybrid_stem",
                     "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "loco:recompute" not in out
    for name in ["e2e", "gim", "loco:fused", "loco:hybrid_stem", "bare"]:
        # step s, img/s, time/e2e, cpu s, cpu/e2e, GFLOP, flop/e2e
        assert re.search(rf"^{re.escape(name)}(\s+[\d.]+){{7}}$", out, re.M), name
    assert re.search(r"^e2e(\s+[\d.]+){6}\s+1\.000$", out, re.M)
    floor = re.search(r"^step FLOPs / e2e.*\n  loco:fused\s+([\d.]+)\n"
                      r"  loco:hybrid_stem\s+([\d.]+)$", out, re.M)
    assert floor and 1 < float(floor.group(1)) < float(floor.group(2)), out
    assert "e2e / bare torchvision step time" in out and "targets" in out
    assert out_json.exists()


def test_memory_measured_in_subprocesses():
    """Real per-process peak RSS over the no-step baseline (two spawned workers)."""
    peaks, base = bench.peak_memory_cpu(["gim"], "resnet18", 0, {}, 2, 32,
                                        grad_modes=("none", "kept"))
    assert base > 0 and set(peaks) == {"none", "kept"} and set(peaks["kept"]) == {"gim"}
    # A step allocates at least the gradients of the encoder (11.7 M floats); with kept
    # gradients they are allocated before the step and counted too.
    for mode in peaks:
        assert peaks[mode]["gim"] > 11e6 * 4 * 0.9, mode


def fake_result(times, memory):
    """A run_benchmark-shaped result from one round of made-up numbers."""
    wall = {k: [v] for k, v in times.items()}
    return {"arch": "resnet18", "image_size": 32, "batch": 2, "views": 4, "rounds": 1,
            "warmup": 0, "device": "cpu", "amp": False, "threads": 1, "decoder_options": {},
            "memory_method": "peak RSS", "memory_baseline": 1,
            "time": times, "cpu_time": times, "time_rounds": wall, "cpu_rounds": wall,
            "time_ratio": {k: bench.paired_ratio(wall, k, "e2e") for k in times},
            "cpu_ratio": {k: bench.paired_ratio(wall, k, "e2e") for k in times},
            "e2e_over_bare": bench.paired_ratio(wall, "e2e", "bare"), "memory": memory}


def test_table_with_memory_columns():
    result = fake_result({"e2e": 1.0, "gim": 1.1, "loco:hybrid": 1.15, "bare": 0.9},
                         {"e2e": 2**30, "gim": 2**29, "loco:hybrid": 3 * 2**28, "bare": 2**30})
    out = bench.format_benchmark(result)
    assert re.search(r"^loco:hybrid\s+1\.150\s+1\.74\s+1\.150\s+1\.150\s+1\.150\s+768\s+0\.750$",
                     out, re.M), out
    assert re.search(r"loco:hybrid meets both loco targets\s+yes", out)


def test_target_checks_pick_the_best_schedule():
    result = fake_result({"e2e": 1.0, "gim": 1.0, "loco:fused": 1.1, "loco:recompute": 1.3,
                          "bare": 0.95},
                         {"e2e": 100, "gim": 60, "loco:fused": 87, "loco:recompute": 77,
                          "bare": 100})
    checks = {label: met for label, _, _, met in bench.target_checks(result)}
    assert checks["loco:fused step time / e2e"] and checks["loco:recompute peak memory / e2e"]
    assert not checks["loco:fused meets both loco targets"]
    assert checks["gim peak memory / e2e"] and checks["e2e step time / bare torchvision"]


def test_reference_checkout_rows_interleave(monkeypatch, tmp_path):
    """$LOCO_DET_BENCH_REFERENCE adds a "ref:" row per e2e/gim/loco row, built by that
    checkout's own code: here a copy of this checkout whose build_model marks what it builds,
    so a "ref:" row built by this checkout's code would lack the mark."""
    import os
    import shutil
    import sys

    import torch

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = tmp_path / "reference"
    shutil.copytree(os.path.join(repo, "loco_det"), other / "loco_det",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(other / "loco_det" / "pretrain" / "model.py", "a") as f:
        f.write("\n\n_unmarked_build_model = build_model\n\n\n"
                "def build_model(*args, **kwargs):\n"
                "    model = _unmarked_build_model(*args, **kwargs)\n"
                "    model.built_by_reference_copy = True\n"
                "    return model\n")
    monkeypatch.setenv(bench.REFERENCE_ENV, str(other))

    def forget_reference():
        for name in [m for m in sys.modules if m.split(".")[0] == "loco_det_reference"]:
            del sys.modules[name]

    forget_reference()
    assert bench.variants(["fused"]) == ["e2e", "ref:e2e", "gim", "ref:gim", "loco:fused",
                                         "ref:loco:fused", "bare"]
    try:
        ref = bench.build_variant("ref:loco:fused", "resnet18", 0, {})
        own = bench.build_variant("loco:fused", "resnet18", 0, {})
    finally:
        forget_reference()
    assert type(ref).__module__ == "loco_det_reference.pretrain.model"
    assert getattr(ref, "built_by_reference_copy", False)
    assert not hasattr(own, "built_by_reference_copy")
    # the same seeded weights: the rows differ only by the code that runs them
    assert own.state_dict().keys() == ref.state_dict().keys()
    for (n, a), b in zip(own.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), n


def _conv_forward_flops(model, x):
    """Per conv of the encoder: 2 * N * Cout * Hout * Wout * Cin / groups * kh * kw, read off a
    forward pass (independent of torch's flop formulas)."""
    flops, hooks = {}, []
    for name, module in model.encoder.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            def hook(m, _inp, out, name=name):
                kh, kw = m.kernel_size
                flops[name] = 2 * out.numel() * m.in_channels // m.groups * kh * kw
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return flops


def test_step_flops_are_the_schedules_work_in_closed_form():
    """Counted conv FLOPs of one step equal what each schedule must compute: e2e one forward and
    one backward (no input gradient for the image); gim none at the three detached unit inputs;
    every LoCo schedule e2e's backward plus exactly one input-gradient pass through S2's and S3's
    convolutions (those reading the stage input excepted: the weight pass needs no input
    gradient there), the least that separate gradients for the weights and the stage below
    allow; recompute schedules one more forward of what they recompute."""
    views = bench.make_inputs(2, 32, 0)
    model = bench.build_variant("e2e", "resnet18", 0, {})
    f = _conv_forward_flops(model, torch.cat(views))
    total = sum(f.values())

    def stage(s):
        return sum(v for k, v in f.items() if k.startswith(f"layer{s}."))

    def entry(s):
        return f[f"layer{s}.0.conv1"] + f[f"layer{s}.0.downsample.0"]

    e2e_backward = 2 * total - f["conv1"]
    loco_backward = e2e_backward + stage(2) - entry(2) + stage(3) - entry(3)
    expected = {
        "bare": (total, e2e_backward),
        "e2e": (total, e2e_backward),
        "gim": (total, e2e_backward - entry(2) - entry(3) - entry(4)),
        "loco:fused": (total, loco_backward),
        "loco:fused_stem": (total + f["conv1"], loco_backward),
        "loco:recompute": (total + stage(2) + stage(3), loco_backward),
        "loco:hybrid": (total + stage(2), loco_backward),
        "loco:hybrid_stem": (total + f["conv1"] + stage(2), loco_backward),
    }
    for name, (forward, backward) in expected.items():
        variant = bench.build_variant(name, "resnet18", 0, {})
        counted = bench.step_flops(variant, views)
        assert (counted["aten.convolution"], counted["aten.convolution_backward"]) == \
            (forward, backward), name
        assert all(p.grad is None for p in variant.parameters()), name
