"""loco_det.utils: stale temporary files, output-location checks, deferred signals."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from loco_det import utils


def test_remove_stale_temps_only_removes_dead_writers_of_this_host(tmp_path):
    target = tmp_path / "ckpt.pth"
    dead = tmp_path / (utils.temp_prefix(str(target), pid=2 ** 22 + 1) + "x")  # > pid_max
    live = tmp_path / (utils.temp_prefix(str(target), pid=os.getppid()) + "y")
    other_host = tmp_path / f".tmp_ckpt.pth.{socket.gethostname()}x-{2 ** 22 + 1}.z"
    other_name = tmp_path / (utils.temp_prefix(str(tmp_path / "other"), pid=2 ** 22 + 1) + "w")
    for p in (dead, live, other_host, other_name):
        p.write_bytes(b"partial")
    assert utils.remove_stale_temps(str(target)) == [str(dead)]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (live, other_host, other_name))
    with utils.atomic_write(str(tmp_path / "other"), "w") as f:  # each write cleans its own name
        f.write("whole")
    assert not other_name.exists() and (tmp_path / "other").read_text() == "whole"


def test_check_output_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    utils.check_output_dir(str(tmp_path / "new" / "run"))  # may not exist yet
    with pytest.raises(utils.LocoError, match=r"--output-dir \S+f is an existing file"):
        utils.check_output_dir(str(tmp_path / "f"))
    with pytest.raises(utils.LocoError, match=r"is inside \S+f, which is an existing file"):
        utils.check_output_dir(str(tmp_path / "f" / "run"))
    assert os.listdir(tmp_path) == ["f"]  # created nothing


def test_check_distinct(tmp_path):
    src = tmp_path / "a.json"
    src.write_text("{}")
    utils.check_distinct(str(tmp_path / "b.json"), str(src))
    for same in (str(src), str(tmp_path / "." / "a.json")):
        with pytest.raises(utils.LocoError, match="is the input file"):
            utils.check_distinct(same, str(src))


def test_sigterm_is_interrupted_and_deferred_during_writes(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(utils.Interrupted) as info:
        with utils.interruptible():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10 ** 6):  # the handler runs between bytecodes
                pass
    assert info.value.signum == signal.SIGTERM and utils.exit_code(info.value) == 143
    assert signal.getsignal(signal.SIGTERM) == before  # restored
    path = tmp_path / "f.txt"
    with pytest.raises(utils.Interrupted):
        with utils.interruptible():
            with utils.atomic_write(str(path), "w") as f:
                f.write("first half ")
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10 ** 5):
                    pass
                f.write("second half")  # still written: the signal waits for the rename
    assert path.read_text() == "first half second half"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_interrupted_line_names_signal_and_resume_command():
    e = utils.Interrupted(signal.SIGTERM)
    line = utils.interrupted_line(e, "kept run/checkpoint_last.pth", ["--config", "a b.yaml"],
                                  script="tools/pretrain.py")
    assert line == ("interrupted by SIGTERM; kept run/checkpoint_last.pth; resume with: python "
                    "tools/pretrain.py --config 'a b.yaml' --resume")
    assert utils.resume_command(["--c", "x", "K", "V"], insert_at=2, script="t.py") == \
        "python t.py --c x --resume K V"


def _set_and_sleep(event, seconds):
    event.set()
    time.sleep(seconds)


def test_forked_child_ends_by_the_signal_not_a_traceback():
    """multiprocessing pools terminate their (forked) workers with SIGTERM: a worker must die
    quietly as without loco_det, not raise `Interrupted` with a traceback."""
    import multiprocessing as mp

    with utils.interruptible():
        ctx = mp.get_context("fork")
        running = ctx.Event()
        child = ctx.Process(target=_set_and_sleep, args=(running, 30))
        child.start()
        assert running.wait(30)   # the child runs its target: terminate it there
        child.terminate()
        child.join(10)
    assert child.exitcode == -signal.SIGTERM


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_die_with_parent_catches_a_parent_that_died_before_the_child_asked():
    preexec = utils.die_with_parent()
    ok = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=preexec)
    assert ok.returncode == 0
    # the same function run in a child of another process: its parent is not the one it was
    # made for, as after the parent died between fork and prctl
    pid = os.fork()
    if pid == 0:
        grandchild = os.fork()
        if grandchild == 0:
            preexec()
            os._exit(0)
        os._exit(os.waitstatus_to_exitcode(os.waitpid(grandchild, 0)[1]))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
