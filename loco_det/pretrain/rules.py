"""Learning rules as data: which runs of encoder pieces are trained by which local loss.

A rule is

* a granularity: the encoder's pieces are its four stages ("stage": S1 = stem + layer1, S2 =
  layer2, S3 = layer3, S4 = layer4) or, finer, its stem and each residual block ("block":
  ResNet-18 has 1 + 8 pieces, ResNet-50 1 + 16);
* a list of units, each a run of consecutive pieces. A unit's loss reaches exactly its own
  pieces: its first piece reads the (detached) output of the piece below, its decoder reads the
  output of its last piece. Units go bottom-up: each starts and ends above the previous one,
  consecutive units overlap by zero or more pieces, the first starts at piece 0 and the last
  ends at the top piece (every piece is trained);
* per-unit decoder options (overrides of MODEL.DECODER, or a factory for a custom head);
* the loss: `loss(z, labels) -> scalar`, z the decoder output of the views' batch
  (`views` = 2: N first views then N second views; 1: first views only), labels the N
  ImageFolder class indices (None when the caller has none, e.g. the cost measurement, bench.py).

`model.PretrainModel` runs every rule; see model.py for its schedule.

Rules are made by factories `factory(ctx: RuleContext) -> Rule`, registered by name here, or
named by the user: `MODEL.METHOD: my_package.my_module:my_rule` (an import path; the object may
be a Rule or a factory) or the name of a `loco_det.rules` entry point. `load_rule` validates the
result and fails with one line (RuleError) naming what is wrong.

What code outside the rules must know of a rule before building it is its `RuleNeeds` (the
factory's `needs` attribute, set by `register`): whether its loss takes the images' labels, its
own config keys (options) with their checks, and whether MODEL.DECODER applies. Nothing outside
this module compares a method's name.
"""
import dataclasses
import importlib
import importlib.metadata
from typing import Callable, Optional, Tuple, Union

from ..utils import LocoError

GRANULARITIES = ("stage", "block")
ENTRY_POINT_GROUP = "loco_det.rules"
# Residual blocks per stage of the torchvision ResNets (block granularity: 1 + sum pieces).
BLOCKS_PER_STAGE = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3),
                    "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
DECODER_KEYS = ("conv_blocks", "mlp_layers", "proj_dim", "hidden_dim")


