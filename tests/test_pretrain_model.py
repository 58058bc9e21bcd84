"""The pretraining model: optimised schedules against a plain reference, gradient locality as a
black box, BN side effects, decoder options, the checkpoint contract and bad arguments."""
import copy

import pytest
import torch
import torchvision

from loco_det.pretrain.losses import nt_xent
from loco_det.pretrain.model import LOCO_SCHEDULES, build_model, run_stage


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def views(seed=0, batch=4, size=32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=gen),
            torch.randn(batch, 3, size, size, generator=gen))


def reference_forward_backward(model, view1, view2):
    """Obviously correct: every unit separately, from scratch, its input computed without a
    graph (= detached), its own stages and decoder with autograd. Shared stages are simply run
    twice and receive the sum of both units' gradients by accumulation."""
    x, n = torch.cat([view1, view2]), view1.shape[0]
    losses = {}
    for k, unit in enumerate(model.units):
        h = x
        with torch.no_grad():
            for stage in range(unit[0]):
                h = run_stage(model.encoder, stage, h)
        for stage in unit:
            h = run_stage(model.encoder, stage, h)
        z = model.decoders[k](h)
        loss = nt_xent(z[:n], z[n:], model.temperature)
        loss.backward()
        losses[model.unit_names[k]] = loss.item()
    return losses


def grads(model):
    return {name: None if p.grad is None else p.grad.clone()
            for name, p in model.named_parameters()}


def assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] is None) == (b[name] is None), name
        if a[name] is not None:
            scale = b[name].abs().max().item() + 1e-12
            torch.testing.assert_close(a[name] / scale, b[name] / scale, rtol=0, atol=2e-5,
                                       msg=lambda m: f"{name}: {m}")


CASES = [("e2e", "fused"), ("gim", "fused")] + [("loco", s) for s in LOCO_SCHEDULES]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("method,schedule", CASES)
def test_optimised_schedule_equals_reference(arch, method, schedule):
    torch.manual_seed(0)
    model = build_model(method, arch, loco_schedule=schedule)
    ref = copy.deepcopy(model)  # identical weights and BN state: no side effect can leak
    v1, v2 = views()
    losses = model.forward_backward(v1, v2)
    ref_losses = reference_forward_backward(ref, v1, v2)
    assert list(losses) == model.unit_names
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    g = grads(model)
    # Every encoder parameter (fc aside) and every decoder parameter gets a gradient.
    missing = [n for n, v in g.items() if v is None and not n.startswith("encoder.fc.")]
    assert not missing, missing
    assert_same_grads(g, grads(ref))


@pytest.mark.parametrize("schedule", LOCO_SCHEDULES)
def test_decoder_options_with_reference(schedule):
    torch.manual_seed(0)
    model = build_model("loco", "resnet18", conv_blocks=2, mlp_layers=4, hidden_dim=32,
                        proj_dim=16, loco_schedule=schedule)
    ref = copy.deepcopy(model)
    v1, v2 = views(size=64)
    model.forward_backward(v1, v2)
    reference_forward_backward(ref, v1, v2)
    assert_same_grads(grads(model), grads(ref))


def test_e2e_decoder_options_match_gim_shapes():
    model = build_model("e2e", "resnet18", conv_blocks=1, mlp_layers=4, proj_dim=64)
    assert len(model.decoders) == 1 and model.unit_names == ["unit1"]
    assert len(model.decoders[0].blocks) == 1
    assert sum(isinstance(m, torch.nn.Linear) for m in model.decoders[0].mlp) == 4
    assert model.decoders[0].mlp[-1].out_features == 64
    # The extra block is the encoder's own block type, halving resolution at constant width.
    block = build_model("gim", "resnet50", conv_blocks=1).decoders[0].blocks[0]
    assert isinstance(block, torchvision.models.resnet.Bottleneck)
    out = block.eval()(torch.zeros(1, 256, 8, 8))
    assert out.shape == (1, 256, 4, 4)


