"""Where an export writes before its bundle exists: checks on ``-o``, hidden work folders beside it,
and the removal of those left by exports that died.

An export writes into ``.tinyv-export-*`` (and the vision stage into ``.vision-export-*``) beside
``-o`` and renames at the end; an error, Ctrl-C or SIGTERM (the CLI turns it into an interrupt)
removes them. SIGKILL, or a machine that loses power, cannot be caught, so each work folder's name
carries its owner (a tag of the host name and the process id), and the next export in the same
place removes the folders whose owner process is gone. A folder of another host, of a live process,
or without an owner in its name (older tinyv) is left alone.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager

from tinyv.engine.bundle import MANIFEST
from tinyv.engine.paths import folder_problem
from tinyv.errors import TinyVError

EXPORT_PREFIX = ".tinyv-export-"
VISION_PREFIX = ".vision-export-"
_OWNED = re.compile(r"^\.(?:tinyv|vision)-export-([0-9a-f]{8})-(\d+)-")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def work_folder(prefix: str, parent: str) -> str:
    """A new hidden folder in ``parent`` whose name says which process on which host owns it."""
    return tempfile.mkdtemp(prefix=f"{prefix}{_host_tag()}-{os.getpid()}-", dir=parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # e.g. it belongs to another user: it exists
        return True
    return True


def remove_stale(parent: str) -> list[str]:
    """Remove the work folders in ``parent`` of exports on this host whose process is gone;
    returns their names."""
    if os.name != "posix":  # os.kill(pid, 0) only asks on POSIX
        return []
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    host, removed = _host_tag(), []
    for name in names:
        owner = _OWNED.match(name)
        if not owner or owner.group(1) != host or _alive(int(owner.group(2))):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def check_target(out, force: bool) -> str:
    """``out`` as an absolute path, after checking that the export may write there."""
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out) and not os.path.isdir(out):
        raise TinyVError(f"{out} is a file; -o names the bundle folder to write, and tinyv will not replace a file")
    if os.path.exists(out) and not force:
        raise TinyVError(f"{out} already exists; choose another -o or pass --force to replace it")
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, MANIFEST)) and os.listdir(out):
        raise TinyVError(f"{out} is a folder that is not a tinyv bundle; tinyv will not replace it")
    problem = folder_problem(os.path.dirname(out))
    if problem:
        raise TinyVError(f"cannot write {out}: {problem}")
    return out


@contextmanager
def staging_folder(out: str):
    """A work folder beside ``out`` (same file system: the final move is a rename), removed with
    whatever is in it unless the export renamed it; a full disk becomes a TinyVError. Work folders
    of dead exports there are removed first."""
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale(parent)
        tmp = work_folder(EXPORT_PREFIX, parent)
    except OSError as e:
        raise TinyVError(f"cannot write {out} ({e.strerror or e}); choose another -o") from None
    try:
        yield tmp
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise TinyVError(f"the disk is full while writing {out}; free space and export again") from None
        raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
