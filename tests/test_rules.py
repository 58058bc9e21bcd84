"""Learning rules as data: validation with one-line errors, the plug-in API (import path and
`loco_det.rules` entry point), and a rule defined outside the package run end to end from the
command line: pretrain -> linear readout -> conversion with --verify -> Mask R-CNN."""
import json
import os
import sys
import textwrap

import pytest
import torch
import torchvision

from loco_det.pretrain.config import load_config
from loco_det.pretrain.model import build_model
from loco_det.pretrain.rules import (Rule, RuleContext, RuleError, Unit, contrastive_loss,
                                     load_rule, validate_rule)
from loco_det.utils import ConfigError

from test_supervised import run_tool, train_tiny_frozen_mask_rcnn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def readme_example():
    """The complete plug-in example of docs/pretraining.md (the module `my_rules`), as written
    there."""
    with open(os.path.join(REPO, "docs", "pretraining.md")) as f:
        text = f.read()
    start = text.index("```python\n# my_rules.py\n") + len("```python\n")
    return text[start:text.index("```", start)]


# Added to the documented module for the error cases.
BROKEN = textwrap.dedent('''

    not_a_rule = 42


    def returns_junk(ctx):
        return {"units": [(0, 1, 2, 3)]}
''')


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """A directory with module `my_rules` and an installed-distribution record declaring the
    entry point `two_halves_ep = my_rules:two_halves` in group loco_det.rules."""
    d = tmp_path_factory.mktemp("plugin")
    (d / "my_rules.py").write_text(readme_example() + BROKEN)
    info = d / "my_rules-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rules\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[loco_det.rules]\ntwo_halves_ep = my_rules:two_halves\nbroken_ep = my_rules:nope\n")
    return d


