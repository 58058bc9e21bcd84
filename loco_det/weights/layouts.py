"""Checkpoints of other libraries: reading one without running code from it, and finding the
ResNet encoder in it.

- `load_checkpoint`: `torch.load(weights_only=True)`, and where a file also holds objects of other
  classes (DINO's `args`, Lightning's hyper-parameters...), the same load with those objects as
  inert placeholders; plain pickles through the restricted unpickler (safe_load.py), safetensors
  with their own loader; one-line errors for missing / corrupt / truncated / hostile files and
  for files already in Detectron2's format;
- `extract_encoder`: the encoder in the layouts of torchvision, timm, Lightning, solo-learn,
  mmselfsup / MMPretrain, VISSL, MoCo v1-v3, DINO / iBOT, SwAV / BYOL and loco_det
  (docs/formats.md, "Accepted checkpoint layouts"), refusing ambiguity with the flag that
  resolves it, and listing what it drops (projection heads, decoders, `fc`, training state);
- `check_finite`: NaN / Inf weights are refused, naming the tensors.
"""
import builtins
import collections
import pickle
import re
import warnings

import numpy as np
import torch

from ..utils import LocoError
from .resnet import METADATA_KEY
from .safe_load import load_pkl, torch_load_weights

# Top-level entries that are training state, listed as one dropped item each.
_TRAINING_STATE = {"optimizer", "optimizer_states", "scheduler", "lr_scheduler", "lr_schedulers",
                   "rng", "scaler", "grad_scaler", "amp", "fp16_scaler", "loops", "callbacks",
                   "message_hub"}

_ANCHOR = "layer1.0.conv1.weight"
_RESNET_KEY = re.compile(r"^(conv1\.|bn1\.|layer[1-4]\.)")

# Copies of the encoder that a method keeps beside the trained one (dotted path components).
# By default the other candidate is taken, as each method's own evaluation does: MoCo v1/v2
# `encoder_k`, MoCo v3 and mmselfsup `momentum_encoder`, solo-learn `momentum_backbone`, BYOL's
# target network.
MOMENTUM_COPIES = ("encoder_k", "momentum_encoder", "momentum_backbone", "target_encoder",
                   "target_network", "target_net")

# DINO / iBOT keep both networks; DINO evaluates (and releases) the teacher.
TEACHER_STUDENT = ("teacher", "student")

# Globals that exist to run code: a checkpoint asking for one is refused outright. Every other
# global that torch.load(weights_only=True) refuses becomes an inert `_Opaque` placeholder,
# registered with torch's own weights-only unpickler for that one load.
_REFUSED_MODULES = {"os", "posix", "nt", "sys", "subprocess", "shutil", "runpy", "importlib",
                    "pickle", "_pickle", "code", "codeop", "socket", "ctypes", "pty", "marshal",
                    "webbrowser", "pdb", "multiprocessing"}
# Plain data types an object may hold (an nn.Module's sets); calling them allocates nothing
# unbounded (bytes and bytearray, which take a size, stay placeholders).
_PLAIN_BUILTINS = {"set", "frozenset", "slice", "range", "complex"}
_REFUSED_BUILTINS = {"eval", "exec", "compile", "open", "__import__", "getattr", "setattr",
                     "delattr", "globals", "locals", "vars", "input", "breakpoint", "exit", "quit"}


class _Opaque:
    """Stands in for an object of a class the converter does not import (argparse.Namespace of
    DINO's / timm's `args`, Lightning's hyper-parameters, mmengine's logging buffers...).

    Why: those objects are not weights, but a full unpickle would import and run their classes'
    code. The placeholder records what the pickle hands it (arguments, state, items) and runs
    nothing, so the tensors around it load and the object itself is reported as left unread.
    """

    _name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_opaque"] = {"args": list(args), "items": {}, "list": []}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_opaque"]["state"] = state

    def __setitem__(self, key, value):
        self.__dict__["_opaque"]["items"][key] = value

    def append(self, value):
        self.__dict__["_opaque"]["list"].append(value)

    def extend(self, values):
        self.__dict__["_opaque"]["list"].extend(values)


    def __repr__(self):
        return f"<{self._name}, not unpickled>"


def _placeholder(full_name):
    """A fresh placeholder class per load: what one file does to it touches no other load."""
    return type(full_name.rsplit(".", 1)[-1], (_Opaque,), {"_name": full_name})


