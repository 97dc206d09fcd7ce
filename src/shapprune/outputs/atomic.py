"""Writing results without ever overwriting what the user owns: a temporary directory renamed at the end."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from shapprune.errors import UserError

log = logging.getLogger("shapprune")

#: the name of a temporary output folder: ``.OUT.tmp-PID-RANDOM`` (the PID tells a dead writer's leftovers)
TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[^/]+$")
#: signals that end a run as Ctrl-C does: the temporary folder is removed first
CLEANUP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _follow_umask(path: Path, directory: bool) -> None:
    """Give ``path`` the mode a plain ``mkdir``/``open`` would have given it (``mkdtemp``/``mkstemp`` use 0700/0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def check_writable(path: Path, option: str) -> None:
    """The nearest existing folder above ``path`` must be a folder this process may write to."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: no permission to write in {parent}; choose a path you may write to")


def check_new_file(path: str | os.PathLike, force: bool = False, option: str = "--json-out") -> Path:
    """Refuse an existing file (unless ``force``) before any work starts; the same rule for every command."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file path")
    if p.exists() and not force:
        raise UserError(f"{option} {path} already exists; choose a new path or pass --force to overwrite it")
    check_writable(p, option)
    return p


def check_out_dir(out: str | os.PathLike) -> Path:
    """Refuse an existing non-empty output directory (or an existing file) before any work starts."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file; give a directory that does not exist yet (or an empty one)")
    if path.exists() and any(path.iterdir()):
        raise UserError(f"--out {out} already exists and is not empty; choose a new directory")
    check_writable(path, "--out")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process (or cannot tell): alive
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary output folders in ``folder`` left by processes that no longer run (killed with
    SIGKILL, or a machine that went down), logging each; those of live processes are left alone."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = TEMP_NAME.match(entry.name)
        if not m or not entry.is_dir() or entry.is_symlink() or _alive(int(m.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if entry.exists():
            log.warning("could not remove %s, a temporary output folder of a process that no longer runs", entry)
        else:
            log.info("removed %s, a temporary output folder of a process (%s) that no longer runs", entry, m.group(1))
            removed.append(entry)
    return removed


def _follow_umask_tree(root: Path) -> None:
    """Every file and folder under ``root`` as a plain ``open``/``mkdir`` under the umask would make it (libraries
    that write through ``mkstemp`` leave 0600); executable files keep their execute bits."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                continue
            mode = os.stat(p).st_mode
            os.chmod(p, (0o777 if mode & 0o111 else 0o666) & ~mask)
    os.chmod(root, 0o777 & ~mask)


class _Terminated(SystemExit):
    """Raised in the main thread by SIGTERM/SIGHUP inside :func:`atomic_dir` (exit status 128 + signal)."""


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`_Terminated` (so ``finally`` blocks run) while the block runs; only in
    the main thread, and only where the default handler was in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated(128 + signum)

    old = {}
    for sig in CLEANUP_SIGNALS:
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` only if the block succeeds.

    The temporary folder is removed on an error, Ctrl-C, SIGTERM and SIGHUP; leftovers of writers that died
    otherwise (SIGKILL) are removed by the next run in the same folder. What is written follows the umask."""
    path = check_out_dir(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    with _signals_raise():
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
        try:
            _follow_umask(tmp, directory=True)
            yield tmp
            _follow_umask_tree(tmp)
            check_out_dir(path)  # still free?
            if path.exists():
                path.rmdir()
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _link_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist (a hard link fails on an existing name)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise UserError(f"{path} appeared while this command ran; it was left as it is") from None
    except OSError:  # no hard links on this filesystem
        check_new_file(path)
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_json(path: str | os.PathLike, obj, force: bool = True) -> None:
    """Write JSON through a temporary file in the same directory, then rename; the file follows the umask.

    With ``force=False`` an existing file is refused (checked again at the end, after the work)."""
    path = Path(path).expanduser()
    if not force:
        check_new_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
        _follow_umask(Path(tmp), directory=False)
        if force:
            os.replace(tmp, path)
        else:
            _link_new(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
