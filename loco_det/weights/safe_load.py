"""Reading files that come from someone else (configs, weights pickles) without running their code.

Researchers exchange configs and checkpoints, so every such file is treated as hostile:

- YAML configs are read with `yaml.safe_load`, file by file along the `_BASE_` chain. A Python
  tag (`!!python/object/apply:os.system`, `!!python/name:...`) is refused with one line naming
  the file, the line and the tag, before Detectron2 or fvcore sees the file (Detectron2's
  `merge_from_file` would otherwise fall back to `yaml.unsafe_load`).
- Weights pickles are read by `load_pkl`, a restricted unpickler that is also memory-safe. It
  resolves only the names a numpy weights pickle uses, and none of them reaches numpy directly:
  `numpy.dtype`, `_reconstruct`, `scalar` and `_frombuffer` build inert placeholders whose
  arguments and BUILD state are checked (a numeric or string dtype, exactly as numpy itself
  writes it; data of exactly the declared size), and the arrays are then made with
  `numpy.frombuffer` from plain bytes. A pickle can therefore not hand numpy an object dtype or
  altered dtype flags, the known way to make `scalar` dereference a chosen pointer. What comes
  out is only dicts, lists, tuples, sets, strings, bytes, numbers, None and numeric arrays.
- `.pth` files are read by `torch_load_weights`: torch's own weights-only unpickler (tensors,
  containers, primitives), with one-line errors.

Errors are `LocoError`s with one line naming the file.
"""
import collections
import io
import os
import pickle
import pickletools
import re
import reprlib

import numpy as np
import yaml

from ..utils import ConfigError, LocoError

__all__ = ["load_yaml", "yaml_chain", "load_pkl", "loads_pkl"]


# ----------------------------------------------------------------------------- YAML

def _one_line(text):
    return " ".join(str(text).split())


def load_yaml(path):
    """`yaml.safe_load` of one file; a Python tag or a syntax error is one ConfigError line
    `FILE:LINE: ...` naming the tag. Nothing in the file is constructed beyond plain data."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a file: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason})") from None
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        tag = re.search(r"tag '([^']*)'", str(e.problem))
        what = f"tag {tag.group(1).replace('tag:yaml.org,2002:', '!!')}" if tag else _one_line(
            e.problem)
        raise ConfigError(f"{path}{line}: refusing YAML {what}: configs are plain data, and "
                          "this tag would construct a Python object (run code); nothing from "
                          "the file was run") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"{path}{line}: invalid YAML: {_one_line(problem)}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None


def yaml_chain(path):
    """[(file, data), ...] from `path` down its `_BASE_` chain, every file read with
    `load_yaml`. Same path rule as Detectron2 and fvcore (relative to the including file, `~`
    expanded); a URL base ends the chain (fvcore loads it, safely, with allow_unsafe=False).
    A missing base or a loop is one ConfigError line."""
    chain, seen = [], set()
    current = path
    while current:
        if not os.path.isfile(current):
            if current == path:
                raise ConfigError(f"config file not found: {path}")
            raise ConfigError(f"{path}: _BASE_ file not found: {current}")
        real = os.path.realpath(current)
        if real in seen:
            raise ConfigError(f"{path}: _BASE_ chain loops at {current}")
        seen.add(real)
        data = load_yaml(current)
        chain.append((current, data))
        base = data.get("_BASE_") if isinstance(data, dict) else None
        if not base:
            break
        if not isinstance(base, str):
            raise ConfigError(f"{current}: _BASE_ must be a file name, got {base!r}")
        if base.startswith(("http://", "https://")):
            break
        base = os.path.expanduser(base)
        if not base.startswith("/"):
            base = os.path.join(os.path.dirname(current), base)
        current = os.path.normpath(base)
    return chain


# ----------------------------------------------------------------------------- pickles

# Errors that a malformed pickle stream (or a refused value) raises while loading.
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
                  AttributeError, OverflowError, MemoryError, ImportError, RecursionError,
                  NotImplementedError)

# dtype specs as numpy pickles them: kind + item size. Numeric kinds and fixed-size strings
# only: no object ('O'), void/structured ('V'), datetime or sub-array dtype.
_DTYPE_SPEC = re.compile(r"^[biufcSU][0-9]{1,5}$")
# Arrays larger than this are refused before anything is allocated (a weights file holds
# nothing near it; it bounds what a crafted shape can ask for).
_MAX_ELEMENTS = 1 << 34


class _Refused(Exception):
    """A value a weights pickle cannot legitimately hold; becomes a one-line LocoError."""


class _Dtype:
    """What `numpy.dtype(spec, align, copy)` builds while unpickling: only a record of its
    arguments and, after BUILD, of a state checked against numpy's own for that spec."""

    __slots__ = ("spec", "byteorder")

    def __init__(self, spec):
        self.spec = spec
        self.byteorder = None

    def __setstate__(self, state):
        canonical = np.dtype(self.spec).__reduce__()[2]
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3):
            raise _Refused(f"dtype {self.spec}: unexpected pickled state {_short(state)}")
        if state[1] not in ("<", ">", "|", "="):
            raise _Refused(f"dtype {self.spec}: byte order {state[1]!r}")
        if state[2:] != canonical[2:]:   # sub-array, names, fields, size, alignment, flags
            raise _Refused(f"dtype {self.spec}: state {_short(state)} differs from numpy's "
                           f"own {_short(canonical)} (altered flags or fields)")
        self.byteorder = state[1]

    def real(self):
        dtype = np.dtype(self.spec)
        if self.byteorder in ("<", ">"):
            dtype = dtype.newbyteorder(self.byteorder)
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise _Refused(f"dtype {self.spec} is not a plain numeric or string dtype")
        return dtype