class _RefusedGlobal(Exception):
    pass


def _stand_in(full):
    """The object registered for global `full`: a plain builtin type, a refusal, or a
    placeholder class."""
    module, _, name = full.rpartition(".")
    if module in ("builtins", "__builtin__") and name in _PLAIN_BUILTINS:
        return getattr(builtins, name)
    if module in ("builtins", "__builtin__") and name in _REFUSED_BUILTINS \
            or module.split(".")[0] in _REFUSED_MODULES:
        raise _RefusedGlobal(full)
    return _placeholder(full)


class _PlaceholderUnpickler(pickle._Unpickler):
    """torch's weights-only globals, a fresh inert placeholder class (per load) for every other
    class or function, and a refusal for the few that exist to run code. torch.load wraps this
    (pickle_module) and adds its own storage handling.

    BUILD follows torch's weights-only rules: only on tensors, parameters, OrderedDicts,
    placeholders and instances of torch's allowed classes, never on a class, a function or any
    other module-level object (which would change it for the rest of the process). That is why
    this is the pure-Python unpickler: the C one cannot restrict BUILD."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stand_ins = {}

    def find_class(self, module, name):
        from torch._weights_only_unpickler import _get_allowed_globals

        full = f"{module}.{name}"
        allowed = _get_allowed_globals()
        if full in allowed:
            return allowed[full]
        if full not in self._stand_ins:
            self._stand_ins[full] = _stand_in(full)
        return self._stand_ins[full]

    def _load_build(self):
        from torch._weights_only_unpickler import _get_allowed_globals

        inst = self.stack[-2]
        kind = type(inst)
        if kind in (torch.Tensor, torch.nn.Parameter, collections.OrderedDict) \
                or isinstance(inst, _Opaque) \
                or (kind in _get_allowed_globals().values() and not isinstance(inst, type)
                    and not callable(inst)):
            return pickle._Unpickler.load_build(self)
        raise pickle.UnpicklingError(f"BUILD on {kind.__name__} is not allowed")

    dispatch[pickle.BUILD[0]] = _load_build


class _PlaceholderPickleModule:
    """The `pickle_module` handed to torch.load for the placeholder path."""

    __name__ = "loco_det_placeholder_pickle"
    Unpickler = _PlaceholderUnpickler

    @staticmethod
    def load(f, **kwargs):
        return _PlaceholderUnpickler(f, **kwargs).load()


def _sniff(path):
    """'zip' (torch.save), 'safetensors' or 'pickle' (plain pickle or legacy torch.save)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise LocoError(f"input checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise LocoError(f"input checkpoint path is a directory, not a file: {path}") from None
    except OSError as e:
        raise LocoError(f"cannot read input checkpoint {path}: {e.strerror or e}") from None
    if not head:
        raise LocoError(f"cannot load input checkpoint {path}: file is empty")
    if head.startswith(b"PK"):
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "zip"  # torch.load names the damage
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise LocoError(f"{path} is a TorchScript archive (torch.jit.save): it holds code, "
                            "which the converter does not load; save the model's state_dict() "
                            "with torch.save and convert that")
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 27):
        return "safetensors"
    return "pickle"


