"""A file from someone else runs no code: configs, weights pickles, grids, planted links and
dataset folders. Each attack is a case with its one-line refusal and proof that nothing ran
(marker files absent, victims unchanged, no signal)."""
import collections
import contextlib
import io
import os
import pickle
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import yaml

from loco_det.weights.safe_load import loads_pkl, yaml_chain
from loco_det.utils import ConfigError, LocoError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
FROZEN = os.path.join(REPO, "det_configs", "cpu_synth_coco_R18_FPN_frozen.yaml")


def run(tool, *args, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(TOOLS, tool), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def one_error_line(proc):
    """The process failed (not by a signal) with exactly one `error:` line on stderr."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


# ----------------------------------------------------------------------------- YAML configs

TAGS = ['!!python/object/apply:os.system ["touch {marker}"]',
        '!!python/object/new:os.system ["touch {marker}"]',
        "!!python/name:os.system",
        "!!python/module:os",
        '!!python/object/apply:subprocess.call [["touch", "{marker}"]]']


def _chain(tmp_path, depth, tag, marker, base=FROZEN):
    """A config whose file `depth` levels down its _BASE_ chain holds `tag` (0: the top)."""
    files = []
    for level in range(depth + 1):
        folder = tmp_path / f"l{level}"
        folder.mkdir(exist_ok=True)
        files.append(folder / "cfg.yaml")
    for level, path in enumerate(files):
        parent = os.path.relpath(files[level + 1], path.parent) if level < depth else base
        text = f"_BASE_: {parent}\n"
        if level == depth:
            text += "SEED: " + tag.format(marker=marker) + "\n"
        path.write_text(text)
    return files[0], files[depth]


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("tag", TAGS)
def test_detectron2_config_with_python_tag_is_refused(tmp_path, tag, depth):
    from loco_det.detection.config import setup_cfg

    marker = tmp_path / "pwned"
    top, bad = _chain(tmp_path, depth, tag, marker)
    with pytest.raises(ConfigError) as err:
        setup_cfg(str(top))
    msg = str(err.value)
    assert "\n" not in msg and f"{bad}:2:" in msg and "!!python/" in msg, msg
    assert not marker.exists()


def test_train_net_refuses_tagged_config_resume_and_eval_only(tmp_path):
    """--config-file, and a run's own config.yaml reused with --resume / --eval-only."""
    marker = tmp_path / "pwned"
    top, bad = _chain(tmp_path, 1, TAGS[0], marker)
    line = one_error_line(run("train_net.py", "--config-file", top))
    assert f"{bad}:2: refusing YAML tag !!python/object/apply:os.system" in line
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        f"_BASE_: {FROZEN}\nSEED: " + TAGS[0].format(marker=marker) + "\n")
    for flag in ("--resume", "--eval-only"):
        line = one_error_line(run("train_net.py", flag, "--config-file", run_dir / "config.yaml",
                                  "OUTPUT_DIR", run_dir))
        assert "config.yaml:2: refusing YAML tag" in line
    assert not marker.exists()


def test_pretraining_recipe_with_python_tag_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    top, bad = _chain(tmp_path, 2, TAGS[1], marker,
                      base=os.path.join(REPO, "pretrain", "cpu_loco.yaml"))
    line = one_error_line(run("pretrain.py", "--config", top, "--output-dir", tmp_path / "o"))
    assert f"{bad}:2: refusing YAML tag !!python/object/new:os.system" in line
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_yaml_chain_reads_plain_configs_like_detectron2():
    chain = yaml_chain(os.path.join(REPO, "det_configs", "cpu_synth_coco_R18_FPN_frozen.yaml"))
    assert len(chain) >= 2 and all(isinstance(data, dict) for _, data in chain)


# ----------------------------------------------------------------------------- weights pickles