@pytest.mark.parametrize("method,schedule", CASES)
def test_bn_running_stats_move_once_per_step(method, schedule):
    """Recomputed forwards must not count the batch twice: after one step every BN of the
    encoder holds the statistics of one plain forward."""
    torch.manual_seed(0)
    model = build_model(method, "resnet18", loco_schedule=schedule)
    plain = copy.deepcopy(model.encoder)
    v1, v2 = views()
    model.forward_backward(v1, v2)
    with torch.no_grad():
        plain(torch.cat([v1, v2]))
    for (name, a), b in zip(model.encoder.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_gradients_accumulate_without_zeroing():
    torch.manual_seed(0)
    model = build_model("loco", "resnet18")
    v1, v2 = views()
    model.forward_backward(v1, v2)
    once = grads(model)
    for m in model.modules():  # same batch statistics for the second step
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    model.forward_backward(v1, v2)
    for name, g in grads(model).items():
        if g is not None:
            torch.testing.assert_close(g, 2 * once[name])


# ---- gradient locality, black box ------------------------------------------------------------

def layer_grads(method, perturb=None, schedule="fused"):
    """Gradients of layer1/layer2 after one step from fixed weights and inputs, optionally with
    the weights of one layer perturbed first."""
    torch.manual_seed(0)
    model = build_model(method, "resnet18", loco_schedule=schedule)
    if perturb is not None:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in getattr(model.encoder, perturb).parameters():
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen) + 0.1)
    model.forward_backward(*views())
    return {layer: torch.cat([p.grad.flatten() for p in getattr(model.encoder, layer).parameters()])
            for layer in ("layer1", "layer2")}


_LAYER_GRADS = {}


def changed(method, perturb, layer, schedule="fused"):
    """Whether perturbing `perturb` changes `layer`'s gradient (runs cached per setting)."""
    def run(p):
        key = (method, p, schedule)
        if key not in _LAYER_GRADS:
            _LAYER_GRADS[key] = layer_grads(method, p, schedule)
        return _LAYER_GRADS[key][layer]
    return not torch.allclose(run(None), run(perturb), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method,schedule",
                         [("gim", "fused")] + [("loco", s) for s in LOCO_SCHEDULES])
def test_locality_local_methods(method, schedule):
    assert not changed(method, "layer4", "layer1", schedule)
    assert not changed(method, "layer4", "layer2", schedule)
    assert not changed(method, "layer3", "layer1", schedule)
    # Only LoCo's overlap carries feedback one stage down (the "gradient bridge").
    assert changed(method, "layer2", "layer1", schedule) == (method == "loco")


def test_locality_e2e_is_global():
    assert changed("e2e", "layer4", "layer1")
    assert changed("e2e", "layer4", "layer2")


# ---- contracts and bad input -----------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_encoder_state_dict_is_torchvision(arch):
    model = build_model("loco", arch)
    plain = getattr(torchvision.models, arch)()
    plain.load_state_dict(model.encoder.state_dict(), strict=True)
    assert model.unit_names == ["unit1", "unit2", "unit3"]
    assert isinstance(model.decoders, torch.nn.ModuleList) and len(model.decoders) == 3


@pytest.mark.parametrize("kwargs,word", [
    (dict(method="simclr", arch="resnet18"), "method 'simclr'"),
    (dict(method="loco", arch="resnet200"), "architecture 'resnet200'"),
    (dict(method="loco", arch="resnet18", loco_schedule="fast"), "loco_schedule 'fast'"),
    (dict(method="loco", arch="resnet18", conv_blocks=3), "conv_blocks 3"),
    (dict(method="loco", arch="resnet18", mlp_layers=3), "mlp_layers 3"),
])
def test_unknown_choices_name_value_and_choices(kwargs, word):
    with pytest.raises(ValueError, match=word + r".*choose one of"):
        build_model(**kwargs)


def test_autocast_bf16_runs_and_keeps_float32_grads():
    torch.manual_seed(0)
    model = build_model("loco", "resnet18", loco_schedule="hybrid")
    model.autocast_dtype = torch.bfloat16
    losses = model.forward_backward(*views())
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