class _Array:
    """What `_reconstruct(ndarray, (0,), b'b')` builds: the array is made at BUILD, from the
    state's bytes, with `numpy.frombuffer` (never numpy's own __setstate__)."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]   # (version, shape, dtype, fortran, data)
        if not (isinstance(state, tuple) and len(state) == 4):
            raise _Refused(f"array: unexpected pickled state {_short(state)}")
        shape, dtype, fortran, data = state
        self.array = _make_array(data, dtype, shape, "F" if fortran else "C")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 40, 40


def _short(value):
    """A bounded repr for messages (a crafted state can be huge or deeply nested)."""
    return _REPR.repr(value)


def _as_bytes(data):
    if isinstance(data, str):   # Python 2 pickles, read with encoding latin1
        return data.encode("latin1")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    raise _Refused(f"array data must be bytes, got {type(data).__name__}")


def _make_array(data, dtype, shape, order):
    if not isinstance(dtype, _Dtype):
        raise _Refused(f"array dtype must be a pickled numpy dtype, got {type(dtype).__name__}")
    dtype = dtype.real()
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise _Refused(f"array shape must be a tuple of non-negative integers, got {_short(shape)}")
    if order not in ("C", "F"):
        raise _Refused(f"array order must be C or F, got {_short(order)}")
    count = 1
    for n in shape:
        count *= n
    if count > _MAX_ELEMENTS:
        raise _Refused(f"array of shape {shape} is too large")
    data = _as_bytes(data)
    if len(data) != count * dtype.itemsize:
        raise _Refused(f"array of shape {shape} and dtype {dtype.str} needs "
                       f"{count * dtype.itemsize} bytes, the pickle gives {len(data)}")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order=order).copy()


def _dtype(spec, align=False, copy=True, *rest):
    if isinstance(spec, bytes):
        spec = spec.decode("latin1")
    if rest or not isinstance(spec, str) or not _DTYPE_SPEC.match(spec):
        raise _Refused(f"dtype {_short(spec)} is not a plain numeric or string dtype")
    if align not in (False, True) or copy not in (False, True):
        raise _Refused("dtype: unexpected arguments")
    np.dtype(spec)   # an unknown spec (e.g. "f3") is numpy's TypeError here
    return _Dtype(spec)


def _reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise _Refused("_reconstruct: only numpy's own (ndarray, (0,), b'b') is allowed")
    return _Array()


def _scalar(dtype, data=None):
    if data is None:
        raise _Refused("scalar: no data")
    return _make_array(data, dtype, (), "C")[()]


def _frombuffer(buf, dtype, shape, order):
    return _make_array(buf, dtype, shape, order)


def _encode(text, encoding="utf-8", errors="strict"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _Refused("_codecs.encode: only text to latin1 bytes is allowed")
    return text.encode("latin1")


def _bytes(*args):
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray, list)):
        return bytes(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin1")
    raise _Refused("bytes(): only bytes, a list of byte values or latin1 text")


def _ordered_dict(*args):
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict))):
        raise _Refused("OrderedDict(): only a list of pairs")
    return collections.OrderedDict(*args)


def _set(kind):
    def build(*args):
        if len(args) > 1 or (args and not isinstance(args[0], (list, tuple))):
            raise _Refused(f"{kind.__name__}(): only a list of items")
        return kind(*args)
    return build


def _complex(*args):
    if len(args) > 2 or not all(type(a) in (int, float) for a in args):
        raise _Refused("complex(): only numbers")
    return complex(*args)


class _NdarraySentinel:
    """`numpy.ndarray` as a pickle names it: only the first argument of `_reconstruct`."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused("BUILD on numpy.ndarray")