def _dtype_attack(spec="O", state=(3, "|", None, None, None, -1, -1, 0), data=b"A" * 8,
                  use="scalar"):
    """The known attack: numpy.dtype(spec, False, True) with a BUILD state, then scalar()."""
    def s(text):
        b = text.encode()
        return b"X" + len(b).to_bytes(4, "little") + b
    out = b"\x80\x02"
    if use == "scalar":
        out += b"cnumpy.core.multiarray\nscalar\n"
    else:
        out += b"cnumpy.core.numeric\n_frombuffer\n"
        out += b"C" + bytes([len(data)]) + data
    out += b"cnumpy\ndtype\n" + s(spec) + b"\x89\x88\x87R"
    out += pickle.dumps(state, protocol=2)[2:-1] + b"b"
    if use == "scalar":
        out += b"C" + bytes([len(data)]) + data + b"\x86R."
    else:
        out += b"K\x01\x85X\x01\x00\x00\x00C\x87R."
    return out


@pytest.mark.parametrize("spec,state,use", [
    ("O", (3, "|", None, None, None, -1, -1, 0), "scalar"),        # object dtype, flags cleared
    ("O8", (3, "|", None, None, None, -1, -1, 0), "scalar"),
    ("f8", (3, "<", None, None, None, -1, -1, 63), "scalar"),      # flags altered on a number
    ("f8", (3, "<", None, ("f8",), None, -1, -1, 0), "scalar"),    # names forged
    ("V8", (3, "|", None, None, None, 8, 1, 0), "scalar"),          # void
    ("f8", (3, "<", None, None, None, 16, 8, 0), "scalar"),         # item size forged
    ("O", (3, "|", None, None, None, -1, -1, 0), "frombuffer"),
    ("f8", (9, "<", None, None, None, -1, -1, 0), "frombuffer"),
])
def test_dtype_tricks_are_refused(spec, state, use):
    with pytest.raises(LocoError) as err:
        loads_pkl(_dtype_attack(spec, state, use=use), "evil.pkl")
    assert "\n" not in str(err.value) and "evil.pkl" in str(err.value)