# ---- the supervised rule ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("supervised_views", [1, 2])
def test_supervised_equals_torchvision_classifier(arch, supervised_views):
    """The supervised rule is exactly a torchvision classifier (its fc = our linear head)
    trained with cross-entropy on the views it uses: same loss, same gradients, same BN."""
    torch.manual_seed(0)
    model = build_model("supervised", arch, num_classes=5, supervised_views=supervised_views)
    ref = getattr(torchvision.models, arch)(num_classes=5)
    state = dict(model.encoder.state_dict())
    state.update({f"fc.{k}": v for k, v in model.decoders[0].fc.state_dict().items()})
    ref.load_state_dict(state, strict=True)
    v1, v2 = views()
    labels = torch.tensor([0, 4, 2, 2])
    losses = model.forward_backward(v1, v2, labels)
    x = torch.cat([v1, v2]) if supervised_views == 2 else v1
    y = torch.cat([labels, labels]) if supervised_views == 2 else labels
    ref_loss = torch.nn.functional.cross_entropy(ref(x), y)
    ref_loss.backward()
    assert list(losses) == ["unit1"] and losses["unit1"] == pytest.approx(ref_loss.item(), rel=1e-5)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ours = {f"encoder.{n}": g for n, g in ref_grads.items() if not n.startswith("fc.")}
    ours.update({f"decoders.0.{n}": g for n, g in ref_grads.items() if n.startswith("fc.")})
    mine = grads(model)
    assert all(mine[n] is None for n in mine if n.startswith("encoder.fc."))
    assert_same_grads({n: mine[n] for n in ours}, ours)
    for (name, a), b in zip(model.encoder.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


def test_supervised_is_global_and_uses_labels():
    """One loss at the top: a change in layer4 reaches layer1; the labels change the gradient."""
    def layer1_grad(labels, perturb=False):
        torch.manual_seed(0)
        model = build_model("supervised", "resnet18", num_classes=3)
        if perturb:
            with torch.no_grad():
                for p in model.encoder.layer4.parameters():
                    p.mul_(1.5).add_(0.1)
        model.forward_backward(*views(), torch.tensor(labels))
        return torch.cat([p.grad.flatten() for p in model.encoder.layer1.parameters()])

    base = layer1_grad([0, 1, 2, 0])
    assert not torch.allclose(base, layer1_grad([0, 1, 2, 0], perturb=True))
    assert not torch.allclose(base, layer1_grad([2, 2, 1, 1]))


@pytest.mark.parametrize("kwargs,word", [
    (dict(conv_blocks=1), "decoder options .*conv_blocks"),
    (dict(mlp_layers=4), "decoder options .*mlp_layers"),
    (dict(num_classes=None), "num_classes >= 2"),
    (dict(num_classes=1), "num_classes >= 2"),
    (dict(supervised_views=3), "supervised_views 3"),
])
def test_supervised_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        build_model("supervised", "resnet18", **{"num_classes": 4, **kwargs})


def test_supervised_needs_one_label_per_image():
    model = build_model("supervised", "resnet18", num_classes=4)
    with pytest.raises(ValueError, match="needs 4 labels, got None"):
        model.forward_backward(*views())
    with pytest.raises(ValueError, match=r"need 4 labels, got \(3,\)"):
        model.forward_backward(*views(), torch.tensor([0, 1, 2]))


# ---- any rule: random partitions and overlaps ------------------------------------------------

def random_rule(seed, arch, granularity):
    """A random valid rule: units of random length going up with random overlaps (0 up to
    length - 1), random per-unit decoder options, NT-Xent."""
    from loco_det.pretrain.rules import Rule, RuleContext, Unit, contrastive_loss, validate_rule

    gen = torch.Generator().manual_seed(seed)
    ctx = RuleContext(arch=arch)
    top = ctx.num_pieces(granularity) - 1

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    units, start, stop = [], 0, -1
    while stop < top:
        # Start above the previous start, at most one piece above the previous stop (no gap);
        # end above the previous stop.
        start = 0 if not units else draw(units[-1].pieces[0] + 1, stop + 1)
        stop = draw(max(start, stop + 1), min(top, max(start, stop + 1) + 3))
        decoder = {"conv_blocks": draw(0, 1), "mlp_layers": (2, 4)[draw(0, 1)],
                   "proj_dim": 16} if draw(0, 1) else None
        units.append(Unit(tuple(range(start, stop + 1)), decoder))
    rule = Rule(f"random{seed}", tuple(units), contrastive_loss(0.2), granularity=granularity)
    validate_rule(rule, ctx)
    return rule


def rule_model(rule, arch, schedule="fused"):
    from loco_det.pretrain.model import PretrainModel

    return PretrainModel(rule, arch, loco_schedule=schedule)


def reference_any_rule(model, view1, view2, labels=None):
    """Obviously correct for any rule: every unit separately, from scratch, its input computed
    without a graph, its own pieces and decoder with autograd; shared pieces run once per unit
    and receive the sum of the units' gradients by accumulation."""
    from loco_det.pretrain.model import run_piece

    rule = model.rule
    x = torch.cat([view1, view2]) if rule.views == 2 else view1
    losses = {}
    for k, unit in enumerate(rule.units):
        h = x
        with torch.no_grad():
            for p in range(unit.pieces[0]):
                h = run_piece(model.encoder, rule.granularity, p, h)
        for p in unit.pieces:
            h = run_piece(model.encoder, rule.granularity, p, h)
        loss = rule.loss(model.decoders[k](h), labels)
        loss.backward()
        losses[model.unit_names[k]] = loss.item()
    return losses


RANDOM_CASES = [(arch, granularity, seed) for arch in ("resnet18", "resnet50")
                for granularity in ("stage", "block") for seed in range(3)]


@pytest.mark.parametrize("arch,granularity,seed", RANDOM_CASES)
def test_random_rule_equals_reference(arch, granularity, seed):
    rule = random_rule(seed + 10 * (granularity == "block") + 100 * (arch == "resnet50"),
                       arch, granularity)
    schedule = LOCO_SCHEDULES[seed % len(LOCO_SCHEDULES)]
    torch.manual_seed(0)
    model = rule_model(rule, arch, schedule)
    ref = copy.deepcopy(model)
    plain = copy.deepcopy(model.encoder)
    v1, v2 = views()
    losses = model.forward_backward(v1, v2)
    assert losses == pytest.approx(reference_any_rule(ref, v1, v2), rel=1e-5), rule.units
    g = grads(model)
    missing = [n for n, v in g.items() if v is None and not n.startswith("encoder.fc.")]
    assert not missing, (rule.units, missing)
    assert_same_grads(g, grads(ref))
    # BN statistics moved once, as in one plain forward.
    with torch.no_grad():
        plain(torch.cat([v1, v2]))
    for (name, a), b in zip(model.encoder.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("schedule", LOCO_SCHEDULES)
def test_overlap_two_and_blocks_equal_reference_every_schedule(schedule):
    """Two shared pieces per unit pair (loco_overlap2) and block granularity with overlap 2
    (a piece in three units): every schedule matches the reference."""
    for method, kwargs in (("loco_overlap2", {}), ("loco_blocks", dict(unit_length=3, overlap=2))):
        torch.manual_seed(0)
        model = build_model(method, "resnet18", loco_schedule=schedule, **kwargs)
        ref = copy.deepcopy(model)
        v1, v2 = views()
        model.forward_backward(v1, v2)
        reference_any_rule(ref, v1, v2)
        assert_same_grads(grads(model), grads(ref))


def test_registered_rules_units():
    from loco_det.pretrain.rules import RULES

    assert {"e2e", "gim", "loco", "supervised", "loco_overlap2", "loco_blocks"} <= set(RULES)
    assert build_model("loco_overlap2", "resnet18").units == ((0, 1, 2), (1, 2, 3))
    # ResNet-18 at block granularity: stem + 8 blocks; units of 2 overlapping by 1.
    assert build_model("loco_blocks", "resnet18").units == tuple((p, p + 1) for p in range(8))
    assert build_model("loco_blocks", "resnet50", unit_length=4, overlap=1).units == (
        (0, 1, 2, 3), (3, 4, 5, 6), (6, 7, 8, 9), (9, 10, 11, 12), (12, 13, 14, 15), (15, 16))
    assert build_model("loco_blocks", "resnet18", unit_length=3, overlap=0).units == (
        (0, 1, 2), (3, 4, 5), (6, 7, 8))


# ---- locality as a black box, for every registered rule and random ones ----------------------

def piece_grads(build, labels, perturb=None):
    """Per piece, the flat gradient after one step from fixed weights, optionally with piece
    `perturb`'s weights changed first."""
    from loco_det.pretrain.model import atom_modules, piece_atoms

    torch.manual_seed(0)
    model = build()
    pieces = piece_atoms(model.encoder, model.rule.granularity)

    def params(p):
        return [q for atom in pieces[p] for m in atom_modules(model.encoder, atom)
                for q in m.parameters()]

    if perturb is not None:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for q in params(perturb):
                q.add_(0.5 * q.std() * torch.randn(q.shape, generator=gen) + 0.1)
    model.forward_backward(*views(), labels)
    return [torch.cat([q.grad.flatten() for q in params(p)]) for p in range(len(pieces))]


def check_locality(build, labels=None, pairs=None):
    """Perturbing piece q (above p) changes p's gradient iff some unit contains both."""
    base_model = build()
    units = base_model.units
    n = len(piece_atoms_of(base_model))
    pairs = pairs or [(p, q) for q in range(1, n) for p in range(q)]
    base = piece_grads(build, labels)
    by_q = {}
    for p, q in pairs:
        if q not in by_q:
            by_q[q] = piece_grads(build, labels, perturb=q)
        expect = any(u[0] <= p and q <= u[-1] for u in units)
        moved = not torch.allclose(base[p], by_q[q][p], rtol=1e-5, atol=1e-8)
        assert moved == expect, f"units {units}: piece {q} -> piece {p}: {moved}, expected {expect}"


def piece_atoms_of(model):
    from loco_det.pretrain.model import piece_atoms

    return piece_atoms(model.encoder, model.rule.granularity)


@pytest.mark.parametrize("method", ["e2e", "gim", "loco", "supervised", "loco_overlap2",
                                    "loco_blocks"])
def test_locality_every_registered_rule(method):
    labels = torch.tensor([0, 1, 2, 0]) if method == "supervised" else None
    pairs = None
    if method == "loco_blocks":  # 9 pieces: neighbours and two apart, top and bottom
        pairs = [(p, p + d) for p in (0, 3, 6) for d in (1, 2)] + [(0, 8)]
    check_locality(lambda: build_model(method, "resnet18", num_classes=3), labels, pairs)


@pytest.mark.parametrize("arch,seed", [("resnet18", 0), ("resnet18", 1), ("resnet50", 2)])
def test_locality_random_rules(arch, seed):
    # The first random rule from this seed on whose units overlap somewhere.
    rule = next(r for r in (random_rule(seed + 1000 + i, arch, "block" if seed else "stage")
                            for i in range(100))
                if any(a.pieces[-1] >= b.pieces[0] for a, b in zip(r.units, r.units[1:])))
    n = len(piece_atoms_of(rule_model(rule, arch)))
    gen = torch.Generator().manual_seed(seed)
    pairs = sorted({tuple(sorted(torch.randperm(n, generator=gen)[:2].tolist()))
                    for _ in range(4)})
    pairs += [(u.pieces[0], u.pieces[-1]) for u in rule.units if len(u.pieces) > 1][:1]
    check_locality(lambda: rule_model(rule, arch, "hybrid_stem"), None, pairs)


@pytest.mark.parametrize("method,kwargs", [("loco", {}), ("loco_overlap2", {}),
                                           ("loco_blocks", dict(unit_length=3, overlap=2)),
                                           ("e2e", {}), ("gim", {})])
def test_each_forward_once_each_weight_gradient_once(method, kwargs):
    """With the "fused" schedule every residual block runs its forward once, and every encoder
    parameter's gradient is computed exactly once per step, however many units share it."""
    torch.manual_seed(0)
    model = build_model(method, "resnet18", loco_schedule="fused", **kwargs)
    enc = model.encoder
    forwards, weight_grads = {}, {}
    blocks = [(f"layer{s}.{i}", b) for s in range(1, 5)
              for i, b in enumerate(getattr(enc, f"layer{s}"))] + [("conv1", enc.conv1)]
    for name, block in blocks:
        block.register_forward_hook(
            lambda m, i, o, name=name: forwards.__setitem__(name, forwards.get(name, 0) + 1))
    for name, p in enc.named_parameters():
        if not name.startswith("fc."):
            p.register_hook(lambda g, name=name: weight_grads.__setitem__(
                name, weight_grads.get(name, 0) + 1))
    model.forward_backward(*views())
    assert set(forwards.values()) == {1} and len(forwards) == len(blocks)
    assert set(weight_grads.values()) == {1}
    assert len(weight_grads) == sum(1 for n, _ in enc.named_parameters() if not n.startswith("fc."))
