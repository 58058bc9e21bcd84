"""The prepared GPU check in its CPU-reduced form (the same script, --cpu-smoke: toy sizes, gloo,
float32), and `make gpu-wheels`' logic without downloading anything."""
import os
import re
import subprocess
import sys
import time
import zipfile

import pytest

from loco_det import gpu_check, gpu_wheels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDIST = "pb1-detectron2-0.6.tar.gz"


def _table_rows(text):
    """{part: (status, figures)} from the summary table."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)\s+(ok|FAIL|skipped)\s+([\d.]+)\s+(.*)$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(4))
    return rows


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path):
    """Every part on CPU, through the real tools, ends ok; the table goes to $OUT too. The
    Cityscapes part is left to test_train_net (and to the skip test below): on the GPU machine it
    is always skipped (numpy 2)."""
    parts = [p for p in gpu_check.PARTS if p != "cityscapes"]
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--cpu-smoke", "--work", str(tmp_path / "work"),
         "--parts", ",".join(parts)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _table_rows(proc.stdout)
    assert list(rows) == parts, proc.stdout
    assert all(status == "ok" for status, _ in rows.values()), proc.stdout
    assert "2 steps, gloo world 1 on cpu" in rows["pretrain"][1]
    assert "loco_det Trainer / plain DefaultTrainer" in rows["plain_d2"][1]
    assert "step " in rows["input"][1] and "input-bound with" in rows["input"][1]
    assert (out / gpu_check.SUMMARY_NAME).read_text().strip() == proc.stdout.strip()
    logs = (out / gpu_check.LOGS_NAME).read_text()
    assert [ln.split()[1] for ln in logs.splitlines() if ln.startswith("===== ")] == parts


def test_failing_part_fails_the_check(tmp_path, monkeypatch):
    """A part that fails is a FAIL row, the parts after it still run, and the status is 1."""
    def broken(c):
        c.tool("data", ["-c", "import sys; print('error: something broke'); sys.exit(3)"])

    monkeypatch.setitem(gpu_check.PART_FUNCS, "data", broken)
    monkeypatch.setitem(gpu_check.PART_FUNCS, "bench", lambda c: "fine")
    status, text = gpu_check.run(cpu_smoke=True, work=str(tmp_path), parts=("data", "bench"),
                                 out_dir=str(tmp_path / "out"))
    rows = _table_rows(text)
    assert status == 1
    assert rows["data"] == ("FAIL", "exit 3: error: something broke")
    assert rows["bench"] == ("ok", "fine")
    assert "FAILED: data" in text and "last lines of data's log" in text
    assert "FAILED: data" in (tmp_path / "out" / gpu_check.SUMMARY_NAME).read_text()


def test_timeout_ends_the_part_and_what_it_started(tmp_path, monkeypatch):
    """A part past its time limit is a FAIL row, and its child processes are gone too."""
    pid_file = tmp_path / "grandchild.pid"
    # The part's "interpreter" is a shell (milliseconds to start, not a Python's seconds), so
    # the grandchild surely exists well within the limit; its pid file says it did.
    script = 'sleep 60 & echo $! > "$0.tmp" && mv "$0.tmp" "$0"; sleep 60'
    monkeypatch.setattr(gpu_check.sys, "executable", "/bin/sh")
    monkeypatch.setitem(gpu_check.CPU_SMOKE["timeouts"], "data", 3)
    monkeypatch.setitem(gpu_check.PART_FUNCS, "data",
                        lambda c: c.tool("data", ["-c", script, str(pid_file)]))
    status, text = gpu_check.run(cpu_smoke=True, work=str(tmp_path), parts=("data",))
    assert status == 1
    assert _table_rows(text)["data"][1].startswith("timed out after 3 s")
    assert pid_file.exists(), "the part was stopped before it started its child"
    pid = int(pid_file.read_text())
    for _ in range(50):  # the killed grandchild is reaped by init shortly after
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {pid} started by the part is still running")


def test_budget_spent_is_a_failure(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.CPU_SMOKE, "budget_s", 0)
    status, text = gpu_check.run(cpu_smoke=True, work=str(tmp_path), parts=("data",))
    assert status == 1
    assert _table_rows(text)["data"] == ("FAIL", "not run: the check's time budget is spent")


def test_gpu_mode_needs_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--work", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: no CUDA device here; the CPU form of this check is "
                                   "--cpu-smoke")


@pytest.mark.parametrize("version,blocked", [("2.5.2", True), ("2.0.0", True),
                                             ("1.26.4", False)])
def test_cityscapes_skipped_with_numpy2(tmp_path, monkeypatch, version, blocked):
    import numpy

    monkeypatch.setattr(numpy, "__version__", version)
    assert (gpu_check.cityscapes_blocked(version) is not None) == blocked
    if blocked:
        status, text = gpu_check.run(cpu_smoke=True, work=str(tmp_path), parts=("cityscapes",))
        assert status == 0
        status_, figures = _table_rows(text)["cityscapes"]
        assert status_ == "skipped" and f"numpy {version}" in figures


def test_gpu_settings_are_the_issues_sizes():
    g = gpu_check.GPU
    assert g["bench"][g["bench"].index("--arch") + 1] == "resnet50"
    assert g["bench"][g["bench"].index("--image-size") + 1] == "224"
    assert g["bench"][g["bench"].index("--batch") + 1] == "128" and "--amp" in g["bench"]
    assert g["pretrain_epochs"] * (g["n_train"] // g["pretrain_batch"]) == 50
    assert g["det_iters"] == 200 and "(800,)" in g["det_sizes"]
    assert g["budget_s"] <= 8 * 60
    assert set(g["timeouts"]) == set(gpu_check.PARTS) == set(gpu_check.CPU_SMOKE["timeouts"])


# ---- make gpu-wheels ---------------------------------------------------------------------------

def _pins():
    pins = {}
    with open(os.path.join(ROOT, "requirements", "cpu.txt")) as f:
        for line in f:
            if "==" in line and not line.startswith("#"):
                name, version = line.strip().split("==")
                pins[gpu_wheels.canonical(name)] = version
    return pins


def test_wheel_list_uses_the_project_pins_and_skips_what_is_there():
    """Each carried version is the project's pin (requirements/cpu.txt), or for a dependency
    pinned only through another package (antlr4), the version installed here by those pins."""
    import importlib.metadata

    pins = _pins()
    for name, (version, how) in gpu_wheels.GPU_WHEELS.items():
        pinned = pins.get(gpu_wheels.canonical(name)) or importlib.metadata.version(name)
        assert pinned == version, name
        assert how in ("binary", "build")
        assert gpu_wheels.canonical(name) not in gpu_wheels.GPU_PREINSTALLED, name
    for name in ("torch", "torchvision", "numpy", "pillow", "pyyaml", "portalocker", "tabulate"):
        assert name in gpu_wheels.GPU_PREINSTALLED
    for name in ("detectron2", "fvcore", "iopath", "pycocotools", "yacs", "omegaconf"):
        assert name not in gpu_wheels.GPU_PREINSTALLED


def test_command_lines():
    cmd = gpu_wheels.download_command("shapely", "2.1.2", "D", python="PY")
    assert cmd[:4] == ["PY", "-m", "pip", "download"]
    for flag in ("--no-deps", "--only-binary=:all:"):
        assert flag in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12"
    assert cmd[cmd.index("--implementation") + 1] == "cp"
    assert "manylinux_2_17_x86_64" in cmd and cmd[-3:] == ["-d", "D", "shapely==2.1.2"]
    cmd = gpu_wheels.build_command("fvcore", "0.1.5.post20221221", "D", python="PY")
    assert cmd[:4] == ["PY", "-m", "pip", "wheel"] and "--no-deps" in cmd
    assert cmd[-3:] == ["-w", "D", "fvcore==0.1.5.post20221221"]


@pytest.mark.parametrize("name,ok", [
    ("yacs-0.1.8-py3-none-any.whl", True),
    ("pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
    ("pycocotools-2.0.11-cp39-abi3-manylinux_2_17_x86_64.whl", True),
    ("shapely-2.1.2-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
    ("shapely-2.1.2-cp311-cp311-manylinux2014_x86_64.whl", False),
    ("shapely-2.1.2-cp312-cp312-macosx_11_0_arm64.whl", False),
    ("shapely-2.1.2-cp312-cp312-manylinux_2_17_aarch64.whl", False),
])
def test_installable_on_target(name, ok):
    assert gpu_wheels.installable_on_target(name) == ok


def _fake_wheel(folder, name, version, requires=(), tag="py3-none-any"):
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n".format(name, version)
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def _tag(name):
    return "cp312-cp312-manylinux_2_17_x86_64" if name == "shapely" else "py3-none-any"


def _complete_folder(folder):
    for name, (version, _) in gpu_wheels.GPU_WHEELS.items():
        _fake_wheel(folder, name, version, tag=_tag(name),
                    requires=["numpy>=1.21", "tqdm", 'pywin32; sys_platform == "win32"',
                              'black; extra == "dev"', 'typing; python_version < "3.5"'])
    (folder / SDIST).write_bytes(b"sdist")


def test_check_folder_accepts_a_complete_folder(tmp_path):
    _complete_folder(tmp_path)
    assert gpu_wheels.check_folder(str(tmp_path), SDIST) == []
    errors = gpu_wheels.check_folder(str(tmp_path), SDIST, target="3.11")
    assert errors == [f"{next(tmp_path.glob('shapely-*')).name}: does not install on CPython "
                      "3.11 x86-64 Linux"]


def test_check_folder_names_every_problem(tmp_path):
    _complete_folder(tmp_path)
    _fake_wheel(tmp_path, "yacs", "0.1.7")                       # a second version
    os.remove(next(tmp_path.glob("termcolor-*.whl")))            # one missing
    _fake_wheel(tmp_path, "future", "1.0.0")                     # not needed
    _fake_wheel(tmp_path, "fvcore", "0.1.5.post20221221", requires=["nosuchdep>=1"])
    (tmp_path / SDIST).unlink()
    errors = "\n".join(gpu_wheels.check_folder(str(tmp_path), SDIST))
    assert "yacs: expected one wheel of 0.1.8" in errors
    assert "termcolor: expected one wheel of 3.2.0, found none" in errors
    assert "future-1.0.0-py3-none-any.whl: not one of the needed wheels" in errors
    assert "needs 'nosuchdep>=1'" in errors
    assert f"{SDIST}: missing" in errors


def test_prepare_fetches_only_what_is_missing(tmp_path):
    """prepare() runs one pip command per missing wheel (binary ones by download, the others
    built), keeps wheels already there, copies the verified sdist in, then checks the folder."""
    _complete_folder(tmp_path)
    os.remove(next(tmp_path.glob("fvcore-*.whl")))
    os.remove(next(tmp_path.glob("shapely-*.whl")))
    (tmp_path / SDIST).unlink()
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        name, version = cmd[-1].split("==")
        dest = cmd[cmd.index("-d" if "download" in cmd else "-w") + 1]
        _fake_wheel(__import__("pathlib").Path(dest), name, version, tag=_tag(name))

    src = tmp_path.parent / "sdist_src"
    src.write_bytes(b"the sdist")
    errors = gpu_wheels.prepare(str(tmp_path), lambda: str(src), SDIST, python="PY",
                                run=fake_run)
    assert errors == []
    assert [c[3] for c in calls] == ["wheel", "download"]      # fvcore built, shapely fetched
    assert [c[-1] for c in calls] == ["fvcore==0.1.5.post20221221", "shapely==2.1.2"]
    assert (tmp_path / SDIST).read_bytes() == b"the sdist"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_make_gpu_wheels_does_not_set_up_the_venv():
    """`make gpu-wheels` must never re-run `pip install -e .` (the setup stamp)."""
    proc = subprocess.run(["make", "-n", "gpu-wheels", "gpu-check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "pip install" not in proc.stdout and "venv" not in proc.stdout
    assert "tools/gpu_wheels.py --dest .gpu_wheels" in proc.stdout
    assert "tools/gpu_check.py --wheels .gpu_wheels" in proc.stdout


def test_one_torchrun_process_joins_the_process_group(monkeypatch):
    """World size 1 under torchrun takes the distributed paths (nccl/gloo, SyncBN conversion)
    that the GPU check's pretraining part exercises; a plain `python` start does not."""
    from loco_det.pretrain.engine import DistEnv

    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    assert not DistEnv().distributed
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # exported by a cluster, no torchrun
    assert not DistEnv().distributed
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert DistEnv().distributed