class RuleError(LocoError, ValueError):
    """A rule that cannot be loaded or is malformed; the message is one line (the tools print
    it as `error: ...`)."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """A run of consecutive pieces trained by one loss.

    pieces: the consecutive piece indices the loss reaches (0-based, bottom-up).
    decoder: None (MODEL.DECODER), a dict overriding some of its keys (conv_blocks,
      mlp_layers, proj_dim, hidden_dim), or a factory `decoder(in_channels, block_type) ->
      nn.Module` for a custom head (e.g. the supervised rule's linear classifier)."""
    pieces: Tuple[int, ...]
    decoder: Union[None, dict, Callable] = None


@dataclasses.dataclass(frozen=True)
class Rule:
    """A learning rule (see the module docstring). takes_labels: the loss needs the images'
    labels (it fails without them)."""
    name: str
    units: Tuple[Unit, ...]
    loss: Callable
    granularity: str = "stage"
    views: int = 2
    takes_labels: bool = False


@dataclasses.dataclass(frozen=True)
class Option:
    """A rule's own setting: its config key, default and allowed values (empty: any)."""
    key: str
    default: object
    choices: tuple = ()


@dataclasses.dataclass(frozen=True)
class RuleNeeds:
    """What generic code (config, engine, report) must know of a rule without building it.

    takes_labels: its loss takes the ImageFolder labels (the rule built must say the same).
    options: {name: Option}, the rule's own config keys; the engine passes their values to the
      factory as `ctx.options[name]`, the config checks them.
    decoder_options: MODEL.DECODER applies; False when every unit brings its own `head`
      (described for the report, e.g. "linear classifier")."""
    takes_labels: bool = False
    options: dict = dataclasses.field(default_factory=dict)
    decoder_options: bool = True
    head: str = ""

    def resolve(self, given):
        """{name: value} of every option: `given` (by name) else the default, each checked."""
        out = {}
        for name, opt in self.options.items():
            value = given.get(name, opt.default)
            if opt.choices and value not in opt.choices:
                raise RuleError(f"unknown {name} {value!r}; choose one of: "
                                f"{', '.join(map(str, opt.choices))}")
            out[name] = value
        return out


@dataclasses.dataclass(frozen=True)
class RuleContext:
    """What a rule factory may depend on (from the config: MODEL.ARCH, LOSS.TEMPERATURE;
    num_classes: the ImageFolder's classes, None if unknown; options: the values of the rule's
    own options, RuleNeeds.options, by name)."""
    arch: str = "resnet50"
    temperature: float = 0.1
    num_classes: Optional[int] = None
    options: dict = dataclasses.field(default_factory=dict)

    def num_pieces(self, granularity):
        if granularity == "stage":
            return 4
        return 1 + sum(BLOCKS_PER_STAGE[self.arch])


# ----------------------------------------------------------------------------- built-in rules
RULES = {}


def register(name, needs=None):
    """Decorator: register a rule factory under `name` (a MODEL.METHOD value), with what it
    needs (RuleNeeds; default: no labels, no options, MODEL.DECODER applies)."""
    def wrap(factory):
        factory.needs = needs or RuleNeeds()
        RULES[name] = factory
        return factory
    return wrap


def contrastive_loss(temperature):
    """NT-Xent over the 2N views (first N against second N), temperature tau."""
    from .losses import nt_xent   # here: losses.py imports torch, rules.py does not need it

    def loss(z, labels):
        n = z.shape[0] // 2
        return nt_xent(z[:n], z[n:], temperature)
    loss.temperature = temperature
    return loss


def overlapping_units(num_pieces, length, overlap):
    """Units of `length` consecutive pieces, each starting `length - overlap` above the
    previous; the last ends at the top piece (shorter if the pieces run out)."""
    if not 1 <= length <= num_pieces:
        raise RuleError(f"unit length {length} must be within 1..{num_pieces} pieces")
    if not 0 <= overlap < length:
        raise RuleError(f"overlap {overlap} must be within 0..{length - 1} (unit length {length})")
    units, start = [], 0
    while True:
        stop = min(start + length, num_pieces)
        units.append(Unit(tuple(range(start, stop))))
        if stop == num_pieces:
            return tuple(units)
        start += length - overlap


@register("e2e")
def e2e(ctx):
    """SimCLR: one unit, all four stages, one NT-Xent loss at the top."""
    return Rule("e2e", (Unit((0, 1, 2, 3)),), contrastive_loss(ctx.temperature))


@register("gim")
def gim(ctx):
    """Greedy InfoMax-style: one unit per stage, each unit's input detached."""
    return Rule("gim", overlapping_units(4, 1, 0), contrastive_loss(ctx.temperature))


@register("loco")
def loco(ctx):
    """LoCo: {S1,S2} {S2,S3} {S3,S4}; S2 and S3 are shared by two units."""
    return Rule("loco", overlapping_units(4, 2, 1), contrastive_loss(ctx.temperature))


@register("loco_overlap2")
def loco_overlap2(ctx):
    """LoCo with three-stage units overlapping by two: {S1,S2,S3} {S2,S3,S4}."""
    return Rule("loco_overlap2", overlapping_units(4, 3, 2), contrastive_loss(ctx.temperature))


LOCO_BLOCKS_NEEDS = RuleNeeds(options={
    "unit_length": Option("MODEL.LOCO_BLOCKS.UNIT_LENGTH", 2),
    "overlap": Option("MODEL.LOCO_BLOCKS.OVERLAP", 1)})


@register("loco_blocks", LOCO_BLOCKS_NEEDS)
def loco_blocks(ctx):
    """LoCo at residual-block granularity (stem = piece 0): units of MODEL.LOCO_BLOCKS.
    UNIT_LENGTH pieces overlapping by MODEL.LOCO_BLOCKS.OVERLAP."""
    opts = LOCO_BLOCKS_NEEDS.resolve(ctx.options)
    return Rule("loco_blocks", overlapping_units(ctx.num_pieces("block"), opts["unit_length"],
                                                 opts["overlap"]),
                contrastive_loss(ctx.temperature), granularity="block")


def cross_entropy_loss(views):
    """Cross-entropy of the logits against the labels (repeated for each view used)."""
    import torch
    import torch.nn.functional as F

    def loss(z, labels):
        if labels is None:
            raise ValueError("the supervised rule needs the images' labels")
        y = labels if views == 1 else torch.cat([labels] * views)
        return F.cross_entropy(z.float(), y.to(z.device))
    return loss


SUPERVISED_NEEDS = RuleNeeds(
    takes_labels=True, decoder_options=False, head="linear classifier",
    # trains on both views (2) or on the first view only (1)
    options={"supervised_views": Option("LOSS.SUPERVISED_VIEWS", 2, (1, 2))})


@register("supervised", SUPERVISED_NEEDS)
def supervised(ctx):
    """Cross-entropy on the ImageFolder labels, one linear classifier on pooled res5."""
    from .heads import LinearClassifier   # here: heads.py imports torch

    if not isinstance(ctx.num_classes, int) or ctx.num_classes < 2:
        raise RuleError(f"method 'supervised' needs num_classes >= 2, got {ctx.num_classes!r}")
    views = SUPERVISED_NEEDS.resolve(ctx.options)["supervised_views"]
    num_classes = ctx.num_classes

    def head(in_channels, block_type):
        return LinearClassifier(in_channels, num_classes)
    return Rule("supervised", (Unit((0, 1, 2, 3), decoder=head),),
                cross_entropy_loss(views), views=views, takes_labels=True)


# ----------------------------------------------------------------------------- loading
def _import_path(method):
    module_name, _, attr = method.partition(":")
    if not module_name or not attr:
        raise RuleError(f"method {method!r}: an import path is 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RuleError(f"method {method!r}: cannot import {module_name} ({e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RuleError(f"method {method!r}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    return obj


def _entry_point(method):
    eps = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
           if ep.name == method]
    if not eps:
        return None
    if len(eps) > 1:
        raise RuleError(f"method {method!r}: {len(eps)} '{ENTRY_POINT_GROUP}' entry points "
                        f"have this name ({', '.join(ep.value for ep in eps)}); use an import "
                        f"path instead")
    try:
        return eps[0].load()
    except (ImportError, AttributeError) as e:
        raise RuleError(f"method {method!r}: entry point {eps[0].value} cannot be loaded "
                        f"({e})") from None


def available():
    """Registered names and installed entry points, for error messages."""
    names = list(RULES)
    names += sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
                    if ep.name not in RULES)
    return names


def find_factory(method):
    """The Rule or factory that `method` names: a registered name, an import path
    ('pkg.mod:obj') or a `loco_det.rules` entry point."""
    if not isinstance(method, str) or not method:
        raise RuleError(f"unknown method {method!r}")
    if method in RULES:
        return RULES[method]
    if ":" in method:
        return _import_path(method)
    obj = _entry_point(method)
    if obj is None:
        raise RuleError(f"unknown method {method!r}; choose one of: {', '.join(available())}, "
                        f"or an import path 'package.module:rule'")
    return obj


def rule_needs(method):
    """The RuleNeeds of the rule `method` names (see `find_factory`): its factory's `needs`,
    the defaults (RuleNeeds()) for a rule or factory that declares none."""
    obj = find_factory(method)
    if isinstance(obj, Rule):
        return RuleNeeds(takes_labels=obj.takes_labels)
    return getattr(obj, "needs", None) or RuleNeeds()


def registered_needs():
    """{name: RuleNeeds} of the registered rules (their options are config keys)."""
    return {name: factory.needs for name, factory in RULES.items()}


def load_rule(method, ctx=None):
    """The validated Rule named by `method` (see `find_factory`), built with `ctx`."""
    ctx = ctx or RuleContext()
    obj = find_factory(method)
    if isinstance(obj, Rule):
        rule = obj
    elif callable(obj):
        try:
            rule = obj(ctx)
        except RuleError as e:
            raise RuleError(f"method {method!r}: {e}") from None
        if not isinstance(rule, Rule):
            raise RuleError(f"method {method!r}: the factory returned {type(rule).__name__}, "
                            f"not a loco_det.pretrain.rules.Rule")
    else:
        raise RuleError(f"method {method!r} is a {type(obj).__name__}, not a Rule or a "
                        f"factory returning one")
    validate_rule(rule, ctx, method)
    needs = getattr(obj, "needs", None)
    if needs is not None and needs.takes_labels != rule.takes_labels:
        raise RuleError(f"method {method!r}: its needs say takes_labels={needs.takes_labels}, "
                        f"the rule it built says {rule.takes_labels}")
    return rule


def validate_rule(rule, ctx, method=None):
    """Raise RuleError (one line) unless `rule` is one PretrainModel can run for ctx.arch."""
    where = f"method {method or rule.name!r}"
    if rule.granularity not in GRANULARITIES:
        raise RuleError(f"{where}: granularity {rule.granularity!r} is not one of "
                        f"{', '.join(GRANULARITIES)}")
    if rule.views not in (1, 2):
        raise RuleError(f"{where}: views {rule.views!r} is not 1 or 2")
    if not callable(rule.loss):
        raise RuleError(f"{where}: loss is not callable")
    units = tuple(rule.units)
    if not units:
        raise RuleError(f"{where}: no units")
    top = ctx.num_pieces(rule.granularity) - 1
    prev = None
    for k, unit in enumerate(units):
        if not isinstance(unit, Unit):
            raise RuleError(f"{where}: unit {k + 1} is a {type(unit).__name__}, not a Unit")
        p = tuple(unit.pieces)
        if not p or any(not isinstance(i, int) for i in p) \
                or p != tuple(range(p[0], p[0] + len(p))):
            raise RuleError(f"{where}: unit {k + 1} pieces {p} are not a run of consecutive "
                            f"piece indices")
        if p[0] < 0 or p[-1] > top:
            raise RuleError(f"{where}: unit {k + 1} pieces {p} outside 0..{top} "
                            f"({rule.granularity} pieces of {ctx.arch})")
        if prev is None and p[0] != 0:
            raise RuleError(f"{where}: the first unit must start at piece 0, not {p[0]}")
        if prev is not None:
            if p[0] <= prev[0] or p[-1] <= prev[-1]:
                raise RuleError(f"{where}: unit {k + 1} {p} must start and end above unit {k} "
                                f"{prev}")
            if p[0] > prev[-1] + 1:
                raise RuleError(f"{where}: gap between unit {k} {prev} and unit {k + 1} {p}: "
                                f"pieces {prev[-1] + 1}..{p[0] - 1} would not be trained")
        d = unit.decoder
        if isinstance(d, dict):
            bad = sorted(set(d) - set(DECODER_KEYS))
            if bad:
                raise RuleError(f"{where}: unit {k + 1} decoder option {bad[0]!r} is not one of "
                                f"{', '.join(DECODER_KEYS)}")
        elif d is not None and not callable(d):
            raise RuleError(f"{where}: unit {k + 1} decoder must be None, a dict of options or "
                            f"a factory, not {type(d).__name__}")
        prev = p
    if prev[-1] != top:
        raise RuleError(f"{where}: the last unit ends at piece {prev[-1]}, not at the top piece "
                        f"{top}: pieces above it would not be trained")
