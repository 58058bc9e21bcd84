"""One torchvision ResNet trained by a learning rule: PretrainModel runs every rule's step.

The encoder is cut into pieces as in the LoCo paper (docs/pretraining.md): its four stages

    S1 = stem (conv1, bn1, relu, maxpool) + layer1   ("res2")
    S2 = layer2 ("res3"),  S3 = layer3 ("res4"),  S4 = layer4 ("res5")

or, at block granularity, the stem and every residual block. A learning rule (rules.py) is a
list of units, each a run of consecutive pieces with its own decoder and loss, consecutive units
overlapping by zero or more pieces. The registered rules:

    e2e : {S1..S4}                  one NT-Xent loss at the top (SimCLR)
    gim : {S1} {S2} {S3} {S4}       each unit's input detached
    loco: {S1,S2} {S2,S3} {S3,S4}   each unit's input detached; S2 and S3 shared by two units
    supervised: {S1..S4}            cross-entropy on the ImageFolder labels; the "decoder" is one
                                    linear classifier on the globally pooled res5 features
                                    (torchvision's own head, so the trained network *is* a
                                    torchvision classifier)
    loco_overlap2: {S1,S2,S3} {S2,S3,S4}
    loco_blocks: LoCo over residual blocks, units of UNIT_LENGTH pieces overlapping by OVERLAP

`PretrainModel.forward_backward(view1, view2, labels)` runs one step's forward and backward and
leaves the gradients in `.grad` (no optimizer step, no zero_grad); its class docstring gives the
schedule. The encoder stays a plain torchvision ResNet (its unused `fc` included) so that
`encoder.state_dict()` loads with `strict=True` into `torchvision.models.resnetXX()`.

Schedules (MODEL.LOCO_SCHEDULE: how the shared pieces' backward is organised; all give the same
gradients, see tests/test_pretrain_model.py; measured trade-offs: tools/bench_pretrain.py). Written
for LoCo's stages; in general "shared stage" is any segment in two or more units, "S2" in
"hybrid" is every shared segment starting in the lower half of the pieces, and the "_stem"
variants apply when the first segment is more than the stem alone. Rules without shared pieces
(e2e, gim, supervised) have nothing to schedule and run plain, one backward per unit:

    "fused"       every stage's forward runs once; a shared stage keeps its graph until the
                  upper unit's gradient arrives, then computes its weight gradient once from the
                  sum of both units' output gradients. Only the input-gradient path of the lower
                  unit (to feed the stage below) is computed separately. Least compute, but S2's
                  saved activations stay alive while S1 (the largest) runs its backward.
    "recompute"   a shared stage frees its activations right after the lower unit's
                  input-gradient path and recomputes its forward inside the upper unit for the
                  fused weight gradient: one extra forward of S2 and of S3.
    "hybrid"      "recompute" for S2 (its activations are what sits on top of S1's at the
                  peak) and "fused" for S3 (the most FLOPs, little memory): the memory of
                  "recompute", one extra forward of S2 only.
    "fused_stem"  "fused", plus the stem (conv1/bn1/relu/maxpool: in ResNet-50 10 % of the
                  saved activations for 3 % of the FLOPs, the most memory per FLOP anywhere)
                  keeps only its output during the step and is recomputed when S1's backward
                  reaches it: about the time of "fused" and the peak memory of "hybrid"; each
                  idea used where it pays most.
    "hybrid_stem" "hybrid" plus the stem recompute: the least memory.

Measured with the hand-written e2e/gim/loco step functions this model replaced, with
tools/bench_pretrain.py (ResNet-50, 224 px, 16 images, this project's 2-core CPU shared with
other jobs, load average 4-8; three runs), step time / peak memory against e2e:

    fused 1.18-1.29 / 0.84-0.87     recompute 1.36-1.40 / 0.74-0.77   hybrid 1.23-1.37 / 0.75
    fused_stem 1.15-1.27 / 0.76-0.78                  hybrid_stem 1.22-1.59 / 0.66-0.68

On the quiet machine (one run): fused 1.17 / 0.81, recompute 1.24 / 0.71, hybrid 1.17 / 0.71,
fused_stem 1.10 / 0.73, hybrid_stem 1.16 / 0.64. Memory repeats within a few hundredths; wall
time moves with the neighbours' load (one thread, less disturbed: fused 1.17, fused_stem
1.14-1.18). "fused" does strictly less work than "fused_stem": the stem's recomputation costs
~3-4 % of a step.

Recomputed forwards do not update BatchNorm running statistics twice: every stage's statistics
move exactly once per step, as in a plain forward.
"""
import contextlib

