"""Small shared helpers: one error type for user-facing failures, atomic writes (with cleanup
of what killed writers left behind), output-location checks, interruption handling, provenance."""
import contextlib
import glob
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile


class LocoError(Exception):
    """A user-facing failure: tools print `error: <message>` on one line and exit non-zero."""


class ConfigError(LocoError):
    pass


def flatten(tree, prefix=""):
    """{'A.B': value} of a nested mapping; lists and tuples become lists (YAML round trip)."""
    out = {}
    for key, value in (tree or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def did_you_mean(word, options, prefix=""):
    """'; did you mean PREFIX BEST?' for the closest of `options` to `word`, or ''."""
    import difflib

    best = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {prefix}{best[0]}?" if best else ""


def unknown_key_hint(message, cfg):
    """` (did you mean SOLVER.MAX_ITER?)` for the unknown key yacs names in `message` (its
    "Non-existent key: X" / "Non-existent config key: X"), the nearest of `cfg`'s keys; ""
    when nothing is near."""
    import difflib
    import re

    m = re.search(r"Non-existent (?:config )?key: (\S+)", message)
    if not m:
        return ""
    near = difflib.get_close_matches(m.group(1), list(flatten(cfg)), n=1, cutoff=0.6)
    return f" (did you mean {near[0]}?)" if near else ""


def temp_prefix(path, pid=None):
    """`.tmp_<name>.<host>-<pid>.`: the writer's identity is in the name, so a later run can
    tell a file left by a killed process from one another live process is writing."""
    host = socket.gethostname().replace(".", "_").replace("-", "_") or "host"
    return f".tmp_{os.path.basename(path)}.{host}-{os.getpid() if pid is None else pid}."


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temps(path):
    """Remove temporary files (or folders named by `temp_prefix`) that dead processes on this
    host left beside `path` (SIGKILL, power loss). Files of live writers and of other hosts (a shared file
    system) are kept. Returns the removed paths."""
    directory = os.path.dirname(os.path.abspath(path))
    host_prefix = temp_prefix(path, pid=0)[:-2]  # ".tmp_<name>.<host>-"
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(directory), glob.escape(host_prefix) + "*")):
        pid = os.path.basename(tmp)[len(host_prefix):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(tmp) and not os.path.islink(tmp):  # a temporary folder
                shutil.rmtree(tmp)
            else:
                os.unlink(tmp)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write to a temporary file beside `path`, then rename: readers never see half a file and
    an existing file survives a failed write. Temporary files of killed earlier writers of the
    same `path` are removed first (`remove_stale_temps`)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(path)
    with signals_deferred():  # a SIGTERM mid-write (torch.save) takes effect after the rename
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=temp_prefix(path))
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


