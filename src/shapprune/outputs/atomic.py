"""Writing results without ever overwriting what the user owns: a temporary directory renamed at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shapprune.errors import UserError


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


def check_new_file(path: str | os.PathLike, force: bool = False, option: str = "--json") -> Path:
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
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; choose a new directory")
    check_writable(path, "--out")
    return path


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` only if the block succeeds."""
    path = check_out_dir(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    _follow_umask(tmp, directory=True)
    try:
        yield tmp
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