import torch
import torch.nn as nn
import torchvision

from ..records import STAGES
from .heads import DECODER_DEFAULTS, Decoder, check_choice as _check_choice
from .rules import RuleContext, RuleError, load_rule

from .. import ARCHS  # noqa: F401  (one list for every tool; re-exported)
LOCO_SCHEDULES = ("fused", "recompute", "hybrid", "fused_stem", "hybrid_stem")
NUM_STAGES = len(STAGES)


def build_encoder(arch):
    """A randomly initialised torchvision ResNet with its own parameter names."""
    _check_choice("architecture", arch, ARCHS)
    return getattr(torchvision.models, arch)(weights=None)


def run_stem(encoder, x):
    return encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))


def run_stage(encoder, stage, x):
    """Forward of stage `stage` (0-based: 0 = stem + layer1, ..., 3 = layer4) of a torchvision
    ResNet. Looks the modules up on every call so that in-place module swaps (SyncBatchNorm
    conversion) are seen."""
    if stage == 0:
        return encoder.layer1(run_stem(encoder, x))
    return getattr(encoder, f"layer{stage + 1}")(x)


def stage_channels(encoder):
    """Output channels of the four stages (e.g. 256/512/1024/2048 for ResNet-50)."""
    channels = []
    for stage in range(NUM_STAGES):
        last = getattr(encoder, f"layer{stage + 1}")[-1]
        conv = last.conv3 if hasattr(last, "conv3") else last.conv2
        channels.append(conv.out_channels)
    return channels