def load_checkpoint(path):
    """Read a checkpoint without running code from it. Returns `(obj, placeholders)`.

    Order: `torch.load(weights_only=True)`; if torch refuses only because the file also holds
    objects of other classes (DINO's and timm's `args` Namespace, Lightning hyper-parameters,
    mmengine's message hub), the same torch.load with `_PlaceholderUnpickler`, where each such
    object is an inert placeholder (fresh for each load): its class is named, never imported,
    and BUILD follows torch's weights-only rules. `.safetensors` files
    are read with safetensors. A Detectron2 `.pkl` is refused as already converted.
    `placeholders` lists the class names that were left unread.
    """
    kind = _sniff(path)
    if kind == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise LocoError(f"{path} is a safetensors file; install safetensors to read it "
                            "(pip install safetensors)") from None
        try:
            return load_file(path, device="cpu"), []
        except Exception as e:  # safetensors raises its own SafetensorError (not exported stably)
            raise LocoError(f"cannot load {path}: corrupt safetensors file ({e})") from None
    if kind == "pickle":
        try:
            data = load_pkl(path)
        except LocoError as e:
            if str(e).startswith("refusing to load"):
                raise  # a plain pickle asking for what no weights file needs (a legacy
                       # torch.save file starts with a bare number, which loads)
            data = None  # not a plain-data pickle: a legacy torch.save file, or corrupt
        if isinstance(data, dict):  # (a legacy torch.save file starts with a bare number)
            _refuse_detectron2(path, data)
            raise LocoError(f"{path} is a plain pickle without torch tensors, not a training "
                            "checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about protocols on corrupt files too
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch_load_weights(path, "input checkpoint"), []
    except LocoError as refusal:
        if not isinstance(refusal.__context__, pickle.UnpicklingError):
            raise
        first_refusal = refusal
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=False,
                             pickle_module=_PlaceholderPickleModule)
    except _RefusedGlobal as e:
        raise LocoError(f"refusing to load {path}: it asks to import {e} while unpickling, which "
                        "only code (never weights) needs; nothing from the file was run") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, RuntimeError, OverflowError, MemoryError, ImportError,
            RecursionError):
        raise first_refusal from None
    return obj, sorted(_placeholder_names(obj))


