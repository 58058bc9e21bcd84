#!/usr/bin/env python
"""Install Detectron2's pure-Python package into the current environment, pinned by hash.

Detectron2's authors publish no wheels. On machines without a CUDA toolchain we install the
PyPI sdist `pb1-detectron2==0.6` (the Python sources of upstream v0.6) *without* building its
C++/CUDA extension, which its setup.py always attempts and which fails there.

v0.6 predates Pillow 10, numpy 1.24 and setuptools 81, and imports its compiled ops eagerly, so
as installed it does not even import here. The installed copy is then patched with the exact
replacements recorded in tools/detectron2_v0.6.patch.json (each one says why). The patch is
applied to the installed files, never vendored: each original text must be found exactly as
recorded, or nothing is changed and the tool fails naming the file; running it again on a
patched copy changes nothing. Afterwards Detectron2 works as itself, with no loco_det import.

`pip download` cannot fetch this sdist (its metadata declares a direct-URL extra that pip
refuses), so the archive is fetched from the package index by name and checked against the
pinned sha256 before anything in it is used. Nothing is ever executed from the archive: its
`detectron2/` package is repackaged with a generated, extension-free build description and
installed with pip (so `pip uninstall detectron2` works).

Examples:
    python tools/install_detectron2.py            # install unless a detectron2 is importable
    python tools/install_detectron2.py --force    # reinstall the pinned version
    python tools/install_detectron2.py --check    # exit 0 if detectron2 is present and patched
    python tools/install_detectron2.py --patch /tmp/copy/detectron2   # patch that copy only
"""
import argparse
import hashlib
import html.parser
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loco_det.utils import atomic_write, remove_stale_temps, temp_prefix  # noqa: E402  (stdlib only)

PACKAGE = "pb1-detectron2"
VERSION = "0.6"
SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
INDEX = os.environ.get("LOCO_DET_PYPI_SIMPLE", "https://pypi.org/simple/")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "loco_det")
PATCH_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detectron2_v0.6.patch.json")
SETUP_PY = """\
from setuptools import find_packages, setup
setup(name="detectron2", version="0.6", packages=find_packages(include=["detectron2", "detectron2.*"]),
      package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},
      include_package_data=False, python_requires=">=3.8")
"""


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href"]


def sdist_name():
    return f"{PACKAGE}-{VERSION}.tar.gz"


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(cache_dir=CACHE):
    """Return the path of the verified sdist, downloading it into cache_dir if needed."""
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, sdist_name())
    if os.path.exists(target) and sha256_of(target) == SHA256:
        return target
    page_url = urllib.parse.urljoin(INDEX, PACKAGE + "/")
    try:
        with urllib.request.urlopen(page_url, timeout=60) as r:
            parser = _Links()
            parser.feed(r.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read the package index {page_url} ({e}); without network "
                         f"access, pass --sdist PATH to a local {sdist_name()}") from None
    urls = [urllib.parse.urljoin(page_url, h) for h in parser.hrefs if sdist_name() in h]
    if not urls:
        raise SystemExit(f"error: {sdist_name()} not listed at {page_url}")
    remove_stale_temps(target)  # downloads that a killed earlier run left behind
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=temp_prefix(target))
    try:
        with os.fdopen(fd, "wb") as out, \
                urllib.request.urlopen(urls[0].split("#")[0], timeout=300) as r:
            shutil.copyfileobj(r, out)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, (OSError, ValueError)):
            raise SystemExit(f"error: cannot download {urls[0]} ({e})") from None
        raise
    digest = sha256_of(tmp)
    if digest != SHA256:
        os.unlink(tmp)
        raise SystemExit(f"error: {sdist_name()} has sha256 {digest}, expected {SHA256}; refusing it")
    os.replace(tmp, target)
    return target


def _safe_members(tar, prefix):
    for m in tar.getmembers():
        name = os.path.normpath(m.name)
        if name.startswith("..") or os.path.isabs(name) or not (m.isfile() or m.isdir()):
            continue
        if name.startswith(prefix):
            yield m


def install(sdist, pip_args=()):
    top = f"{PACKAGE}-{VERSION}"
    with tempfile.TemporaryDirectory() as work, tarfile.open(sdist) as tar:
        tar.extractall(work, members=list(_safe_members(tar, os.path.join(top, "detectron2"))))
        tar.extractall(work, members=list(_safe_members(tar, os.path.join(top, "tools"))))
        src = os.path.join(work, top)
        with open(os.path.join(src, "setup.py"), "w") as f:
            f.write(SETUP_PY)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
               "--force-reinstall", *pip_args, src]
        proc = subprocess.run(cmd)
        if proc.returncode:
            raise SystemExit(f"error: pip could not install Detectron2 from {sdist} (exit "
                             f"{proc.returncode}; its output is above)")
        # Keep Detectron2's own converter script: the tests compare our conversion with it.
        share = os.path.join(sys.prefix, "share", "detectron2", "tools")
        os.makedirs(share, exist_ok=True)
        shutil.copy(os.path.join(src, "tools", "convert-torchvision-to-d2.py"), share)


def detectron2_present():
    return importlib.util.find_spec("detectron2") is not None


class PatchError(Exception):
    """The installed Detectron2 is not the copy the recorded patch was made for."""


