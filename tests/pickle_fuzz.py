"""Fuzzer for loco_det's weights unpickler, run as a child process by tests/test_security.py.

    python tests/pickle_fuzz.py SEED COUNT

Sends COUNT pickles through `loco_det.weights.safe_load.loads_pkl`: a third legitimate numpy pickles
(protocols 2, 4, 5), a third of them mutated (bytes flipped, inserted, cut, spliced), a third
written opcode by opcode from the allowed globals with random arguments and BUILD states
(object, void and structured dtype specs, altered flags, wrong sizes...). Every load must end in
a valid object or a one-line LocoError; anything else is printed and the exit status is 1. A
crash (a signal) shows as the child's death, which the test reports with SEED for replay.
"""
import os
import pickle
import random
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loco_det.weights.safe_load import loads_pkl  # noqa: E402
from loco_det.utils import LocoError  # noqa: E402

GLOBALS = [("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
           ("numpy.core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
           ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"), ("builtins", "bytes"),
           ("collections", "OrderedDict"), ("builtins", "complex"), ("__builtin__", "complex")]
SPECS = ["O", "O8", "V8", "f4", "f8", "i8", "u1", "b1", "U3", "S5", "c16", "M8", "f4,i4", "f3",
         "<f4", "(2,)f4"]


def legit(rng):
    dtypes = ["f4", ">f4", "i8", "u1", "?", "c8", "f2", "U3", "S4"]
    obj = {}
    for i in range(rng.randint(1, 4)):
        shape = tuple(rng.randint(0, 3) for _ in range(rng.randint(0, 3)))
        arr = np.zeros(shape, dtype=rng.choice(dtypes))
        if rng.random() < 0.3:
            arr = np.asfortranarray(arr)
        obj[f"k{i}"] = arr
    obj["s"] = np.float32(rng.random())
    obj["meta"] = {"a": [1, 2.5, "x", None], "t": (1, b"b")}
    return pickle.dumps(obj, protocol=rng.choice([2, 3, 4, 5]))


def mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if op < 0.4 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op < 0.6:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        elif op < 0.8 and len(data) > 2:
            del data[rng.randrange(len(data)):]
        else:
            other = legit(rng)
            cut = rng.randrange(len(other))
            data[rng.randrange(len(data) + 1):] = other[cut:]
    return bytes(data)


def _str(s):
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _value(rng, depth=0):
    r = rng.random()
    if r < 0.15:
        return _str(rng.choice(SPECS + ["<", ">", "|", "C", "F", "latin1", "b"]))
    if r < 0.3:
        return b"J" + struct.pack("<i", rng.choice([-1, 0, 1, 3, 8, 1 << 30, -(1 << 31)]))
    if r < 0.4:
        n = rng.choice([0, 1, 4, 8, 16])
        return b"C" + bytes([n]) + bytes(rng.randrange(256) for _ in range(n))
    if r < 0.5:
        return b"N"
    if r < 0.55:
        return rng.choice([b"\x88", b"\x89"])
    if r < 0.65:
        return b"}"
    if r < 0.7:
        return b"]"
    if depth < 3:
        items = b"".join(_value(rng, depth + 1) for _ in range(rng.randint(0, 8)))
        return b"(" + items + b"t"
    return b"N"


def _global(rng):
    module, name = rng.choice(GLOBALS)
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def generated(rng):
    """A random opcode program over the allowed globals, often in the shape of the known attack
    (dtype with a forged BUILD state handed to scalar / _reconstruct / _frombuffer)."""
    out = bytearray(b"\x80\x02")
    depth = 0
    for _ in range(rng.randint(1, 12)):
        r = rng.random()
        if r < 0.3:
            out += _global(rng)
            out += b"(" + b"".join(_value(rng) for _ in range(rng.randint(0, 4))) + b"tR"
            depth += 1
        elif r < 0.5 and depth:
            out += _value(rng) + b"b"   # BUILD on whatever is on top
        elif r < 0.6:
            out += b"cnumpy\ndtype\n" + _str(rng.choice(SPECS)) + b"\x89\x88\x87R"
            out += _value(rng) + b"b"
            depth += 1
        elif r < 0.7 and depth:
            out += b"2"    # DUP
            depth += 1
        elif r < 0.8 and depth >= 2:
            out += b"\x86"   # TUPLE2
            depth -= 1
        elif r < 0.9 and depth >= 2:
            out += b"R"      # REDUCE: call the item below with the top as arguments
            depth -= 1
        else:
            out += _value(rng)
            depth += 1
    if rng.random() < 0.2 and depth:
        out += b"0"    # POP
    return bytes(out + b".")


def main():
    seed, count = int(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    outcomes = {"ok": 0, "refused": 0}
    bad = 0
    for i in range(count):
        kind = i % 3
        data = legit(rng) if kind == 0 else mutate(rng, legit(rng)) if kind == 1 else generated(rng)
        try:
            loads_pkl(data, f"case{i}")
            outcomes["ok"] += 1
        except LocoError as e:
            if "\n" in str(e) or not str(e):
                print(f"case {i}: error is not one line: {e!r}")
                bad += 1
            outcomes["refused"] += 1
        except BaseException as e:   # anything but a valid load or a LocoError is a failure
            print(f"case {i} (seed {seed}): {type(e).__name__}: {e} :: {data!r}")
            bad += 1
    print(f"seed {seed}: {count} pickles, {outcomes['ok']} loaded, {outcomes['refused']} refused, "
          f"{bad} bad")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