_NDARRAY = _NdarraySentinel()


class _Global:
    """A resolved global: calling it calls the checked stand-in. Fresh per lookup, and BUILD on
    it is refused, so a pickle cannot change anything module-level."""

    __slots__ = ("name", "fn")

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __setstate__(self, state):
        raise _Refused(f"BUILD on {self.name}")


# Globals a weights pickle needs, each mapped to its checked stand-in (numpy 1.x spells them
# numpy.core.*, numpy 2 numpy._core.*; Python 2 pickles __builtin__). Plain dict, list, tuple,
# str, bytes, int, float, bool and None have their own opcodes and need no global.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,   # protocol 5
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _encode,   # protocol <= 2 writes bytes as latin1 text
    ("builtins", "bytes"): _bytes,
    ("__builtin__", "bytes"): _bytes,
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "complex"): _complex,
    ("__builtin__", "complex"): _complex,
    ("builtins", "set"): _set(set),   # protocol <= 3 writes sets as set([...])
    ("__builtin__", "set"): _set(set),
    ("builtins", "frozenset"): _set(frozenset),
    ("__builtin__", "frozenset"): _set(frozenset),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")  # latin1: Python 2 (Caffe2) pickles
        self._path = path

    def find_class(self, module, name):
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise LocoError(
                f"refusing to load {self._path}: it asks to import {module}.{name} while "
                "unpickling (only dicts, lists, tuples, strings, numbers and numpy arrays are "
                "allowed in weights files); nothing from the file was run")
        return _Global(f"{module}.{name}", fn)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in weights pickles")


_PLAIN = (str, bytes, bytearray, int, float, complex, bool, type(None), np.ndarray, np.generic)


def _finish(obj):
    """The loaded object with every placeholder replaced by what it stands for, checked to hold
    only plain data. Shared objects stay shared; a cycle through a tuple is refused."""
    memo, in_progress = {}, set()

    def walk(x):
        key = id(x)
        if key in memo:
            return memo[key]
        if isinstance(x, _Array):
            if x.array is None:
                raise _Refused("an array was never given its data")
            memo[key] = x.array
            return x.array
        if isinstance(x, _Dtype):
            memo[key] = x.real()
            return memo[key]
        if isinstance(x, np.ndarray) and x.dtype.hasobject:
            raise _Refused("object array")
        if isinstance(x, _PLAIN):
            return x
        if type(x) in (dict, collections.OrderedDict):
            out = type(x)()
            memo[key] = out
            for k, v in x.items():
                k = walk(k)
                if isinstance(k, np.ndarray):
                    raise _Refused("an array as a dictionary key")
                out[k] = walk(v)
            return out
        if type(x) is list:
            out = []
            memo[key] = out
            for v in x:
                out.append(walk(v))
            return out
        if type(x) in (tuple, set, frozenset):
            if key in in_progress:
                raise _Refused("a tuple or set that contains itself")
            in_progress.add(key)
            items = [walk(v) for v in x]
            in_progress.discard(key)
            if type(x) is not tuple and any(isinstance(v, np.ndarray) for v in items):
                raise _Refused("an array inside a set")
            memo[key] = type(x)(items)
            return memo[key]
        what = x.name if isinstance(x, _Global) else type(x).__name__
        raise _Refused(f"a bare {what} object, which no weights file holds")

    return walk(obj)


_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


