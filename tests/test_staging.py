"""sparselora.staging: outputs appear whole or not at all, leftovers of killed stages are undone,
and files/directories get the umask's modes (not mkstemp's 0600)."""
import os
import stat
import subprocess
import sys

import pytest

from sparselora import staging
from sparselora.staging import MARKER, OutputError, new_dir, new_file, staged_output


def snapshot(d):
    """Every file's bytes and mode, and every directory, under ``d``."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None, stat.S_IMODE(p.stat().st_mode))
            for p in sorted(d.rglob("*"))}


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if staging._TMP in p.name or staging._OLD in p.name)


def previous_output(path):
    path.mkdir()
    (path / MARKER).write_text('{"stage": "pruned"}\n')
    (path / "model.safetensors").write_bytes(os.urandom(1000))
    (path / "sub").mkdir()
    (path / "sub" / "x.bin").write_bytes(b"old")
    return snapshot(path)


def test_success_replaces_the_previous_output(tmp_path):
    out = tmp_path / "out"
    previous_output(out)
    with staged_output(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out and not (tmp / MARKER).exists()
        (tmp / MARKER).write_text("{}")
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "new.txt"])
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("injected"), KeyboardInterrupt()])
def test_failure_or_interrupt_leaves_the_previous_output(tmp_path, exc):
    out = tmp_path / "out"
    before = previous_output(out)
    with pytest.raises(type(exc)):
        with staged_output(out) as tmp:
            (tmp / MARKER).write_text("{}")
            (tmp / "model.safetensors").write_bytes(b"half-written")
            raise exc
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_failed_swap_rolls_back(tmp_path, monkeypatch):
    """The rename of the new directory into place fails after the old one was moved aside."""
    out = tmp_path / "out"
    before = previous_output(out)
    real = os.rename

    def rename(src, dst):
        if staging._TMP in str(src):
            raise OSError(28, "No space left on device (injected)")
        return real(src, dst)

    monkeypatch.setattr(staging.os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        with staged_output(out) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_swap_is_undone_by_the_next_stage(tmp_path):
    """A hard kill between 'old aside' and 'new in' leaves no --out, the old output aside and the
    new one staged: the next stage for that --out puts the old one back and clears the rest."""
    out = tmp_path / "out"
    before = previous_output(out)
    pid = _dead_pid()
    os.rename(out, tmp_path / f"{staging._prefix(out, staging._OLD, pid)}0123abcd")
    (tmp_path / f"{staging._prefix(out, staging._TMP, pid)}4567ef01").mkdir()
    other = tmp_path / f"{staging._prefix(tmp_path / 'other', staging._TMP, pid)}4567ef01"
    other.mkdir()  # another output's: not ours to touch
    elsewhere = tmp_path / f".out.{staging._TMP}-otherhost-{pid}-89abcdef"
    elsewhere.mkdir()  # a process on another host sharing the filesystem: its pid means nothing here
    with pytest.raises(RuntimeError):
        with staged_output(out):
            raise RuntimeError("injected")
    assert snapshot(out) == before
    assert leftovers(tmp_path) == sorted([other.name, elsewhere.name])


def test_a_running_stage_is_left_alone(tmp_path):
    out = tmp_path / "out"
    previous_output(out)
    mine = tmp_path / f"{staging._prefix(out, staging._TMP)}0123abcd"  # this process is alive
    mine.mkdir()
    with staged_output(out) as tmp:
        (tmp / MARKER).write_text("{}")
    assert mine.is_dir()


def test_refuses_what_it_must_not_replace(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    with pytest.raises(OutputError, match="--out .*file.* is an existing file"):
        with staged_output(f):
            pass
    unrelated = tmp_path / "docs"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("keep")
    with pytest.raises(OutputError, match="not a sparselora output"):
        with staged_output(unrelated):
            pass
    assert (unrelated / "thesis.tex").read_text() == "keep" and f.read_text() == "keep"
    with pytest.raises(OutputError, match="cannot create"):
        with staged_output(f / "sub", option="--json"):
            pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_output(empty) as tmp:
        (tmp / "a").write_text("a")
    assert (empty / "a").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_modes_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        f = new_file(tmp_path, ".x.", ".tmp")
        d = new_dir(tmp_path, ".d.", ".tmp")
        with staged_output(tmp_path / "out") as tmp:
            (tmp / "a").write_text("a")
            (tmp / "private").write_text("b")
            os.chmod(tmp / "private", 0o600)  # as safetensors writes every file
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == file_mode
    assert stat.S_IMODE(d.stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "out" / "private").stat().st_mode) == file_mode


def test_ctrl_c_cannot_split_the_swap(tmp_path, monkeypatch):
    """Ctrl-C arriving between 'old aside' and 'new in' is held back until the swap is done: the new
    output is in place, the old one removed, and then the KeyboardInterrupt is raised."""
    import signal

    out = tmp_path / "out"
    previous_output(out)
    real = os.rename

    def rename(src, dst):
        real(src, dst)
        if staging._OLD in str(dst):  # the old output was just moved aside
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # plenty of bytecodes for an unblocked handler to run here
                pass

    monkeypatch.setattr(staging.os, "rename", rename)
    # another thread that does not block SIGINT (as torch's OpenMP workers): the kernel may deliver
    # the signal to it, so holding Ctrl-C back must not rely on the main thread's signal mask
    import threading

    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        _swap_interrupted(out)
    finally:
        stop.set()
        other.join()
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "new.txt"])
    assert leftovers(tmp_path) == []


def _swap_interrupted(out):
    with pytest.raises(KeyboardInterrupt):
        with staged_output(out) as tmp:
            (tmp / MARKER).write_text("{}")
            (tmp / "new.txt").write_text("new")
