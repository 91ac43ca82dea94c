"""Output directories that appear whole or not at all, and files created with the user's umask.

Every CLI stage writes its ``--out`` through :func:`staged_output`: the stage builds its output in
a temporary sibling directory (``.<name>.sparselora-tmp-<host>-<pid>-<rand>``, same filesystem, so the
final step is a rename) and only a stage that succeeded replaces the target:

1. every file of the new output is fsynced;
2. an existing previous output is renamed aside (``.<name>.sparselora-old-<host>-<pid>-<rand>``);
3. the new directory is renamed to the target;
4. the old one is removed.

An error or Ctrl-C before step 2 removes the temporary directory and leaves the previous output
byte-identical. Ctrl-C is held back during steps 2-3 (POSIX main thread) so it cannot split them.
Only a hard kill or power loss between steps 2 and 3 leaves the target missing; the next stage
given the same ``--out`` then puts the previous output (the ``-old-`` directory) back before it
starts, and removes leftovers of dead processes (a killed stage's temporary directory, an old
output a crash left behind after step 3). Directories of a process that is still running, or of
another host (a shared filesystem), are never touched.

An existing target is replaced only when it is empty or a previous sparselora output (it holds
``sparselora.json``): a typo in ``--out`` must not delete an unrelated directory.

:func:`new_file` / :func:`new_dir` create uniquely named entries like ``tempfile.mkstemp`` /
``mkdtemp``, but with the modes ``open``/``mkdir`` give (0666/0777 minus the umask, so 0644/0755
under the usual umask 022) instead of 0600/0700: outputs must be readable by a serving process
running as another user. (safetensors itself writes 0600 files whatever the umask; hence the
permission step above, and the same in :func:`sparselora.checkpoint.save_sparse`.)
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import stat
import threading
from pathlib import Path

__all__ = ["OutputError", "staged_output", "new_file", "new_dir", "umask_file_mode", "MARKER"]

log = logging.getLogger(__name__)

MARKER = "sparselora.json"  # a directory holding this is a sparselora output, which a stage may replace
_TMP, _OLD = "sparselora-tmp", "sparselora-old"


def _host() -> str:
    # in the names of staged directories: a pid means something only on its own host (shared
    # filesystems, containers), so leftovers of other hosts are never judged dead and removed
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _prefix(target: Path, kind: str, pid: int | None = None) -> str:
    return f".{target.name}.{kind}-{_host()}-{os.getpid() if pid is None else pid}-"


class OutputError(Exception):
    """The output path cannot be used (an existing file, an unrelated directory, no permission)."""


def _unique(directory: Path, prefix: str, suffix: str, create) -> Path:
    for _ in range(100):
        p = Path(directory) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            create(p)
        except FileExistsError:
            continue
        return p
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {directory}")


def new_file(directory, prefix: str = ".", suffix: str = ".tmp") -> Path:
    """Create a new empty file with a unique name in ``directory``; mode 0666 minus the umask."""
    def create(p: Path) -> None:
        os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666))

    return _unique(directory, prefix, suffix, create)


def new_dir(directory, prefix: str = ".", suffix: str = ".tmp") -> Path:
    """Create a new empty directory with a unique name in ``directory``; mode 0777 minus the umask."""
    return _unique(directory, prefix, suffix, lambda p: os.mkdir(p, 0o777))


def fsync_path(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask_file_mode(directory) -> int:
    """The mode ``open`` gives a new file in ``directory`` (0666 minus the umask), probed by creating
    one: reading the umask itself (``os.umask``) changes it for every thread for a moment."""
    p = new_file(directory, ".mode-probe.", ".tmp")
    try:
        return stat.S_IMODE(os.stat(p).st_mode)
    finally:
        os.unlink(p)


def _finish_tree(root: Path) -> None:
    """Give every file at least the umask's permissions (safetensors writes 0600 whatever the umask,
    so even ``save_pretrained`` output would be private), then fsync files and directories."""
    want = umask_file_mode(root)
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            mode = stat.S_IMODE(p.lstat().st_mode)
            if not p.is_symlink() and mode | want != mode:
                os.chmod(p, mode | want)
            fsync_path(p)
        fsync_path(Path(dirpath), directory=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _leftovers(target: Path, kind: str) -> list[Path]:
    """This host's dead processes' ``kind`` siblings of ``target``, newest first."""
    base = f".{target.name}.{kind}-{_host()}-"
    out = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        if not p.name.startswith(base):
            continue
        try:
            pid = int(p.name[len(base):].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            out.append(p)

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(out, key=mtime, reverse=True)


def _recover(target: Path) -> None:
    """Undo what a killed stage left: put a previous output back if the target is missing, then
    remove dead processes' temporary and old directories."""
    olds = _leftovers(target, _OLD)
    if olds and not os.path.lexists(target):
        os.rename(olds[0], target)
        log.warning("%s: put back the previous output from %s (a stage was killed while replacing it)", target, olds[0].name)
        olds = olds[1:]
    for p in olds + _leftovers(target, _TMP):
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed %s, left by a killed stage", p)