def test_a_bug_in_a_part_is_its_failure_not_the_checks(tmp_path, monkeypatch):
    def buggy(c):
        return {}["missing"]

    monkeypatch.setitem(gpu_check.PART_FUNCS, "bench", buggy)
    monkeypatch.setitem(gpu_check.PART_FUNCS, "convert", lambda c: "fine")
    status, text = gpu_check.run(cpu_smoke=True, work=str(tmp_path), parts=("bench", "convert"))
    assert status == 1
    rows = _table_rows(text)
    assert rows["bench"] == ("FAIL", "KeyError: 'missing'") and rows["convert"][0] == "ok"


def _bench_result(memory):
    names = ["e2e", "gim", "loco:fused", "loco:fused_stem", "bare"]
    return {"arch": "resnet50", "image_size": 224, "batch": 128, "time": {"e2e": 0.5},
            "time_ratio": dict(zip(names, [1.0, 0.9, 1.2, 1.1, 0.8])), "memory": memory,
            "flops": dict(zip(names, [100, 95, 117, 118, 100]))}


def test_bench_part_on_cuda_reports_and_requires_max_memory_allocated(tmp_path, monkeypatch):
    """The CUDA-only branch of the bench part (the CPU smoke runs it with --no-memory)."""
    import json

    check = gpu_check.Check(gpu_check.GPU, str(tmp_path))
    memory = {"e2e": 1000 << 20, "gim": 500 << 20, "loco:fused": 900 << 20,
              "loco:fused_stem": 700 << 20, "bare": 600 << 20}
    for mem, expected in ((memory, None), (None, "no CUDA peak memory measured")):
        def fake_tool(part, args, result=_bench_result(mem)):
            assert args[args.index("--device") + 1] == "cuda"
            (tmp_path / "bench.json").write_text(json.dumps(result))

        monkeypatch.setattr(check, "tool", fake_tool)
        if expected is None:
            figures = gpu_check.part_bench(check)
            assert figures == ("resnet50 224 px x128: e2e 256 img/s; time/e2e loco:fused_stem "
                               "1.10 (flop/e2e 1.18), gim 0.90; max_memory_allocated e2e "
                               "1000 MiB, mem/e2e loco:fused_stem 0.70, gim 0.50")
        else:
            with pytest.raises(gpu_check.PartFailed, match=expected):
                gpu_check.part_bench(check)