def _prescan(f):
    """Walk the opcodes without running any (pickletools) and refuse memo indices beyond what
    the stream has built so far: CPython's unpickler grows its memo table to the index it is
    given, so one opcode could make it touch gigabytes. Legitimate picklers number the memo
    in order."""
    start = f.tell()
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(f)):
            if op.name in _MEMO_PUTS and int(arg) > count:
                raise _Refused(f"memo index {arg} at opcode {count} (pickles number their memo "
                               "in order)")
    except ValueError as e:   # pickletools' words for a stream that ends early
        if any(w in str(e) for w in ("not enough data", "remain", "no newline", "exhausted")):
            raise EOFError(str(e)) from None
        raise
    f.seek(start)


def _load_stream(f, path):
    try:
        _prescan(f)
        return _finish(_RestrictedUnpickler(f, path).load())
    except _Refused as e:
        raise LocoError(f"refusing to load {path}: {_one_line(e)}; nothing from the file was "
                        "run") from None
    except _PICKLE_ERRORS as e:
        truncated = isinstance(e, EOFError) or "truncated" in str(e)
        kind = "empty or truncated" if truncated else "corrupt or not a pickle"
        detail = f" ({type(e).__name__}: {_one_line(e)[:200]})" if str(e) else ""
        raise LocoError(f"cannot load {path}: file is {kind}{detail}") from None


def load_pkl(path):
    """Unpickle a weights `.pkl` to plain data (dicts, lists, tuples, strings, bytes, numbers,
    None, numeric numpy arrays and scalars), running nothing from the file (module docstring).
    A missing, empty, truncated, corrupt or refused file is a one-line `LocoError`."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return _load_stream(f, path)
    except FileNotFoundError:
        raise LocoError(f"weights file not found: {path}") from None
    except IsADirectoryError:
        raise LocoError(f"weights path is a directory, not a file: {path}") from None
    except OSError as e:
        raise LocoError(f"cannot read weights file {path}: {e.strerror or e}") from None


def loads_pkl(data, name="<bytes>"):
    """`load_pkl` for pickled bytes already in memory (`name` is used in errors)."""
    return _load_stream(io.BytesIO(data), name)


def _weights_only_reason(message):
    """The informative part of torch's multi-line weights_only failure message."""
    keep = []
    for line in str(message).splitlines():
        line = line.strip()
        if not line or line.startswith(("Weights only load failed", "Check the documentation")):
            continue
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
            if not line:
                continue
        keep.append(line)
    return " ".join(keep) or str(message).splitlines()[0]


def torch_load_weights(path, what="checkpoint"):
    """`torch.load(path, map_location="cpu", weights_only=True)` with one-line `LocoError`s.

    Why weights_only: a `.pth` is a pickle too; torch's weights-only unpickler accepts tensors,
    containers and primitives, which is all a state dict or a Detectron2 `model_final.pth`
    (model, optimizer, scheduler, iteration) holds. A file needing more is refused rather than
    trusted. Missing / truncated / corrupt files name the path.
    """
    import torch   # here: the YAML and pickle readers above need no torch

    path = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as e:
        raise torch_load_error(path, e, what) from None


# What torch.load raises on a missing, corrupt, truncated or refused file.
TORCH_LOAD_ERRORS = (OSError, EOFError, pickle.UnpicklingError, RuntimeError, ValueError, KeyError,
                     IndexError, TypeError, AttributeError)


def torch_load_error(path, e, what="checkpoint"):
    """The one-line `LocoError` for `e`, one of TORCH_LOAD_ERRORS from loading `path`."""
    if isinstance(e, FileNotFoundError):
        return LocoError(f"{what} not found: {path}")
    if isinstance(e, IsADirectoryError):
        return LocoError(f"{what} path is a directory, not a file: {path}")
    if isinstance(e, OSError):
        return LocoError(f"cannot read {what} {path}: {e.strerror or e}")
    if isinstance(e, EOFError):
        return LocoError(f"cannot load {what} {path}: file is empty or truncated")
    if isinstance(e, pickle.UnpicklingError):
        return LocoError(
            f"cannot load {what} {path} with torch.load(weights_only=True): "
            f"{_weights_only_reason(e)} (the file is corrupt, or holds Python objects other than "
            "tensors and containers, which loco_det does not unpickle)")
    first = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
    return LocoError(f"cannot load {what} {path}: file is corrupt or truncated ({first})")
