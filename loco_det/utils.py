"""Small shared helpers: one error type for user-facing failures, atomic writes, provenance."""
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile


class LocoError(Exception):
    """A user-facing failure: tools print `error: <message>` on one line and exit non-zero."""


class ConfigError(LocoError):
    pass


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write to a temporary file beside `path`, then rename: readers never see half a file and
    an existing file survives a failed write."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_" + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path, obj):
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def git_commit():
    """Commit of the loco_det checkout (with '-dirty' if modified), or 'unknown' outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def library_versions():
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "torchvision", "numpy", "detectron2", "fvcore", "pycocotools"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            versions[name] = None
    return versions


def run_info(world_size, **extra):
    """Provenance record every run writes to its output folder at start (run_info.json)."""
    return {"git_commit": git_commit(), "world_size": world_size, "argv": sys.argv,
            "versions": library_versions(), **extra}
