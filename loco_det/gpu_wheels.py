"""The wheels the GPU check needs on a machine that cannot fetch anything (`make gpu-wheels`).

The lent GPU machine has Python 3.12 with torch, torchvision, numpy 2 and many common packages
(GPU_PREINSTALLED, read off that machine's package list), but no Detectron2 or its helpers.
What is missing travels inside the working tree as wheels: binary cp312 manylinux wheels where
PyPI has them (`pip download --only-binary=:all: --python-version 3.12 ...`), pure-Python wheels
built here from the sdist where PyPI has no wheel (fvcore, iopath, antlr4), plus the pinned
Detectron2 sdist that tools/install_detectron2.py installs without its C++ extension. Versions are
this project's pins (requirements/cpu.txt); one version of each, so `pip install --no-index` there
never has to choose.
"""
import email.parser
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

# name -> how it is obtained: "binary" (a cp312 / py3 wheel from PyPI) or "build" (no wheel on
# PyPI: built here from the sdist; must come out pure Python).
GPU_WHEELS = {
    "fvcore": ("0.1.5.post20221221", "build"),
    "iopath": ("0.1.10", "build"),
    "yacs": ("0.1.8", "binary"),
    "termcolor": ("3.2.0", "binary"),
    "pycocotools": ("2.0.11", "binary"),
    "omegaconf": ("2.3.0", "binary"),
    "hydra-core": ("1.3.2", "binary"),
    "antlr4-python3-runtime": ("4.9.3", "build"),
    "shapely": ("2.1.2", "binary"),  # the embedded data's COCO polygons (loco_det.synthetic)
    "simplejpeg": ("1.9.0", "binary"),  # JPEG decoding of the input pipeline (pretrain/augment.py)
}

# Python packages on the lent nvidia-h200 machine (/work/.library/device/KINDS.md, read there on
# 2026-11-17). Used to check that every dependency of the carried wheels is there or carried.
GPU_PREINSTALLED = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# What `pip download` is told about the target (the device tool's notes): CPython 3.12 on x86-64
# Linux; pip matches each manylinux tag exactly, so the usual ones are listed.
TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# Markers of the target (its python_version is filled in), for the wheels' Requires-Dist lines.
TARGET_MARKERS = {"implementation_name": "cpython", "platform_python_implementation": "CPython",
                  "sys_platform": "linux", "os_name": "posix", "platform_system": "Linux",
                  "platform_machine": "x86_64", "extra": ""}
# The carried folder travels with every device call; the whole tree may be 64 MiB.
SIZE_LIMIT = 32 << 20