def test_forged_array_state_and_build_on_globals_are_refused():
    arr = np.zeros((2, 3), dtype="f4")
    good = pickle.dumps({"w": arr}, protocol=2)
    # wrong data size: ask for 6 float32 with 4 bytes of data
    bad = good.replace(arr.tobytes(), b"\x00" * 4)  # latin1 text: same opcode, shorter
    cases = [bad,
             b"\x80\x02cnumpy\ndtype\n}b.",                   # BUILD on the global itself
             b"\x80\x02cnumpy\nndarray\n}b.",
             b"\x80\x02ccollections\nOrderedDict\n}b.",
             b"\x80\x02cbuiltins\nbytes\nJ\x00\x00\x00@\x85R.",   # bytes(2**30)
             b"\x80\x02cnumpy\ndtype\n.",                      # a bare global as the result
             b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.",
             b"\x80\x02N\x94r\xff\xff\xff\x7f."]                # memo index 2**31-1
    for data in cases:
        with pytest.raises(LocoError) as err:
            loads_pkl(data, "evil.pkl")
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_legitimate_weights_pickles_load_unchanged(protocol):
    obj = {"model": collections.OrderedDict(
        a=np.arange(6, dtype="f4").reshape(2, 3), b=np.asfortranarray(np.ones((3, 2), ">f8")),
        c=np.array(5, dtype="i8"), d=np.zeros((0, 4), "u1"), e=np.array(["ab", "c"]),
        f=np.array([True, False]), g=np.array([1 + 2j], "c8"), h=np.array([b"xy"], "S3")),
        "scalar": np.float32(2.5), "n": np.int64(-3), "__author__": "x", "t": (1, 2.0, None),
        "raw": b"bytes", "set": {1, 2}}
    back = loads_pkl(pickle.dumps(obj, protocol=protocol))
    assert back.keys() == obj.keys() and type(back["model"]) is collections.OrderedDict
    for key, value in obj["model"].items():
        got = back["model"][key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        np.testing.assert_array_equal(got, value)
        assert got.flags.writeable
    assert back["scalar"] == obj["scalar"] and back["scalar"].dtype == np.float32
    assert back["n"] == -3 and back["t"] == obj["t"] and back["raw"] == b"bytes"
    assert back["set"] == {1, 2}


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_pickles_end_in_a_load_or_one_line(seed):
    """Thousands of random and mutated pickles from the allowed names, in a child process: a
    signal (crash) would show as a negative return code. Replay: tests/pickle_fuzz.py SEED N."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "pickle_fuzz.py"),
                           str(seed), "3000"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"seed {seed}: rc {proc.returncode}\n{proc.stdout[-3000:]}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert "3000 pickles" in summary and " 0 bad" in summary, summary
    loaded = int(summary.split(", ")[1].split()[0])
    assert 500 < loaded < 3000, summary   # both outcomes were exercised


def test_convert_and_train_net_refuse_the_dtype_attack(tmp_path):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(_dtype_attack())
    line = one_error_line(run("convert_to_detectron2.py", evil, tmp_path / "out.pkl"))
    assert "refusing to load" in line and "dtype 'O'" in line
    assert not (tmp_path / "out.pkl").exists()
    line = one_error_line(run("train_net.py", "--config-file", FROZEN, "MODEL.WEIGHTS", evil,
                              "OUTPUT_DIR", tmp_path / "det"))
    assert "refusing to load" in line


def test_converter_fallback_never_builds_a_module_level_object(tmp_path):
    """A torch.save zip whose data.pkl BUILDs torch.serialization._get_layout (to poison its
    cache for the process) beside an object of an unknown class (which takes the fallback)."""
    import argparse

    import torch

    from loco_det.weights import convert

    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        contents = {n: z.read(n) for n in names}
    pkl = next(n for n in names if n.endswith("data.pkl"))
    poison = (b"ctorch.serialization\n_get_layout\n}X\x05\x00\x00\x00cacheK\x01sb0")
    assert contents[pkl].startswith(b"\x80\x02")
    contents[pkl] = b"\x80\x02" + poison + contents[pkl][2:]
    with zipfile.ZipFile(path, "w") as z:
        for n in names:
            z.writestr(n, contents[n])
    before = dict(vars(torch.serialization._get_layout))
    with pytest.raises(LocoError) as err:
        convert.load_checkpoint(str(path))
    assert "\n" not in str(err.value)
    assert dict(vars(torch.serialization._get_layout)) == before
    # the same file without the poison loads, the Namespace as an inert placeholder
    contents[pkl] = b"\x80\x02" + contents[pkl][2 + len(poison):]
    with zipfile.ZipFile(path, "w") as z:
        for n in names:
            z.writestr(n, contents[n])
    obj, placeholders = convert.load_checkpoint(str(path))
    assert placeholders == ["argparse.Namespace"] and torch.equal(obj["state_dict"]["w"],
                                                                  torch.zeros(2))


# ----------------------------------------------------------------------------- grids

def _grid(tmp_path, **sections):
    base = {"name": "g", "vars": {"data": "{out}/data"},
            "data": [{"name": "d", "command": ["python", "tools/make_synthetic_data.py", "--out",
                                               "{data}"], "creates": "{data}/meta.json"}],
            "pretrain": [{"methods": ["loco"], "recipe": "cpu_{method}.yaml",
                          "label": "{method}", "seeds": [0]}]}
    base.update(sections)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _grid_run(tmp_path, grid, *flags, dry=True):
    """The grid command's main() in this process, from the repository root as the tool runs:
    every refusal happens before any job starts, so a subprocess per case would only add an
    interpreter start (~5 s each here). A refusal that failed would still launch the jobs."""
    from loco_det.cli import run_command

    out = tmp_path / "out"
    argv = [str(grid), "--out", str(out), *(["--dry-run"] if dry else []), *map(str, flags)]
    stdout, stderr = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = run_command("grid", argv, script=True)
    finally:
        os.chdir(cwd)
    return types.SimpleNamespace(returncode=rc, stdout=stdout.getvalue(),
                                 stderr=stderr.getvalue()), out


@pytest.mark.parametrize("sections,expect", [
    ({"data": [{"name": "d", "command": ["sh", "-c", "touch {marker}"], "creates": "{out}/m"}]},
     "is not one of loco_det's tools"),
    ({"data": [{"name": "d", "command": ["python", "-c", "open('{marker}','w')"],
                "creates": "{out}/m"}]}, "is not one of loco_det's tools"),
    ({"data": [{"name": "d", "command": ["python", "tools/../../{marker}.py"],
                "creates": "{out}/m"}]}, "is not one of loco_det's tools"),
    ({"pretrain": [{"methods": ["loco"], "recipe": "cpu_loco.yaml", "label": "../../../x"}]},
     "'..' path component"),
    ({"pretrain": [{"methods": ["loco"], "recipe": "cpu_loco.yaml", "label": "/tmp/x"}]},
     "empty path component"),
    ({"pretrain": [{"methods": ["loco"], "recipe": "cpu_loco.yaml", "seeds": ["/../../x"]}]},
     "path component"),
    ({"env": {"LD_PRELOAD": "/tmp/x.so"}}, "LD_PRELOAD is not a variable"),
    ({"env": {"PYTHONPATH": "/tmp"}}, "PYTHONPATH is not a variable"),
    ({"readout": {"args": ["--output-dir", "/tmp/elsewhere"], "random_init": {"arch": "resnet18"}}},
     "set --output-dir again"),
    ({"pretrain": [{"methods": ["loco"], "recipe": "cpu_loco.yaml",
                    "overrides": ["--output-dir=/tmp/elsewhere"]}]}, "set --output-dir again"),
    ({"readout": {"args": ["--output", "/tmp/elsewhere"], "random_init": {"arch": "resnet18"}}},
     "set --output-dir again"),   # argparse takes the unambiguous prefix
    ({"pretrain": [{"methods": ["loco"], "recipe": "cpu_loco.yaml",
                    "overrides": ["--o", "/tmp/elsewhere"]}]}, "set --output-dir again"),
    ({"data": [{"name": "../../x", "command": ["python", "tools/make_digits.py", "--output-dir",
                                               "{out}/d"], "creates": "{out}/d/meta.json"}]},
     "'..' path component"),
    ({"slurm": {"setup": ["touch {marker}"]}}, "slurm: setup can run commands"),
    ({"slurm": {"additional_parameters": {"wrap": "touch {marker}"}}}, "slurm: wrap can run"),
    ({"slurm": {"additional_parameters": {"output": "/tmp/x.log"}}}, "slurm: output can run"),
])
def test_grid_refusals_are_listed_and_nothing_runs(tmp_path, sections, expect):
    """Every case in a dry run; the cases that would run something also for real."""
    marker = tmp_path / "pwned"
    real = "{marker}" in yaml.safe_dump(sections)
    sections = yaml.safe_load(yaml.safe_dump(sections).replace("{marker}", str(marker)))
    grid = _grid(tmp_path, **sections)
    for dry in (True, False) if real else (True,):
        proc, out = _grid_run(tmp_path, grid, dry=dry)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert any(expect in line for line in errors), proc.stderr
        assert errors[-1].endswith("nothing was run")
        assert not marker.exists() and not out.exists()


def test_grid_allow_flags_and_plugin_listing(tmp_path):
    grid = _grid(tmp_path, env={"PYTHONPATH": "/opt/x"},
                 data=[{"name": "d", "command": ["sh", "-c", "true"], "creates": "{out}/m"}],
                 pretrain=[{"methods": ["loco"], "recipe": "cpu_loco.yaml",
                            "overrides": ["MODEL.METHOD=mylab.rules:hebb",
                                          "DATA.ROOT={out}/train"]}])   # made by data job d
    proc, _ = _grid_run(tmp_path, grid, "--allow-commands", "--allow-env")
    assert proc.returncode == 0, proc.stderr
    assert "runs a command that is not a loco_det tool (allowed by --allow-commands): sh -c" \
        in proc.stdout
    assert "imports mylab.rules (its code runs when pretraining starts)" in proc.stdout


def test_grid_refuses_a_tagged_detection_config(tmp_path):
    marker = tmp_path / "pwned"
    top, _ = _chain(tmp_path, 1, TAGS[0], marker)
    grid = _grid(tmp_path, detection={"configs": [{"config": str(top)}]})
    proc, out = _grid_run(tmp_path, grid)
    assert proc.returncode == 1 and "refusing YAML tag" in proc.stderr
    assert not marker.exists() and not out.exists()


def test_grid_refuses_a_planted_link_where_it_writes(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    grid = _grid(tmp_path)
    out = tmp_path / "out"
    (out / "pretrain" / "loco").mkdir(parents=True)
    os.symlink(victim, out / "logs")
    os.symlink(victim, out / "pretrain" / "loco" / "seed0")
    proc, _ = _grid_run(tmp_path, grid, dry=False)
    assert proc.returncode == 1
    assert f"{out / 'logs'} is a symbolic link" in proc.stderr
    assert f"{out / 'pretrain' / 'loco' / 'seed0'} is a symbolic link" in proc.stderr
    assert os.listdir(victim) == []


# ----------------------------------------------------------------------------- planted links

def test_train_net_refuses_links_in_output_dir(tmp_path):
    """Detectron2's logger appends to OUTPUT_DIR/log.txt, its writer to metrics.json, the
    evaluator writes inference/*: a link planted at any of them (or deeper) is refused before
    anything is written. The tool once; the check train_net runs for the other names."""
    from loco_det.utils import check_output_dir

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "det"
    out.mkdir()
    os.symlink(victim, out / "log.txt")
    line = one_error_line(run("train_net.py", "--config-file", FROZEN, "OUTPUT_DIR", out,
                              "LOCO_DET.FROM_SCRATCH", "True"))
    assert f"holds a symbolic link {out / 'log.txt'}" in line
    for name in ("metrics.json", "inference", "inference/coco_instances_results.json"):
        other = tmp_path / name.replace("/", "_")
        (other / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
        os.symlink(victim, other / name)
        with pytest.raises(LocoError, match=f"holds a symbolic link {other / name}"):
            check_output_dir(str(other), what="OUTPUT_DIR")
    assert victim.read_text() == "precious\n"


def test_pretrain_and_readout_refuse_links_in_output_dir(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for tool, args in (("pretrain.py", ["--config", os.path.join(REPO, "pretrain",
                                                                  "cpu_loco.yaml")]),
                       ("linear_readout.py", ["--random-init", "--arch", "resnet18"])):
        out = tmp_path / tool
        (out / "sub").mkdir(parents=True)
        os.symlink(victim, out / "sub" / "log.txt")
        line = one_error_line(run(tool, *args, "--output-dir", out))
        assert "holds a symbolic link" in line and "log.txt" in line
    assert victim.read_text() == "precious\n"


# ----------------------------------------------------------------------------- dataset walks

def _image(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


@pytest.mark.parametrize("shape", ["self", "pair", "parent", "deep"])
def test_find_images_names_a_symlink_loop(tmp_path, shape):
    from loco_det.pretrain.data import find_images

    root = tmp_path / "data"
    _image(root / "c0" / "x.png")
    c0 = root / "c0"
    if shape == "self":
        os.symlink(".", c0 / "a")
    elif shape == "pair":
        (c0 / "p").mkdir()
        (c0 / "q").mkdir()
        os.symlink("../q", c0 / "p" / "to_q")
        os.symlink("../p", c0 / "q" / "to_p")
    elif shape == "parent":
        os.symlink("..", c0 / "up")
    else:
        (c0 / "a" / "b" / "c").mkdir(parents=True)
        os.symlink("../../..", c0 / "a" / "b" / "c" / "back")
    with pytest.raises(LocoError) as err:
        find_images(str(root))
    assert "\n" not in str(err.value) and ("loop" in str(err.value)
                                           or "outside the data root" in str(err.value))


def test_find_images_stays_in_the_data_root_unless_asked(tmp_path, monkeypatch):
    from loco_det.pretrain.data import FOLLOW_LINKS_ENV, find_images

    root = tmp_path / "data"
    _image(root / "c0" / "x.png")
    _image(tmp_path / "elsewhere" / "y.png")
    os.symlink(tmp_path / "elsewhere", root / "c1")
    monkeypatch.delenv(FOLLOW_LINKS_ENV, raising=False)
    with pytest.raises(LocoError, match="outside the data root"):
        find_images(str(root))
    monkeypatch.setenv(FOLLOW_LINKS_ENV, "1")
    samples, classes = find_images(str(root))
    assert classes == ["c0", "c1"] and len(samples) == 2