def _check_target(target: Path, shown: str, option: str) -> None:
    if os.path.lexists(target) and not target.is_dir():
        raise OutputError(f"{option} {shown} is an existing file, not a directory; give a directory path")
    if target.is_dir():
        try:
            entries = [p.name for p in target.iterdir()]
        except OSError as e:
            raise OutputError(f"{option} {shown}: cannot read the existing directory ({e.strerror})") from None
        if entries and MARKER not in entries:
            raise OutputError(f"{option} {shown} is an existing directory that is not a sparselora output (no {MARKER}); "
                              "a stage replaces its --out as a whole: give a new or empty directory")


@contextlib.contextmanager
def _sigint_held():
    """Delay Ctrl-C until after the block so a two-rename swap is not split by it. The Python-level
    handler is swapped for one that only records the signal (blocking SIGINT with pthread_sigmask is
    not enough: the kernel hands a process-directed signal to any thread that does not block it,
    e.g. one of torch's OpenMP workers, and Python then raises in the main thread at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got and callable(old):
            old(signal.SIGINT, got[0])  # Python's default handler raises KeyboardInterrupt here


def _commit(tmp: Path, target: Path) -> None:
    _finish_tree(tmp)
    old, committed = None, False
    try:
        with _sigint_held():
            if os.path.lexists(target):
                old = new_dir(target.parent, _prefix(target, _OLD))
                os.rename(target, old)  # onto the empty placeholder new_dir made: rename may replace an empty directory
            try:
                os.rename(tmp, target)
                committed = True
            except BaseException:
                if old is not None:
                    os.rename(old, target)
                raise
            fsync_path(target.parent, directory=True)
    finally:  # a Ctrl-C held back above arrives here, after the swap
        if old is not None:
            if committed:
                shutil.rmtree(old, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.rmdir(old)  # only the empty placeholder; never a previous output


@contextlib.contextmanager
def staged_output(out, option: str = "--out"):
    """Yield a fresh temporary directory next to ``out``; on normal exit it replaces ``out``, on any
    exception (KeyboardInterrupt included) it is removed and ``out`` is left as it was.

    Checks ``out`` first, so a stage fails before its work: :class:`OutputError` for an existing
    file, an existing directory that is not a sparselora output, or a place that cannot be written.
    """
    shown = str(out)
    target = Path(os.path.realpath(out))  # a symlinked --out: replace the directory it points to
    _check_target(target, shown, option)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _recover(target)
        tmp = new_dir(target.parent, _prefix(target, _TMP))
    except OSError as e:
        raise OutputError(f"{option} {shown}: cannot create the output next to it in {target.parent} ({e.strerror or e})") from None
    try:
        yield tmp
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