def load_patch(path=PATCH_FILE):
    with open(path) as f:
        patch = json.load(f)
    for name, entries in patch["files"].items():
        for e in entries:
            # a replacement containing its original would look unpatched after patching
            if not e["old"] or e["count"] < 1 or e["old"] in e["new"]:
                raise PatchError(f"{path}: bad entry for {name}: {e['old']!r}")
    return patch


def installed_version(package_dir):
    """`__version__` from detectron2/__init__.py, read without importing it (v0.6 does not
    import before it is patched)."""
    with open(os.path.join(package_dir, "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return None


def _state(text, entries):
    """"original", "patched", or None when the text is neither (a different Detectron2)."""
    found = [text.count(e["old"]) for e in entries]
    if all(n == e["count"] for n, e in zip(found, entries)):
        return "original"
    if all(n == 0 for n in found) and all(text.count(e["new"]) >= e["count"]
                                          for e in entries if e["new"]):
        return "patched"
    return None


def patch_status(package_dir, patch=None):
    """{relative file: "original" | "patched"}; PatchError listing every file that is neither."""
    patch = patch or load_patch()
    version = installed_version(package_dir)
    if version != patch["detectron2"]["version"]:
        raise PatchError(f"{package_dir} is Detectron2 {version}; the recorded patch "
                         f"({os.path.basename(PATCH_FILE)}) is for {patch['detectron2']['version']}")
    status, problems = {}, []
    for name, entries in patch["files"].items():
        path = os.path.join(package_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            problems.append(f"{path}: {e.strerror or e}")
            continue
        status[name] = _state(text, entries)
        if status[name] is None:
            missing = [e["old"] for e in entries if text.count(e["old"]) != e["count"]]
            problems.append(f"{path}: neither the recorded original nor the patched text "
                            f"(expected {missing[0].strip()!r})")
    if problems:
        raise PatchError("refusing to patch Detectron2, nothing was changed:\n  "
                         + "\n  ".join(problems))
    return status


def patch_detectron2(package_dir, patch=None):
    """Apply the recorded patch to the Detectron2 package folder `package_dir`. Idempotent;
    every file is checked before any is written, and each is replaced whole (temp + rename).
    Returns the files it changed."""
    patch = patch or load_patch()
    changed = []
    for name, state in patch_status(package_dir, patch).items():
        if state == "patched":
            continue
        path = os.path.join(package_dir, name)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for e in patch["files"][name]:
            text = text.replace(e["old"], e["new"])
        with atomic_write(path, "w") as f:
            f.write(text)
        changed.append(name)
    return changed


def installed_package_dir():
    importlib.invalidate_caches()
    spec = importlib.util.find_spec("detectron2")
    return None if spec is None else list(spec.submodule_search_locations)[0]


def apply_patch_to_installed():
    """Patch the importable Detectron2 (what `make` installed); 0, or 1 with the reason."""
    package_dir = installed_package_dir()
    try:
        changed = patch_detectron2(package_dir)
    except PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"detectron2 at {package_dir}: recorded patch "
          + (f"applied to {len(changed)} files" if changed else "already applied"))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--force", action="store_true", help="reinstall even if detectron2 is importable")
    p.add_argument("--check", action="store_true",
                   help="only report whether detectron2 is present and patched (exit 0) or not (1)")
    p.add_argument("--patch", metavar="DIR",
                   help="only apply the recorded patch to the Detectron2 package folder DIR (a "
                        "copy, or an installed detectron2/ folder)")
    p.add_argument("--sdist", help="use this local copy of the sdist (its sha256 is still checked)")
    args = p.parse_args(argv)
    if args.patch:
        try:
            changed = patch_detectron2(args.patch)
        except (PatchError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{args.patch}: recorded patch "
              + (f"applied to {len(changed)} files" if changed else "already applied"))
        return 0
    if args.check:
        if not detectron2_present():
            print("detectron2: missing")
            return 1
        try:
            status = patch_status(installed_package_dir())
        except PatchError as e:
            print(f"detectron2: present, not the patched v0.6: {e}")
            return 1
        unpatched = sorted(k for k, v in status.items() if v != "patched")
        print("detectron2: present, " + (f"not patched ({len(unpatched)} files; run this tool "
                                         "without --check)" if unpatched else "patched"))
        return 1 if unpatched else 0
    if detectron2_present() and not args.force:
        print("detectron2 already installed (--force reinstalls the pinned version)")
        return apply_patch_to_installed()
    if args.sdist:
        if not os.path.isfile(args.sdist):
            what = "is a directory" if os.path.isdir(args.sdist) else "does not exist"
            print(f"error: --sdist {args.sdist} {what}; give the path of {sdist_name()}",
                  file=sys.stderr)
            return 1
        try:
            digest = sha256_of(args.sdist)
        except OSError as e:
            print(f"error: cannot read --sdist {args.sdist}: {e.strerror or e}", file=sys.stderr)
            return 1
        if digest != SHA256:
            raise SystemExit(f"error: {args.sdist} does not have the pinned sha256 {SHA256}")
        sdist = args.sdist
    else:
        sdist = fetch_sdist()
    try:
        install(sdist)
    except (tarfile.TarError, EOFError, OSError) as e:
        print(f"error: cannot unpack {sdist}: {e}", file=sys.stderr)
        return 1
    print(f"installed detectron2 {VERSION} (pure Python, from {sdist_name()}, sha256 {SHA256[:12]}...)")
    return apply_patch_to_installed()


if __name__ == "__main__":
    from loco_det.utils import run_tool

    sys.exit(run_tool(main))