def test_two_ranks_match_one_process(tmp_path):
    """The two_rank part on CPU: two gloo ranks (GradientReducer, gather_with_grad; BN on
    fixed statistics) against one process on the same global batches, within float32
    tolerance. A missing division by the world size or a gather that returns its input makes
    this row FAIL (checked by planting each)."""
    status, text = gpu_check.run(cpu_smoke=True, work=str(tmp_path), parts=("data", "two_rank"))
    rows = _table_rows(text)
    assert status == 0 and rows["two_rank"][0] == "ok", text
    assert "2 steps x8, gloo 2 ranks on cpu (fixed BN)" in rows["two_rank"][1]
    worst = float(re.search(r"largest update difference (\S+)", rows["two_rank"][1]).group(1))
    assert worst <= gpu_check.CPU_SMOKE["two_rank"]["tolerance"]


def test_backend_override_and_timeout(monkeypatch):
    """RUN.DIST_BACKEND=gloo maps LOCAL_RANK onto the visible GPUs (two ranks share one);
    nccl keeps one GPU per process and says what to do when there are too few; nccl without
    a GPU is a config error; the timeout reaches init_process_group."""
    from datetime import timedelta

    from loco_det.pretrain import engine
    from loco_det.utils import ConfigError, LocoError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(engine.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(engine.torch.cuda, "device_count", lambda: 1)
    assert str(engine.DistEnv("gloo").device) == "cuda:0"
    nccl = engine.DistEnv()
    assert nccl.backend == "nccl" and str(nccl.device) == "cuda:1"
    with pytest.raises(LocoError, match="LOCAL_RANK=1 needs a GPU of its own but 1 are "
                                        "visible.*RUN.DIST_BACKEND=gloo"):
        nccl.init()
    monkeypatch.setattr(engine.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="RUN.DIST_BACKEND=nccl needs CUDA"):
        engine.DistEnv("nccl").init()
    calls = []
    monkeypatch.setattr(engine.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(engine.dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    env = engine.DistEnv("", 90.0)
    env.init()
    assert calls == [(("gloo",), {"timeout": timedelta(minutes=90)})] and env.owns_group
