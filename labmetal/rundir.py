"""Private places on disk: run directories (sockets, pid files, FUSE mounts, daemons' logs)
and the service's state (database, secret key, image and overlay stores).

Why: a directory at a predictable path that someone else could create first is theirs,
not ours. A local user who made ``/tmp/labmetal-ov-<hash>`` before labmetal did (or a
symbolic link by that name) chose where root wrote its pid files and logs, and made it
overwrite a root-owned file (issue 14). So a run directory is made 0700 by us; if it is
already there it must be a real directory (not a symbolic link) that we own, with mode
0700, in parents nobody else can write to (or sticky, like /tmp). Anything else is
refused with the reason, never "fixed": we cannot know what else it was made for.

State files are different: they are ours by construction, so ``tighten`` takes the group
and world bits off the ones an older labmetal (or a umask of 022) left readable.
Stdlib only, no I/O at import.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class UnsafeDirectory(PermissionError):
    """A run directory (or one of its parents) is not safe to use; the message says why
    and what to do."""


def default_run_root() -> Path:
    """Where run directories go when none is configured: ``/run/labmetal`` for root (a
    tmpfs only root can write to, emptied at boot), ``$XDG_RUNTIME_DIR/labmetal`` for
    others (the same, per user), else ``<tmp>/labmetal-<uid>``. The last is predictable,
    so it is checked like any other (someone else's is refused). A fresh mkdtemp would
    be safe too, but a restarted service must find the daemons it left running."""
    if os.geteuid() == 0:
        return Path("/run/labmetal")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "labmetal"
    return Path(tempfile.gettempdir()) / f"labmetal-{os.geteuid()}"


def private_dir(path: str | os.PathLike) -> Path:
    """Make ``path`` (and missing parents) mode 0700, or check that it is a private
    directory of ours already; raise UnsafeDirectory otherwise. Returns the path with its
    parents' symbolic links resolved: use that one, the checks were made on it."""
    path = Path(path).absolute()
    parent = Path(os.path.realpath(path.parent))
    _check_parents(parent)
    if not parent.exists():
        parent = private_dir(parent)
    path = parent / path.name
    try:
        os.mkdir(path, 0o700)  # the umask can only take bits away
    except FileExistsError:
        pass
    _check_private(path)
    return path


def group_dir(path: str | os.PathLike, gid: int) -> Path:
    """Make ``path`` mode 0710, owned by this process and group ``gid`` (a directory of ours
    already there is set so: systemd's RuntimeDirectory= makes it 0700): a directory that
    group may pass through but not list or write, for a socket a less privileged helper must
    reach (the front's nginx workers, labmetal/front.py). Refused if it is anyone else's."""
    path = Path(path).absolute()
    parent = Path(os.path.realpath(path.parent))
    _check_parents(parent)
    path = parent / path.name
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) \
            or info.st_uid != os.geteuid():
        raise UnsafeDirectory(f"refusing to use {path}: it is not a directory of uid "
                              f"{os.geteuid()}; remove it")
    os.chown(path, os.geteuid(), gid)
    os.chmod(path, 0o710)
    return path


def tighten(path: str | os.PathLike) -> str | None:
    """Take the group and world bits off a state file or directory of ours; returns what
    was done (for a warning in the log), or None if nothing needed doing. Someone else's
    is left as it is and said."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode) or not mode & 0o077:
        return None
    if info.st_uid != os.geteuid():
        return (f"{path} is readable by others (mode {mode:04o}) and belongs to uid "
                f"{info.st_uid}, not to this process: left as it is, check it")
    os.chmod(path, mode & 0o700)
    return f"{path} was readable by others (mode {mode:04o}); now {mode & 0o700:04o}"


def _check_parents(parent: Path) -> None:
    """Every existing directory above: root's or ours, and writable by no one else unless
    sticky (then no one else can rename or remove what we made in it)."""
    for directory in [parent, *parent.parents]:
        try:
            info = os.lstat(directory)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid not in (0, os.geteuid()):
            raise UnsafeDirectory(f"refusing to use a run directory under {directory}: it "
                                  f"belongs to uid {info.st_uid}, who could replace what "
                                  "labmetal makes there")
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise UnsafeDirectory(f"refusing to use a run directory under {directory}: "
                                  f"others may write to it (mode {mode:04o}) and could "
                                  "replace what labmetal makes there")


def _check_private(path: Path) -> None:
    info = os.lstat(path)
    hint = "remove it, or configure another run directory"
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeDirectory(f"refusing to use {path} as a run directory: it is a symbolic "
                              f"link (to {os.readlink(path)}); {hint}")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"refusing to use {path} as a run directory: it is not a "
                              f"directory; {hint}")
    if info.st_uid != os.geteuid():
        raise UnsafeDirectory(f"refusing to use {path} as a run directory: it belongs to "
                              f"uid {info.st_uid}, not to this process (uid {os.geteuid()}); "
                              f"{hint}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise UnsafeDirectory(f"refusing to use {path} as a run directory: its mode is "
                              f"{mode:04o}, not 0700 (chmod 700 {path} if it is yours)")