def draw_seed():
    """A fresh seed in 0..2^31-1 from the OS (a seed of -1 asks for one; the run records it)."""
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def get_dotted(tree, dotted, default=None):
    """tree["A"]["B"] for dotted "A.B" (nested mappings, CfgNodes included), else `default`."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


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


# ----------------------------------------------------------------------------- output checks
def check_no_links(folder, what="output folder"):
    """Refuse a folder that holds a symbolic link anywhere below it (one line naming the link).

    Why: a tool's libraries (Detectron2's logger and metrics writer, evaluators, TensorBoard)
    open their output names for writing and would follow a link planted there to any file the
    user can write. A run folder never needs a link, so one is refused before anything is
    written. The folder itself may be a link (the user's choice of where runs live)."""
    if not os.path.isdir(folder):
        return
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                raise LocoError(f"{what} {folder} holds a symbolic link {path} -> "
                                f"{os.readlink(path)}; refusing to write through it (remove the "
                                "link or choose another folder)")


def check_output_dir(path, what="--output-dir", links=True):
    """One line when `path` cannot be a run directory: it is an existing file, or a component
    of it is, or (with `links`) it holds a symbolic link (`check_no_links`). Creates nothing."""
    if not path:
        raise LocoError(f"{what} is empty")
    if links:
        check_no_links(path, what)
    probe = os.path.abspath(path)
    while True:
        if os.path.exists(probe):
            if not os.path.isdir(probe):
                where = "is" if probe == os.path.abspath(path) else f"is inside {probe}, which is"
                raise LocoError(f"{what} {path} {where} an existing file, not a directory")
            if not os.access(probe, os.W_OK | os.X_OK):
                raise LocoError(f"{what} {path}: {probe} is not writable")
            return
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent


def check_distinct(out, *inputs, what="--out"):
    """Refuse an output that is one of the inputs (a tool never writes over its own input)."""
    for src in inputs:
        same = src and (os.path.abspath(src) == os.path.abspath(out)
                        or (os.path.exists(src) and os.path.exists(out)
                            and os.path.samefile(src, out)))
        if same:
            raise LocoError(f"{what} {out} is the input file {src}: refusing to overwrite the "
                            "input; choose another output path")


# ----------------------------------------------------------------------------- interruptions
@contextlib.contextmanager
def run_lock(folder, what="--output-dir"):
    """Hold `folder` for this process while it writes a run there: a second start into the same
    folder fails at once with one line naming the holder. The lock is an flock on a file beside
    the folder (`.NAME.lock`, so the run folder itself is not created early), removed again when
    the holder ends; the kernel drops the flock however the holder dies, so the file a killed
    process left is simply taken over (and said so). Folders made only to hold the lock file are
    removed again if they stay empty, so a command that fails leaves nothing behind."""
    import fcntl

    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder.rstrip(os.sep))
    path = os.path.join(parent, f".{name}.lock")
    made = []
    probe = parent
    while probe and not os.path.lexists(probe):
        made.append(probe)
        probe = os.path.dirname(probe)
    fd = None
    try:
        try:
            os.makedirs(parent, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                    os.close(fd)
                    fd = None   # not ours: the holder's file stays
                    raise LocoError(f"{what} {folder} is being written by another run "
                                    f"({holder or 'starting'}); wait for it to end or choose "
                                    "another folder") from None
                try:
                    if os.stat(path).st_ino == os.fstat(fd).st_ino:
                        break   # locked the file that is there now
                except FileNotFoundError:
                    pass        # its holder ended and removed it between our open and lock
                os.close(fd)
                fd = None
        except (FileExistsError, NotADirectoryError):
            fd = None   # a file where a folder must be: the command itself refuses the path
        except PermissionError as e:
            print(f"note: {folder} is not locked against a second run ({e.strerror})",
                  file=sys.stderr)
            fd = None
        if fd is not None:
            before = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            if before:
                print(f"note: {folder}: taking over the lock of an ended run ({before})",
                      file=sys.stderr)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)   # while still holding it: the next start makes a new one
            os.close(fd)
        for d in made:   # deepest first; only while empty
            with contextlib.suppress(OSError):
                os.rmdir(d)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) received; raised in the main thread like Ctrl-C, so `finally` blocks
    and `atomic_write` clean up exactly as for Ctrl-C."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_deferred = {"depth": 0, "pending": [], "pid": None}


def _raise_interrupted(signum, frame):
    if os.getpid() != _deferred["pid"]:
        # A forked child (multiprocessing pool, DataLoader worker) inherited this handler: it
        # ends the way it would have without loco_det (its parent reports the interruption).
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _deferred["depth"]:
        _deferred["pending"].append(signum)  # raised when the critical section ends
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_deferred():
    """Hold back `interruptible`'s SIGINT/SIGTERM until the block ends (writers such as
    torch.save turn an exception raised inside them into an unrelated error). A signal that
    arrived meanwhile is raised as `Interrupted` right after the block, if it ended normally."""
    _deferred["depth"] += 1
    try:
        yield
    except BaseException:  # the block failed anyway: that error ends the tool, not the signal
        _deferred["depth"] -= 1
        if not _deferred["depth"]:
            _deferred["pending"].clear()
        raise
    _deferred["depth"] -= 1
    if not _deferred["depth"] and _deferred["pending"]:
        signum = _deferred["pending"][0]
        _deferred["pending"].clear()
        raise Interrupted(signum)