def _placeholder_names(obj, seen=None):
    seen = set() if seen is None else seen
    found = set()
    if id(obj) in seen:
        return found
    seen.add(id(obj))
    if isinstance(obj, _Opaque):
        found.add(obj._name)
        obj = obj.__dict__["_opaque"]
    if isinstance(obj, dict):
        for value in obj.values():
            found |= _placeholder_names(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            found |= _placeholder_names(value, seen)
    return found


def _refuse_detectron2(path, data):
    """A Detectron2 weights file (ours or anyone's) given as input: one line saying so."""
    model = data.get("model", data.get("blobs")) if isinstance(data, dict) else None
    if not isinstance(model, dict):
        return
    meta = data.get(METADATA_KEY) if isinstance(data.get(METADATA_KEY), dict) else None
    if meta:
        origin = f"converted by loco_det from {meta.get('source')}, {meta.get('arch')}"
    else:
        origin = f"author {data.get('__author__', 'unknown')}"
    raise LocoError(f"{path} is already in Detectron2's weights format ({origin}): nothing to "
                    "convert; give it to tools/train_net.py as MODEL.WEIGHTS directly")


_MODULE_CONTAINERS = ("_parameters", "_buffers", "_modules")


def _flatten(obj, prefix="", out=None, ancestors=None, depth=0):
    """Every tensor inside nested dicts / lists / placeholders, by dotted path.

    A placeholder's state is walked too, without the `_modules` / `_parameters` / `_buffers`
    levels, so a whole pickled `nn.Module` yields its ordinary state-dict names. An object
    reached twice (pickle keeps shared objects shared) is listed under each of its paths;
    `ancestors` only stops cycles.
    """
    out = {} if out is None else out
    ancestors = set() if ancestors is None else ancestors
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj
        return out
    if id(obj) in ancestors or depth > 12:
        return out
    ancestors.add(id(obj))
    if isinstance(obj, _Opaque):
        inner = obj.__dict__["_opaque"]
        state = inner.get("state")
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if isinstance(state, dict):
            for key in _MODULE_CONTAINERS:
                if isinstance(state.get(key), dict):
                    _flatten(state[key], prefix, out, ancestors, depth + 1)
            rest = {k: v for k, v in state.items() if k not in _MODULE_CONTAINERS}
            _flatten(rest, prefix, out, ancestors, depth + 1)
        _flatten(inner["items"], prefix, out, ancestors, depth + 1)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(value, f"{prefix}{key}." if key != "" else prefix, out, ancestors, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _flatten(value, f"{prefix}{i}.", out, ancestors, depth + 1)
    ancestors.discard(id(obj))
    return out


def _components(prefix):
    return [c for c in prefix.split(".") if c]


def _candidates(tensors):
    """Dotted prefixes under which a torchvision-style ResNet sits: `P.layer1.0.conv1.weight`
    with a stem `P.conv1.*` beside it (or, if no prefix has one, `layer1` alone, so that
    infer_resnet can say what the stem is missing)."""
    anchored = sorted({k[:-len(_ANCHOR)] for k in tensors if k.endswith(_ANCHOR)
                       and (k == _ANCHOR or k[:-len(_ANCHOR)].endswith("."))})
    with_stem = [p for p in anchored if any(k.startswith(p + "conv1.") for k in tensors)]
    return with_stem or anchored


def _same_weights(a, b, tensors):
    """Whether candidates `a` and `b` hold identical ResNet tensors (one module saved twice,
    as mmselfsup 0.x's `backbone.` and `encoder_q.0.`, or a momentum copy at step 0)."""
    ka = {k[len(a):] for k in tensors if k.startswith(a) and _RESNET_KEY.match(k[len(a):])}
    kb = {k[len(b):] for k in tensors if k.startswith(b) and _RESNET_KEY.match(k[len(b):])}
    return ka == kb and all(tensors[a + k].shape == tensors[b + k].shape
                            and not tensors[a + k].is_meta  # shapes only: values unknown
                            and torch.equal(tensors[a + k], tensors[b + k]) for k in ka)


def _preference(path):
    """Which of identical candidates names the encoder: the trained one, the teacher, the
    shortest path."""
    parts = set(_components(path))
    return (bool(parts & set(MOMENTUM_COPIES)), "student" in parts, len(path), path)


def _dedupe(candidates, tensors):
    """Collapse candidates holding identical weights; returns (representatives, {copy: rep})."""
    reps, copies = [], {}
    for c in sorted(candidates, key=_preference):
        rep = next((r for r in reps if _same_weights(r, c, tensors)), None)
        if rep is None:
            reps.append(c)
        else:
            copies[c] = rep
    return sorted(reps), copies


def _match_prefix(candidates, tensors, prefix):
    """Candidates selected by `--prefix`: the full dotted path, or its tail after any containers
    (so `module.encoder_q.` names `state_dict.module.encoder_q.`)."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    for found in ([c for c in candidates if c == prefix],
                  [c for c in candidates if prefix and c.endswith("." + prefix)]):
        if found:
            return found, prefix
    # No complete ResNet there: take the keys anyway, so that infer_resnet names what is missing.
    if any(k.startswith(prefix) for k in tensors):
        return [prefix], prefix
    tails = sorted({k[:k.index("." + prefix) + 1] + prefix for k in tensors if "." + prefix in k})
    return tails, prefix


def _describe(candidates, tensors):
    parts = []
    for c in candidates:
        n = sum(1 for k in tensors if k.startswith(c) and _RESNET_KEY.match(k[len(c):]))
        parts.append(f"{c!r} ({n} tensors)")
    return ", ".join(parts)


def _take_flags(candidates):
    """The --take values that tell these candidates apart (a path component unique to each)."""
    flags = []
    for c in candidates:
        mine = [p for p in _components(c)
                if sum(p in _components(o) for o in candidates) == 1]
        flags.append(f"--take {mine[0]}" if mine else f"--prefix {c}")
    return flags


def _choose(candidates, tensors, source, prefix, take):
    """The encoder's dotted prefix, and why it was chosen (for the report)."""
    if prefix is not None and take is not None:
        raise LocoError("give either --take or --prefix, not both (--prefix names the encoder "
                        "completely)")
    if prefix is not None:
        found, full = _match_prefix(candidates, tensors, prefix)
        if not found:
            sample = ", ".join(list(tensors)[:5])
            raise LocoError(f"no key in {source} starts with prefix {full!r} (keys look like: "
                            f"{sample}; ResNets found: {_describe(candidates, tensors) or 'none'})")
        if len(found) > 1:
            raise LocoError(f"prefix {full!r} matches several encoders in {source}: "
                            f"{_describe(found, tensors)}; give the full prefix with --prefix")
        return found[0], "--prefix"
    if not candidates:
        sample = ", ".join(list(tensors)[:5])
        raise LocoError(f"{source} is not a torchvision ResNet checkpoint: no key ending in "
                        f"'{_ANCHOR}' (keys look like: {sample}); use --prefix if the encoder "
                        "sits under an unusual prefix")
    if take is not None:
        found = [c for c in candidates if take in _components(c)]
        if len(found) != 1:
            what = "none" if not found else "several"
            raise LocoError(f"--take {take}: {what} of the encoders in {source} "
                            f"({_describe(candidates, tensors)}) lie under '{take}'; use "
                            f"{' or '.join(_take_flags(candidates))}")
        return found[0], f"--take {take}"
    if len(candidates) == 1:
        return candidates[0], "the only ResNet"
    candidates, copies = _dedupe(candidates, tensors)
    if len(candidates) == 1:
        return candidates[0], f"the only ResNet (also stored as {', '.join(map(repr, copies))})"
    firsts = {_components(c)[0] for c in candidates if _components(c)}
    if len(candidates) == 2 and firsts == set(TEACHER_STUDENT):
        return next(c for c in candidates if _components(c)[0] == "teacher"), \
            "teacher (default; --take student for the other)"
    online = [c for c in candidates if not set(_components(c)) & set(MOMENTUM_COPIES)]
    if len(online) == 1:
        return online[0], "the trained encoder, not its momentum copy"
    raise LocoError(f"{source} holds {len(candidates)} candidate encoders: "
                    f"{_describe(candidates, tensors)}; choose one with "
                    f"{' or '.join(_take_flags(candidates))}")


def _sequential_resnet(tensors):
    """Prefixes of a ResNet kept as `nn.Sequential(*resnet.children())` (stem 0/1, layers 4..7)."""
    out = []
    for k in tensors:
        if k.endswith("4.0.conv1.weight"):
            p = k[:-len("4.0.conv1.weight")]
            if (p == "" or p.endswith(".")) and tensors.get(p + "0.weight") is not None \
                    and tensors[p + "0.weight"].dim() == 4 and p + "1.running_mean" in tensors \
                    and p + "7.0.conv1.weight" in tensors:
                out.append(p)
    return out


def _unsequence(tensors, prefixes):
    """Rename `P0.` -> `Pconv1.`, `P1.` -> `Pbn1.`, `P4.`..`P7.` -> `Player1.`..`Player4.`."""
    names = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
    out = {}
    for key, value in tensors.items():
        for p in prefixes:
            head, _, rest = key[len(p):].partition(".")
            if key.startswith(p) and head in names and rest:
                key = f"{p}{names[head]}.{rest}"
                break
        out[key] = value
    return out


def layout_name(obj, path, tensors):
    """Which library's layout this is, from the structure alone (reported, and recorded)."""
    top = obj if isinstance(obj, dict) else {}
    first = _components(path)[0] if _components(path) else ""
    if first == "encoder" and ("method" in top or "arch" in top) and path == "encoder.":
        return "loco_det pretraining checkpoint"
    if first == "classy_state_dict":
        return "VISSL (classy_state_dict trunk)"
    if first in TEACHER_STUDENT:
        return f"DINO / iBOT ({first})"
    if "encoder_q" in _components(path):
        return "MoCo v1/v2 (query encoder)"
    if "base_encoder" in _components(path):
        return "MoCo v3 (base encoder)"
    if "pytorch-lightning_version" in top or ("state_dict" in top and "global_step" in top):
        # solo-learn's methods all keep an online `classifier` beside the `projector`, and the
        # momentum ones a `momentum_backbone`.
        heads = {k.split(".")[1] for k in tensors if k.startswith("state_dict.") and "." in k[11:]}
        solo = "momentum_backbone" in heads or {"projector", "classifier"} <= heads
        return "solo-learn (PyTorch Lightning)" if solo else "PyTorch Lightning"
    if first == "state_dict" and isinstance(top.get("meta"), dict) and "backbone" in _components(path):
        return "MMPretrain / mmselfsup (mmengine)"
    if "state_dict_ema" in top or first == "state_dict_ema" or (first == "state_dict"
                                                                and "version" in top):
        return "timm training checkpoint"
    if path == "":
        return "plain state dict (torchvision / timm)"
    if path in ("module.", "state_dict.module."):
        return "DistributedDataParallel state dict (module.; SwAV / BYOL style)"
    return "wrapped state dict"


def extract_encoder(obj, source="checkpoint", prefix=None, take=None):
    """Find the torchvision ResNet state dict inside a loaded checkpoint.

    Returns `(state_dict, dropped, info)`: the encoder's tensors with torchvision names, the
    names of everything left out (heads, decoders, fc, training state, other encoders), and
    `{"prefix", "method", "arch_hint", "layout", "reason"}`.

    How: every tensor is named by its dotted path through the nested dicts (VISSL's
    `classy_state_dict.base_model.model.trunk._feature_blocks.`, DINO's `teacher.module.backbone.`,
    Lightning's `state_dict.backbone.`...); each prefix under which `layer1.0.conv1.weight` sits
    is a candidate encoder. One candidate is taken; two or more are resolved by the layouts'
    own conventions (DINO: teacher; MoCo / solo-learn / mmselfsup / BYOL: not the momentum copy)
    or else refused, listing them and the `--take` / `--prefix` that picks one. `prefix` is a
    full dotted path or its tail; `take` a path component (`teacher`, `state_dict_ema`...).
    """
    if isinstance(obj, _Opaque):  # a whole pickled nn.Module: its state, never its code
        pickled_module, obj = obj._name, {"": obj}
    elif not isinstance(obj, dict):
        raise LocoError(f"{source} holds a {type(obj).__name__}, not a dict of weights")
    else:
        pickled_module = None
    if isinstance(obj.get("model"), dict) and not _is_tensor_dict(obj["model"]) and obj["model"] \
            and all(isinstance(v, np.ndarray) for v in obj["model"].values()):
        _refuse_detectron2(source, obj)
    tensors = _flatten(obj)
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise LocoError(f"no tensors found in {source} (top-level keys: {keys})")
    sequential = _sequential_resnet(tensors)
    if sequential:
        tensors = _unsequence(tensors, sequential)
    candidates = _candidates(tensors)
    if not candidates and prefix is None:
        _refuse_detectron2_names(source, tensors)
    path, reason = _choose(candidates, tensors, source, prefix, take)

    info = {"method": None, "arch_hint": None, "prefix": path, "reason": reason}
    if path == "encoder." and isinstance(obj.get("encoder"), dict) and ("method" in obj or "arch" in obj):
        info.update(method=obj.get("method"), arch_hint=obj.get("arch"))
    elif isinstance(obj.get("arch"), str):
        info["arch_hint"] = obj["arch"]
    info["layout"] = (f"pickled model object ({pickled_module}; read as data, not unpickled)"
                      if pickled_module else layout_name(obj, path, tensors))

    others = [c for c in candidates if c != path and not path.startswith(c) and not c.startswith(path)]
    other_counts = dict.fromkeys(others, 0)
    training = dict.fromkeys(_TRAINING_STATE, 0)
    state, dropped = {}, []
    for key, value in tensors.items():
        if key.startswith(path) and _RESNET_KEY.match(key[len(path):]):
            state[key[len(path):]] = value
            continue
        owner = next((c for c in others if key.startswith(c) and _RESNET_KEY.match(key[len(c):])), None)
        top = key.split(".", 1)[0]
        if owner is not None:
            other_counts[owner] += 1
        elif top in training:
            training[top] += 1
        else:
            dropped.append(key)
    dropped += [f"{k} (training state, {n} tensors)" for k, n in training.items() if n]
    dropped += [f"{c}* ({'the same weights again' if _same_weights(c, path, tensors) else 'another ResNet'}"
                f", {n} tensors)" for c, n in other_counts.items() if n]
    if not state:
        raise LocoError(f"{source} holds no ResNet weights under prefix {path!r}")
    return state, dropped, info


def _refuse_detectron2_names(source, tensors):
    """A Detectron2 training checkpoint (`model_final.pth`): already Detectron2's names."""
    if any(re.search(r"(^|\.)res[2-5]\.0\.conv1\.weight$", k) for k in tensors) and \
            any(k.endswith("stem.conv1.weight") for k in tensors):
        raise LocoError(f"{source} already has Detectron2's names (stem., res2..res5): it is a "
                        "Detectron2 checkpoint, nothing to convert; give it to "
                        "tools/train_net.py as MODEL.WEIGHTS directly")


def check_finite(state, source):
    """Refuse weights holding NaN or Inf, naming the tensors (a diverged or damaged run)."""
    bad = []
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad.append(f"{key} ({int((~finite).sum())} of {value.numel()})")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise LocoError(f"{source}: non-finite (NaN/Inf) values in {len(bad)} encoder "
                        f"tensor{'s' if len(bad) > 1 else ''}: {shown}; the checkpoint itself "
                        "is broken (diverged or damaged training), nothing was written")


def _is_tensor_dict(obj):
    return isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())