def canonical(name):
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def download_command(name, version, dest, python=sys.executable, target=TARGET_PYTHON):
    """`pip download` of one binary wheel for the target interpreter, no dependencies."""
    cmd = [python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", target, "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return cmd + ["-d", dest, f"{name}=={version}"]


def build_command(name, version, dest, python=sys.executable):
    """`pip wheel` from the sdist (for projects without a wheel on PyPI), no dependencies."""
    return [python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-binary", name, "-w", dest,
            f"{name}=={version}"]


def wheel_tags(filename):
    """(project, version, python tag, abi tag, platform tag) of a wheel file name."""
    parts = filename[:-len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        raise ValueError(f"{filename}: not a wheel file name")
    return parts[0], parts[1], parts[-3], parts[-2], parts[-1]


def installable_on_target(filename, target=TARGET_PYTHON):
    """Whether a wheel installs on CPython `target` ("3.12") on x86-64 manylinux."""
    _, _, py, abi, plat = wheel_tags(filename)
    minor = int(target.split(".")[1])
    pys = py.split(".")
    py_ok = any(t in ("py3", f"cp3{minor}") or (t.startswith("cp3") and abi == "abi3"
                                                 and int(t[3:]) <= minor) for t in pys)
    plat_ok = plat == "any" or any(p.endswith("x86_64") and p.startswith("manylinux")
                                   for p in plat.split("."))
    return py_ok and plat_ok


def requires_dist(wheel_path):
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel_path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8"))
    return msg.get_all("Requires-Dist") or []


def missing_dependencies(requirements, available, target=TARGET_PYTHON):
    """Requirements (Requires-Dist strings) that apply on the target and name no project in
    `available` (canonical names): what `pip install --no-index` would lack there."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # an interpreter without packaging still has pip's copy (pip is needed)
        from pip._vendor.packaging.requirements import Requirement

    markers = dict(TARGET_MARKERS, python_version=target, python_full_version=f"{target}.0")
    missing = []
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(markers):
            continue
        if canonical(req.name) not in available:
            missing.append(line)
    return missing


def check_folder(dest, sdist_name, target=TARGET_PYTHON):
    """Errors (strings) about a prepared folder: one wheel per needed project at its pinned
    version, every wheel installable there, every dependency there or carried, the sdist present,
    the total under SIZE_LIMIT."""
    errors = []
    wheels = sorted(f for f in os.listdir(dest) if f.endswith(".whl"))
    found = {}
    for f in wheels:
        project, version = wheel_tags(f)[:2]
        found.setdefault(canonical(project), []).append((version, f))
        if not installable_on_target(f, target):
            errors.append(f"{f}: does not install on CPython {target} x86-64 Linux")
    for name, (version, _) in GPU_WHEELS.items():
        got = found.get(canonical(name), [])
        if [v for v, _ in got] != [version]:
            errors.append(f"{name}: expected one wheel of {version}, found "
                          f"{[f for _, f in got] or 'none'}")
    for project in sorted(set(found) - {canonical(n) for n in GPU_WHEELS}):
        errors.append(f"{found[project][0][1]}: not one of the needed wheels")
    available = set(found) | GPU_PREINSTALLED
    for f in wheels:
        for line in missing_dependencies(requires_dist(os.path.join(dest, f)), available,
                                         target):
            errors.append(f"{f} needs {line!r}: neither carried nor on the GPU machine")
    if not os.path.isfile(os.path.join(dest, sdist_name)):
        errors.append(f"{sdist_name}: missing")
    size = folder_size(dest)
    if size > SIZE_LIMIT:
        errors.append(f"{dest}: {size / 2**20:.1f} MiB, over {SIZE_LIMIT >> 20} MiB")
    return errors


def folder_size(path):
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


def prepare(dest, fetch_sdist, sdist_name, python=sys.executable, run=subprocess.run,
            target=TARGET_PYTHON):
    """Fill `dest` with every wheel in GPU_WHEELS and the Detectron2 sdist, then check it.

    Wheels already in `dest` at the pinned version are kept; everything new is fetched into a
    temporary folder first and moved in only once all downloads and builds have succeeded.
    `fetch_sdist()` returns the path of the sha256-verified sdist. Returns the check's errors."""
    os.makedirs(dest, exist_ok=True)
    have = {canonical(wheel_tags(f)[0]): wheel_tags(f)[1]
            for f in os.listdir(dest) if f.endswith(".whl")}
    with tempfile.TemporaryDirectory(dir=dest, prefix=".tmp") as tmp:
        for name, (version, how) in GPU_WHEELS.items():
            if have.get(canonical(name)) == version:
                continue
            if how == "binary":
                cmd = download_command(name, version, tmp, python, target)
            else:
                cmd = build_command(name, version, tmp, python)
            print("+", " ".join(cmd), flush=True)
            run(cmd, check=True)
        for f in os.listdir(tmp):
            os.replace(os.path.join(tmp, f), os.path.join(dest, f))
    sdist = os.path.join(dest, sdist_name)
    if not os.path.isfile(sdist):
        shutil.copyfile(fetch_sdist(), sdist + ".part")
        os.replace(sdist + ".part", sdist)
    return check_folder(dest, sdist_name, target)


__all__ = ["GPU_WHEELS", "GPU_PREINSTALLED", "prepare", "check_folder", "download_command",
           "build_command", "installable_on_target", "missing_dependencies"]