@contextlib.contextmanager
def interruptible():
    """Turn SIGTERM into `Interrupted` (as SIGINT already is KeyboardInterrupt) while the block
    runs; previous handlers are restored afterwards. Main thread only (signal's rule)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    _deferred["pid"] = os.getpid()
    signal.signal(signal.SIGTERM, _raise_interrupted)
    if old[signal.SIGINT] is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def die_with_parent():
    """A `preexec_fn` for a child of this process: Linux sends the child SIGTERM when this
    process dies (even by SIGKILL), so that no orphaned job keeps writing into a run a rerun is
    about to resume. A parent that died before the child asked for that is caught too. Elsewhere
    None (no `preexec_fn`)."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def preexec():
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died between fork and prctl: no signal will come
            os._exit(128 + signal.SIGTERM)

    return preexec


def signal_name(exc):
    return signal.Signals(exc.signum).name if isinstance(exc, Interrupted) else "SIGINT"


def exit_code(exc):
    """The shell's convention for death by signal: 128 + signal number."""
    return 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)


# The words that start the running command when it came through `loco-det SUB` or
# `python -m loco_det.cli SUB` (set by loco_det.cli); empty for `python tools/SCRIPT.py`.
INVOCATION = []


def resume_command(argv, flag="--resume", script=None, insert_at=None):
    """The command line that continues this run: the same arguments plus `flag` (once), at
    `insert_at` (default: the end; before trailing KEY VALUE overrides where those must end)."""
    args = list(argv)
    if flag and flag not in args:
        args.insert(len(args) if insert_at is None else insert_at, flag)
    start = ["python", script] if script else (INVOCATION or ["python", sys.argv[0]])
    return " ".join(shlex.quote(a) for a in start + args)


def run_tool(main):
    """`sys.exit(run_tool(main))` in a tool: an interruption the tool does not handle itself
    (Ctrl-C while torch is still importing, or in a short tool) also ends with one line."""
    try:
        return main()
    except KeyboardInterrupt as e:
        print(f"interrupted by {signal_name(e)}; files are written whole or not at all; rerun "
              "the same command", file=sys.stderr)
        return exit_code(e)


def interrupted_line(exc, kept, argv, flag="--resume", script=None, insert_at=None):
    """`interrupted by SIGTERM; kept ...; resume with: ...` (one line)."""
    return (f"interrupted by {signal_name(exc)}; {kept}; resume with: "
            f"{resume_command(argv, flag, script, insert_at)}")


def add_readout_source_args(parser):
    """The encoder and data arguments every readout tool shares (linear, kNN)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT",
                     help="a tools/pretrain.py checkpoint, or any checkpoint the converter "
                          "accepts (torchvision, timm, Lightning, solo-learn, DINO, ...; "
                          "docs/checkpoints.md)")
    src.add_argument("--random-init", action="store_true",
                     help="read out a randomly initialised encoder (needs --arch)")
    parser.add_argument("--take", metavar="NAME",
                        help="the encoder under this path component of a checkpoint holding "
                             "several (teacher, student, state_dict_ema, ...), as in "
                             "tools/convert_to_detectron2.py")
    parser.add_argument("--prefix", metavar="PREFIX",
                        help="the encoder's dotted key prefix in the checkpoint (full, or its "
                             "tail), as in tools/convert_to_detectron2.py")
    from . import ARCHS

    parser.add_argument("--arch", metavar="ARCH",
                        help=f"{', '.join(ARCHS)} (with --random-init)")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help="folder the result file (readout.json, knn.json) is written to")
    parser.add_argument("--data", metavar="ROOT",
                        help="folder with train/ and val/ ImageFolder splits (default: next to "
                             "the checkpoint's DATA.ROOT, else "
                             "$DETECTRON2_DATASETS/loco_synth/imagefolder)")


def check_readout_source(parser, args):
    if args.random_init and not args.arch:
        parser.error("--random-init needs --arch (e.g. --arch resnet18)")
    if args.random_init and (args.take or args.prefix):
        parser.error("--take / --prefix pick the encoder in a --checkpoint, not a random init")