@contextlib.contextmanager
def frozen_bn_stats(module):
    """Run a forward without moving BatchNorm running statistics: a recomputed forward must not
    count the same batch twice."""
    bns = [m for m in module.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


# ----------------------------------------------------------------------------- pieces
def piece_atoms(encoder, granularity):
    """The encoder's pieces, each a list of atoms ("stem", "layerN" or "layerN.i"), bottom-up:
    "stage": S1 = stem + layer1, S2..S4 = layer2..layer4; "block": the stem, then every
    residual block."""
    if granularity == "stage":
        return [["stem", "layer1"], ["layer2"], ["layer3"], ["layer4"]]
    pieces = [["stem"]]
    for stage in range(1, NUM_STAGES + 1):
        pieces += [[f"layer{stage}.{i}"] for i in range(len(getattr(encoder, f"layer{stage}")))]
    return pieces


def atom_modules(encoder, atom):
    if atom == "stem":
        return [encoder.conv1, encoder.bn1]
    layer, _, index = atom.partition(".")
    module = getattr(encoder, layer)
    return [module[int(index)] if index else module]


def run_atom(encoder, atom, x):
    """Forward of one atom; modules are looked up on every call (SyncBatchNorm conversion
    swaps them in place)."""
    if atom == "stem":
        return run_stem(encoder, x)
    return atom_modules(encoder, atom)[0](x)


def atom_channels(encoder, atom):
    """Output channels of an atom (the input width of a decoder placed on it)."""
    if atom == "stem":
        return encoder.conv1.out_channels
    last = atom_modules(encoder, atom)[0]
    if isinstance(last, nn.Sequential):
        last = last[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def run_piece(encoder, granularity, piece, x):
    """Forward of piece `piece` at `granularity` (the tests' reference uses it)."""
    for atom in piece_atoms(encoder, granularity)[piece]:
        x = run_atom(encoder, atom, x)
    return x


class Segment:
    """A maximal run of consecutive pieces trained by the same set of units: the model's unit
    of forward, backward, recompute and release (a segment always receives the gradients of
    all its units over its whole length, so it behaves as one piece)."""

    def __init__(self, index, pieces, atoms, members, starts):
        self.index = index
        self.pieces = pieces            # piece indices, bottom-up
        self.atoms = atoms              # atoms of those pieces
        self.members = members          # indices of the units containing it, ascending
        self.last_unit = members[-1]    # its weight gradient is complete after this unit
        # Some unit continues below it: its input needs a gradient.
        self.needs_input_grad = any(starts[k] < pieces[0] for k in members)
        self.shared = len(members) > 1
        self.recompute = False          # drop the graph after each use, recompute when needed
        self.stem = False               # forward the stem without a graph, recompute it


def make_segments(encoder, rule):
    atoms = piece_atoms(encoder, rule.granularity)
    starts = [u.pieces[0] for u in rule.units]
    member = [tuple(k for k, u in enumerate(rule.units) if p in u.pieces)
              for p in range(len(atoms))]
    segments, run = [], [0]
    for p in range(1, len(atoms) + 1):
        if p < len(atoms) and member[p] == member[run[0]]:
            run.append(p)
            continue
        segments.append(Segment(len(segments), tuple(run), [a for q in run for a in atoms[q]],
                                member[run[0]], starts))
        run = [p]
    return segments


def apply_schedule(segments, schedule, num_pieces):
    """Set each segment's recompute / stem flags from a LOCO_SCHEDULE name. Only rules with
    shared segments have anything to schedule; the others (e2e, gim, supervised) run plain."""
    if not any(s.shared for s in segments):
        return
    for s in segments:
        if s.shared:
            s.recompute = (schedule.startswith("recompute")
                           or (schedule.startswith("hybrid") and s.pieces[0] < num_pieces / 2))
    first = segments[0]
    first.stem = schedule.endswith("_stem") and first.atoms[0] == "stem" and len(first.atoms) > 1


def check_accum_steps(batch, accum_steps):
    """A batch of `batch` images splits into `accum_steps` equal micro-batches, or ValueError."""
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive integer, got {accum_steps!r}")
    if batch % accum_steps:
        raise ValueError(f"a batch of {batch} images does not split into {accum_steps} equal "
                         f"micro-batches (accum_steps={accum_steps})")


# ----------------------------------------------------------------------------- the model
class PretrainModel(nn.Module):
    """Encoder + one decoder per unit of a learning rule (rules.py); `forward_backward` is one
    training step's gradients.

    The schedule, for any rule whose units are runs of consecutive pieces going up with zero
    or more pieces of overlap (identical gradients to computing each unit separately; tests/
    test_pretrain_model.py):

    * units are processed bottom-up; each segment's forward runs once, when the first unit
      containing it needs it; its input is the detached output of the segment below (a leaf
      with a gradient when some unit continues below it);
    * per unit k: embeddings (its decoder on its top segment) and loss; then its gradient goes
      down its segments. If the top segment belongs to unit k alone the loss's backward runs
      straight through decoder and segment (e2e and gim are exactly one plain backward per
      unit). Otherwise the decoder's backward stops at a leaf and, per segment, only the input
      gradient is computed while upper units still contain the segment;
    * a segment's weight gradient is computed once, when its last unit's gradient arrives, from
      the sum of all its units' output gradients; then its activations are released;
    * a shared segment with `recompute` frees its graph after each input-gradient pass and
      recomputes its forward (BN statistics untouched) when it is needed again; `stem` keeps
      only the stem's output and recomputes the stem in the first segment's backward.

    `grads_ready_hook` (None, or a callable `hook(params)`) hears, during the step, of every
    list of parameters whose `.grad` no remaining loss of the step can change: a unit's decoder
    right after that unit's loss backward, a segment after its weight gradient (and its stem's
    recompute). Every parameter any loss reaches is reported exactly once per step; the
    encoder's unused `fc` never is (it never has a gradient). The training loop starts each
    list's all-reduce there, while the units above still compute (dist.GradientReducer).
    """

    def __init__(self, rule, arch, conv_blocks=0, mlp_layers=2, proj_dim=128, hidden_dim=0,
                 loco_schedule="fused_stem", method=None):
        super().__init__()
        _check_choice("loco_schedule", loco_schedule, LOCO_SCHEDULES)
        self.rule = rule
        self.method, self.arch = method or rule.name, arch
        self.temperature = getattr(rule.loss, "temperature", None)
        self.loco_schedule = loco_schedule
        # When set (e.g. torch.bfloat16), forwards run under torch.autocast; backwards outside.
        self.autocast_dtype = None
        # When set (a torch.amp.GradScaler, for float16 autocast), every loss is scaled by it
        # before its backward, so that small float16 gradients do not underflow to 0.
        self.loss_scaler = None
        self.grads_ready_hook = None
        # False during all but the last micro-batch of an accumulated step: gradients are final
        # (and grads_ready_hook fires) only in the last micro-batch's replay.
        self.last_micro_batch = True
        self.encoder = build_encoder(arch)
        self.units = tuple(tuple(u.pieces) for u in rule.units)
        self.unit_names = [f"unit{k + 1}" for k in range(len(self.units))]
        self.segments = make_segments(self.encoder, rule)
        pieces = piece_atoms(self.encoder, rule.granularity)
        apply_schedule(self.segments, loco_schedule, len(pieces))
        seg_of = {p: s for s in self.segments for p in s.pieces}
        # Per unit, its segments bottom-up.
        self.unit_segments = [[s.index for s in self.segments if k in s.members]
                              for k in range(len(self.units))]
        assert all(self.unit_segments[k][-1] == seg_of[u[-1]].index
                   for k, u in enumerate(self.units))
        block_type = type(self.encoder.layer1[0])
        defaults = {"conv_blocks": conv_blocks, "mlp_layers": mlp_layers, "proj_dim": proj_dim,
                    "hidden_dim": hidden_dim}
        if all(callable(u.decoder) for u in rule.units):
            extra = {k: v for k, v in defaults.items() if v != DECODER_DEFAULTS[k]}
            if extra:
                raise ValueError(f"decoder options {extra} do not apply to method "
                                 f"{self.method!r} (its units bring their own heads)")
        decoders = []
        for k, unit in enumerate(rule.units):
            channels = atom_channels(self.encoder, pieces[unit.pieces[-1]][-1])
            if callable(unit.decoder):
                decoder = unit.decoder(channels, block_type)
                if not isinstance(decoder, nn.Module):
                    raise RuleError(f"method {self.method!r}: unit {k + 1}'s decoder factory "
                                    f"returned {type(decoder).__name__}, not an nn.Module")
            else:
                options = {**defaults, **(unit.decoder or {})}
                try:
                    decoder = Decoder(channels, **options, block_type=block_type)
                except ValueError as e:
                    raise RuleError(f"method {self.method!r}: unit {k + 1}'s decoder: {e}") \
                        from None
            decoders.append(decoder)
        self.decoders = nn.ModuleList(decoders)

    # -- helpers -------------------------------------------------------------------------------
    def _autocast(self, x):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)

    def _stage(self, stage, x):
        with self._autocast(x):
            return run_stage(self.encoder, stage, x)

    def _run_atoms(self, atoms, x):
        with self._autocast(x):
            for atom in atoms:
                x = run_atom(self.encoder, atom, x)
        return x

    def _seg_modules(self, atoms):
        return [m for atom in atoms for m in atom_modules(self.encoder, atom)]

    def _params(self, atoms):
        return [p for m in self._seg_modules(atoms) for p in m.parameters() if p.requires_grad]

    def _grads_ready(self, params):
        # Only in the last micro-batch's replay are the gradients final (GradCache: every
        # replay adds into .grad).
        if self.grads_ready_hook is not None and self.last_micro_batch:
            self.grads_ready_hook([p for p in params if p.requires_grad])

    def _loss(self, k, h, labels, cached=None):
        """Unit k's loss on the output `h` of its top segment. `cached` (GradCache replay): the
        full batch's loss gradient w.r.t. these embeddings, which replaces the loss by the
        surrogate (z * cached).sum() (same gradient w.r.t. everything below z)."""
        with self._autocast(h):
            z = self.decoders[k](h)
        if cached is not None:
            return (z.float() * cached.float()).sum()
        return self._check_loss(k, self.rule.loss(z, labels))

    def _backward(self, loss):
        (loss if self.loss_scaler is None else self.loss_scaler.scale(loss)).backward()

    def _check_loss(self, k, loss):
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
            raise RuleError(f"method {self.method!r}: the loss of unit {k + 1} returned "
                            f"{type(loss).__name__}"
                            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}, "
                            f"not a scalar tensor with a gradient")
        return loss

    def forward(self, x):
        """Features of the four stages (res2..res5) for a batch of images."""
        feats = []
        for stage in range(NUM_STAGES):
            x = self._stage(stage, x)
            feats.append(x)
        return feats

    # -- one step ------------------------------------------------------------------------------
    def forward_backward(self, view1, view2, labels=None, accum_steps=1, as_floats=True):
        """Compute every unit's loss on two batches of views of the same images, accumulate all
        gradients into `.grad`, and return {"unit1": loss, ...} as floats (as_floats=False:
        as detached 0-d tensors on the device, so that the host need not wait for the GPU).

        Both views go through the encoder as one 2N batch, so BatchNorm sees both (SimCLR);
        a rule with views=1 uses view1 only. `labels` (N ImageFolder class indices) are passed
        to the rule's loss (the supervised rule needs them).

        accum_steps > 1: exact gradient accumulation (GradCache, Gao et al. 2021) over that many
        micro-batches of N / accum_steps images (both views of each): every unit's loss still
        sees the whole batch's negatives. See `_accumulate`."""
        if view1.shape != view2.shape:
            raise ValueError(f"views differ in shape: {tuple(view1.shape)} vs {tuple(view2.shape)}")
        n = view1.shape[0]
        if labels is not None and tuple(labels.shape) != (n,):
            raise ValueError(f"{n} views need {n} labels, got {tuple(labels.shape)}")
        if labels is None and self.rule.takes_labels:
            raise ValueError(f"method {self.method!r} needs {n} labels, got None")
        check_accum_steps(n, accum_steps)
        if labels is not None:
            labels = labels.to(view1.device)
        if accum_steps > 1:
            losses = self._accumulate(view1, view2, labels, accum_steps)
        else:
            x = torch.cat([view1, view2], dim=0) if self.rule.views == 2 else view1
            losses = self._step(x, labels)
        if not as_floats:
            return dict(zip(self.unit_names, losses))
        return {name: float(loss) for name, loss in zip(self.unit_names, losses)}

    def _micro_batch(self, view1, view2, labels, i, m):
        """Micro-batch i of size m: its slice of view1 and the same slice of view2 (positives
        stay paired), in the order the loss expects ([view1 part; view2 part])."""
        part = slice(i * m, (i + 1) * m)
        x = torch.cat([view1[part], view2[part]]) if self.rule.views == 2 else view1[part]
        return x, None if labels is None else labels[part]

    def _accumulate(self, view1, view2, labels, accum_steps):
        """GradCache: (1) every micro-batch's embeddings of every unit, without a graph and
        without moving BN running statistics (batch statistics per micro-batch, as the replay
        uses); (2) per unit, the loss of the whole batch and its gradient w.r.t. all embeddings,
        once; (3) each micro-batch replayed through the unchanged `_step` schedule with each
        unit's loss replaced by (z * cached gradient).sum(): the gradients accumulate into
        `.grad` and equal the full batch's, up to BN (statistics per micro-batch; running
        statistics move once per micro-batch). Returns the full batch's losses."""
        n, m = view1.shape[0], view1.shape[0] // accum_steps
        micro = [self._micro_batch(view1, view2, labels, i, m) for i in range(accum_steps)]
        with torch.no_grad(), frozen_bn_stats(self):
            embeddings = [self._embeddings(x) for x, _ in micro]
        losses, cached = [], []
        for k in range(len(self.units)):
            parts = [z[k] for z in embeddings]
            if self.rule.views == 2:  # [view1 all; view2 all], as one full-batch step
                parts = [z[:m] for z in parts] + [z[m:] for z in parts]
            # float32 (the loss computes in float32 anyway): a float16 gradient of the loss
            # w.r.t. the embeddings could underflow before the loss scale applies.
            z = torch.cat(parts).float().requires_grad_()
            loss = self._check_loss(k, self.rule.loss(z, labels))
            (grad,) = torch.autograd.grad(loss, z)
            losses.append(loss.detach())
            if self.rule.views == 2:
                cached.append([torch.cat([grad[i * m:(i + 1) * m], grad[n + i * m:n + (i + 1) * m]])
                               for i in range(accum_steps)])
            else:
                cached.append([grad[i * m:(i + 1) * m] for i in range(accum_steps)])
            del parts, z, loss, grad
        del embeddings
        try:
            for i, (x, y) in enumerate(micro):
                # Gradients are final only in the last replay (grads_ready_hook fires then).
                self.last_micro_batch = i == accum_steps - 1
                self._step(x, y, cached=[c[i] for c in cached])
        finally:
            self.last_micro_batch = True
        return losses

    def _embeddings(self, x):
        """Every unit's decoder output on batch x (plain forward; call without a graph)."""
        tops = {unit[-1]: k for k, unit in enumerate(self.units)}
        out = [None] * len(self.units)
        for piece, atoms in enumerate(piece_atoms(self.encoder, self.rule.granularity)):
            x = self._run_atoms(atoms, x)
            if piece in tops:
                with self._autocast(x):
                    out[tops[piece]] = self.decoders[tops[piece]](x)
        return out

    def _step(self, x, labels, cached=None):
        """One pass of the schedule over batch x; returns the units' losses. `cached` (one
        tensor per unit) replaces each unit's loss by its GradCache surrogate (`_loss`)."""
        segs = self.segments
        st = _StepState(len(segs))
        losses = []
        for k in range(len(self.units)):
            # Forward: the segments this unit needs that have not run yet (each runs once).
            top = self.unit_segments[k][-1]
            while st.forwarded <= top:
                self._forward_segment(st, x)
            # Embeddings, loss and the decoder's backward; g: unit k's gradient at the output
            # of the segment below its top (None when the unit ends there).
            seg = segs[top]
            if seg.members == (k,):
                # The top segment is this unit's alone: one backward through decoder and it.
                loss = self._loss(k, st.out[top], labels, None if cached is None else cached[k])
                self._backward(loss)
                self._grads_ready(self.decoders[k].parameters())
                g = st.inp[top].grad if seg.needs_input_grad else None
                self._finish(st, top, x)
            else:
                leaf = st.out[top].detach().requires_grad_()
                loss = self._loss(k, leaf, labels, None if cached is None else cached[k])
                self._backward(loss)
                self._grads_ready(self.decoders[k].parameters())
                g = self._through(st, top, k, leaf.grad, x)
                del leaf
            losses.append(loss.detach())
            del loss
            # Down the unit's remaining segments.
            for s in reversed(self.unit_segments[k][:-1]):
                g = self._through(st, s, k, g, x)
        return losses

    def _forward_segment(self, st, x):
        s = st.forwarded
        seg = self.segments[s]
        if s == 0:
            inp = x
        else:
            inp = st.out[s - 1].detach()
            if seg.needs_input_grad:
                inp.requires_grad_()
        st.inp[s] = inp
        if seg.stem:
            # The stem holds ~10 % of ResNet-50's saved activations for ~3 % of its FLOPs: keep
            # only its output now, recompute it when this segment's backward reaches it.
            with torch.no_grad():
                h = self._run_atoms(seg.atoms[:1], inp)
            st.stem_leaf = h.requires_grad_()
            st.out[s] = self._run_atoms(seg.atoms[1:], st.stem_leaf)
        else:
            st.out[s] = self._run_atoms(seg.atoms, inp)
        if s > 0 and st.finished[s - 1]:
            st.out[s - 1] = None  # kept (detached) only to be this segment's input
        st.forwarded += 1

    @contextlib.contextmanager
    def _graph(self, st, s):
        """Segment s's (output, input) with a graph: the kept one, or recomputed (BN running
        statistics restored once the backward inside the block has run)."""
        if st.out[s].grad_fn is not None:
            yield st.out[s], st.inp[s]
            return
        seg = self.segments[s]
        with frozen_bn_stats(nn.ModuleList(self._seg_modules(seg.atoms))):
            inp = st.inp[s].detach().requires_grad_(seg.needs_input_grad)
            yield self._run_atoms(seg.atoms, inp), inp

    def _through(self, st, s, k, g, x):
        """Unit k's gradient `g` at segment s's output: add it to the segment's sum; compute
        the weight gradient if k is the segment's last unit; return unit k's gradient at the
        segment's input if unit k continues below (else None)."""
        seg = self.segments[s]
        down = self.units[k][0] < seg.pieces[0]
        if k != seg.last_unit:
            # An upper unit still contains this segment: input gradient only; keep the sum.
            st.acc[s] = g if st.acc[s] is None else st.acc[s].add_(g)
            if not down:
                return None
            with self._graph(st, s) as (out, inp):
                (g_in,) = torch.autograd.grad(out, inp, g, retain_graph=not seg.recompute)
            if seg.recompute:
                st.out[s] = st.out[s].detach()
                st.inp[s] = st.inp[s].detach()
            return g_in
        # Last unit of the segment: weight gradient once, from the sum of its units' gradients.
        # In place: the sum is ours (a leaf's .grad or an input gradient) and no longer needed.
        alone = st.acc[s] is None
        total = g if alone else st.acc[s].add_(g)
        st.acc[s] = None
        params = self._params(seg.atoms[1:] if seg.stem else seg.atoms)
        extra = [st.stem_leaf] if seg.stem else []
        g_in = None
        with self._graph(st, s) as (out, inp):
            if down and alone:
                torch.autograd.backward(out, total, inputs=params + extra + [inp])
                g_in = inp.grad
            else:
                if down:
                    (g_in,) = torch.autograd.grad(out, inp, g, retain_graph=True)
                torch.autograd.backward(out, total, inputs=params + extra)
            del out, inp
        del total, g
        self._finish(st, s, x)
        return g_in

    def _finish(self, st, s, x):
        """After segment s's weight gradient: recompute the stem for its own, release, and
        report the segment's gradients final."""
        seg = self.segments[s]
        st.finished[s] = True
        # The output's value stays (without graph) while the segment above has not run yet.
        value = st.out[s].detach() if st.forwarded == s + 1 < len(st.out) else None
        st.out[s] = st.inp[s] = None
        if seg.stem:
            stem_grad = st.stem_leaf.grad
            st.stem_leaf = None
            stem = nn.ModuleList(self._seg_modules(seg.atoms[:1]))
            with frozen_bn_stats(stem):
                out = self._run_atoms(seg.atoms[:1], x)
                torch.autograd.backward(out, stem_grad,
                                        inputs=[p for p in stem.parameters() if p.requires_grad])
        st.out[s], st.acc[s] = value, None
        self._grads_ready(self._params(seg.atoms))