@pytest.fixture
def on_path(plugin_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    yield plugin_dir
    sys.modules.pop("my_rules", None)


def test_import_path_and_entry_point(on_path):
    rule = load_rule("my_rules:two_halves", RuleContext(arch="resnet18"))
    assert [u.pieces for u in rule.units] == [(0, 1), (1, 2, 3)]
    assert load_rule("two_halves_ep", RuleContext(arch="resnet18")).units == rule.units
    model = build_model("my_rules:blocks_align", "resnet18")
    assert model.units == ((0, 1, 2), (2, 3, 4, 5, 6, 7, 8)) and model.method == \
        "my_rules:blocks_align"
    losses = model.forward_backward(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert set(losses) == {"unit1", "unit2"}
    # Per-unit decoder options: one conv block in unit 1's decoder only.
    model = build_model("two_halves_ep", "resnet18")
    assert len(model.decoders[0].blocks) == 1 and len(model.decoders[1].blocks) == 0


@pytest.mark.parametrize("method,words", [
    ("my_rules:nope", ["my_rules has no attribute nope"]),
    ("no_such_module_xyz:rule", ["cannot import no_such_module_xyz"]),
    ("my_rules:not_a_rule", ["is a int, not a Rule"]),
    ("my_rules:returns_junk", ["returned dict, not a loco_det.pretrain.rules.Rule"]),
    ("broken_ep", ["entry point my_rules:nope cannot be loaded"]),
    ("simclr", ["unknown method 'simclr'", "e2e", "two_halves_ep", "package.module:rule"]),
    (":x", ["an import path is 'package.module:name'"]),
])
def test_bad_method_one_line(on_path, method, words):
    with pytest.raises(RuleError) as e:
        load_rule(method, RuleContext(arch="resnet18"))
    message = str(e.value)
    assert "\n" not in message and f"method {method!r}" in message
    for word in words:
        assert word in message


def units_rule(*units, granularity="stage", **kw):
    return Rule("r", tuple(Unit(tuple(u)) if not isinstance(u, Unit) else u for u in units),
                contrastive_loss(0.1), granularity=granularity, **kw)


@pytest.mark.parametrize("rule,words", [
    (units_rule((1, 2, 3)), ["first unit must start at piece 0"]),
    (units_rule((0, 1), (1, 2)), ["last unit ends at piece 2", "top piece 3"]),
    (units_rule((0, 2), (2, 3)), ["unit 1 pieces (0, 2) are not a run of consecutive"]),
    (units_rule((0,), (2, 3)), ["gap between unit 1 (0,) and unit 2 (2, 3)", "1..1"]),
    (units_rule((0, 1, 2), (1, 2), (2, 3)), ["unit 2 (1, 2) must start and end above"]),
    (units_rule((0, 1, 2, 3, 4)), ["outside 0..3", "stage pieces of resnet18"]),
    (units_rule((0, 1, 2, 3), granularity="layer"), ["granularity 'layer'"]),
    (units_rule((0, 1, 2, 3), views=3), ["views 3"]),
    (units_rule(Unit((0, 1, 2, 3), decoder={"depth": 2})), ["decoder option 'depth'"]),
    (units_rule(Unit((0, 1, 2, 3), decoder=3)), ["decoder must be None, a dict"]),
    (units_rule(), ["no units"]),
    (Rule("r", (Unit((0, 1, 2, 3)),), loss=None), ["loss is not callable"]),
])
def test_malformed_rules_one_line(rule, words):
    with pytest.raises(RuleError) as e:
        validate_rule(rule, RuleContext(arch="resnet18"))
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_block_granularity_bounds_follow_the_arch():
    validate_rule(units_rule(range(0, 17), granularity="block"), RuleContext(arch="resnet50"))
    with pytest.raises(RuleError, match="outside 0..8"):
        validate_rule(units_rule(range(0, 17), granularity="block"), RuleContext(arch="resnet18"))
    with pytest.raises(RuleError, match="overlap 2 must be within 0..1"):
        build_model("loco_blocks", "resnet18", unit_length=2, overlap=2)


def test_config_names_the_key(on_path):
    assert load_config(None, ["MODEL.METHOD=my_rules:two_halves"]).MODEL.METHOD == \
        "my_rules:two_halves"
    with pytest.raises(ConfigError, match=r"^MODEL.METHOD: method 'my_rules:nope'"):
        load_config(None, ["MODEL.METHOD=my_rules:nope"])


def plugin_env(plugin_dir):
    path = os.pathsep.join(p for p in (str(plugin_dir), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


def test_outside_rule_end_to_end_from_the_command_line(plugin_dir, synth_root, tmp_path):
    env = plugin_env(plugin_dir)
    out = tmp_path / "pre"
    proc = run_tool("pretrain.py", "--config", os.path.join(REPO, "pretrain", "cpu_base.yaml"),
                    "--output-dir", out, "MODEL.METHOD=my_rules:two_halves",
                    f"DATA.ROOT={synth_root / 'imagefolder' / 'train'}", "SEED=0",
                    "DATA.IMAGE_SIZE=32", "OPTIM.BATCH_SIZE=8", "OPTIM.EPOCHS=1",
                    "DATA.NUM_WORKERS=0", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ckpt_path = out / "checkpoint_last.pth"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["method"] == "my_rules:two_halves" and ckpt["step"] == 3
    torchvision.models.resnet18().load_state_dict(ckpt["encoder"], strict=True)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["final_losses"]) == {"unit1", "unit2"}
    # Resume of the finished run reloads the plug-in's decoders (shapes from the rule).
    proc = run_tool("pretrain.py", "--config", os.path.join(REPO, "pretrain", "cpu_base.yaml"),
                    "--output-dir", out, "--resume", "MODEL.METHOD=my_rules:two_halves",
                    f"DATA.ROOT={synth_root / 'imagefolder' / 'train'}", "DATA.IMAGE_SIZE=32",
                    "OPTIM.BATCH_SIZE=8", "OPTIM.EPOCHS=1", "DATA.NUM_WORKERS=0", env=env)
    assert proc.returncode == 0 and "already finished" in proc.stderr, proc.stderr[-3000:]

    proc = run_tool("linear_readout.py", "--checkpoint", ckpt_path, "--output-dir",
                    tmp_path / "ro", "--data", synth_root / "imagefolder", "--epochs", "2",
                    "--workers", "0", "--seed", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ro" / "readout.json").read_text())["method"] == \
        "my_rules:two_halves"
    pkl = tmp_path / "two_halves.pkl"
    proc = run_tool("convert_to_detectron2.py", ckpt_path, pkl, "--verify")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    train_tiny_frozen_mask_rcnn(pkl, tmp_path / "det", synth_root, tmp_path)


def test_entry_point_from_the_command_line_and_bad_method(plugin_dir, synth_root, tmp_path):
    env = plugin_env(plugin_dir)
    common = [f"DATA.ROOT={synth_root / 'imagefolder' / 'train'}", "SEED=0",
              "DATA.IMAGE_SIZE=32", "OPTIM.BATCH_SIZE=8", "OPTIM.EPOCHS=1",
              "DATA.NUM_WORKERS=0", "MODEL.ARCH=resnet18"]
    proc = run_tool("pretrain.py", "--output-dir", tmp_path / "ep", "MODEL.METHOD=two_halves_ep",
                    *common, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ep" / "summary.json").read_text())["steps"] == 3
    proc = run_tool("pretrain.py", "--output-dir", tmp_path / "bad",
                    "MODEL.METHOD=my_rules:returns_junk", *common, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "MODEL.METHOD" in errors[0] and "returned dict" in errors[0]
    assert not (tmp_path / "bad").exists()


def test_cpu_recipes_of_the_new_rules():
    for name, method, units in (("cpu_loco_overlap2", "loco_overlap2", 2),
                                ("cpu_loco_blocks", "loco_blocks", 8)):
        cfg = load_config(os.path.join(REPO, "pretrain", f"{name}.yaml"))
        assert (cfg.MODEL.METHOD, cfg.MODEL.ARCH) == (method, "resnet18")
        model = build_model(method, cfg.MODEL.ARCH, unit_length=cfg.MODEL.LOCO_BLOCKS.UNIT_LENGTH,
                            overlap=cfg.MODEL.LOCO_BLOCKS.OVERLAP)
        assert len(model.units) == units


def test_loss_must_be_a_scalar_with_gradient():
    bad = Rule("bad", (Unit((0, 1, 2, 3)),), loss=lambda z, labels: z.sum(dim=1))
    from loco_det.pretrain.model import PretrainModel

    model = PretrainModel(bad, "resnet18")
    with pytest.raises(RuleError, match=r"unit 1 returned Tensor\(8,\), not a scalar"):
        model.forward_backward(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))


def test_bad_decoders_one_line():
    from loco_det.pretrain.model import PretrainModel

    for decoder, words in (({"conv_blocks": 3}, "unit 1's decoder: unknown conv_blocks 3"),
                           (lambda channels, block_type: "head", "returned str, not an nn.Module")):
        rule = Rule("bad", (Unit((0, 1, 2, 3), decoder=decoder),), contrastive_loss(0.1))
        with pytest.raises(RuleError, match=words):
            PretrainModel(rule, "resnet18")