class _StepState:
    """Per-segment tensors of one step: input (leaf), output (with graph while needed), the
    sum of the units' output gradients received so far."""

    def __init__(self, n):
        self.inp = [None] * n
        self.out = [None] * n
        self.acc = [None] * n
        self.finished = [False] * n
        self.stem_leaf = None
        self.forwarded = 0


def build_model(method, arch, conv_blocks=0, mlp_layers=2, proj_dim=128, hidden_dim=0,
                temperature=0.1, loco_schedule="fused_stem", num_classes=None, **options):
    """Encoder (torchvision `arch`) + per-unit decoders for learning rule `method`.

    method: a registered rule (e2e, gim, loco, supervised, loco_overlap2, loco_blocks), an
    import path 'package.module:rule' or a `loco_det.rules` entry point (see rules.py);
    arch: resnet18 | resnet34 | resnet50 | resnet101. Decoder options are the defaults of every
    unit (e2e included, for a fair baseline; a rule may override them per unit): conv_blocks
    0/1/2 stride-2 residual blocks, an MLP of mlp_layers (2 or 4) Linear layers, hidden width
    hidden_dim (0: the unit's output channels), output proj_dim. loco_schedule: see the module
    doc (rules without shared pieces ignore it); the default "fused_stem" is the schedule that
    meets the LoCo memory target (peak memory <= 0.80x e2e) and the time target (<= 1.15x
    e2e) only with `.grad` None before each step: the target is below its FLOP ratio (1.18x
    e2e, 1.17x for "fused"; docs/measurements.md). num_classes: the
    labels' classes, for rules that take labels. `options`: the rule's own options by name
    (rules.RuleNeeds.options: "supervised" takes supervised_views, 2 = both views or 1 = view1
    only; "loco_blocks" unit_length and overlap, in pieces); a rule reads only its own.
    """
    _check_choice("architecture", arch, ARCHS)
    ctx = RuleContext(arch=arch, temperature=temperature, num_classes=num_classes,
                      options=options)
    rule = load_rule(method, ctx)
    return PretrainModel(rule, arch, conv_blocks=conv_blocks, mlp_layers=mlp_layers,
                         proj_dim=proj_dim, hidden_dim=hidden_dim, loco_schedule=loco_schedule,
                         method=method)
