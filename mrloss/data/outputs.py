"""Output files written as one unit: all or nothing, never a mix of new and old files.

Every output is first written under one hidden scratch directory inside the output directory
(``.mrloss-tmp-*``, same file system), flushed and fsynced. `OutputUnit.commit` then moves every old file the
unit replaces or makes stale out of the way, renames the new ones into place and deletes the old ones; an
error or an interrupt before that (or a failed rename, which is rolled back) leaves every earlier output
untouched and removes the scratch directory.
A reader therefore never sees a new train file next to an old validation file: at worst (a kill during
the renames themselves) a file is missing. A ``kill -9`` can leave the scratch directory behind; nothing
reads it, and the next unit in the same directory removes it once its process (named in it: host and pid) is
gone -- unless it holds old outputs a killed commit had moved aside, which are kept and named in a warning.

A unit may also record what it wrote (``manifest``: a hidden JSON file in the directory, replaced in the same
commit), so that a later writer replaces only files an earlier one wrote (`recorded_outputs`), and hold the
directory's lock (``lock``: `DirectoryLock`, one writer per directory) from `__enter__` to commit or abort.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path

SCRATCH_PREFIX = ".mrloss-tmp-"
REPLACED = "replaced"  # the scratch subdirectory that holds old outputs while a commit renames


class OutputUnit:
    """``targets`` (files or directories, all in ``directory``) written together; ``stale``: other paths the
    unit removes when it commits (e.g. a validation file an earlier run wrote). Use as a context manager:
    leaving it by an exception aborts (scratch removed, nothing changed)."""

    def __init__(self, directory, targets, *, stale=(), manifest: str | None = None, lock: str | None = None):
        """``manifest``: file name (in ``directory``) recording the names of ``targets`` at commit; ``lock``: file
        name of the `DirectoryLock` held while the unit is open (a second writer fails in `__enter__`)."""
        self.directory = Path(directory)
        self.manifest, self._lock_name, self._lock = manifest, lock, None
        self.targets = [Path(target) for target in targets]
        self.stale = [Path(path) for path in stale if Path(path) not in self.targets]
        outside = [str(path) for path in self.targets + self.stale if path.parent != self.directory]
        if outside:
            raise ValueError(f"outputs must lie in {self.directory}, got {', '.join(outside)}")
        self.scratch: Path | None = None
        self._created: list[Path] = []  # directories this unit made, removed again when nothing is committed

    def __enter__(self) -> OutputUnit:
        """Create the scratch directory: an unwritable output directory fails here, before any work."""
        missing = self.directory.absolute()
        while not missing.exists():
            self._created.insert(0, missing)
            missing = missing.parent
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if self._lock_name is not None:
                self._lock = DirectoryLock(self.directory / self._lock_name).acquire()
            self.scratch = Path(tempfile.mkdtemp(dir=self.directory, prefix=f"{_scratch_prefix()}{os.getpid()}-"))
        except BaseException:
            self.abort()
            raise
        remove_abandoned_scratch(self.directory)
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.abort()

    def path(self, target) -> Path:
        """Where the new ``target`` is written until `commit` (a file or a directory the caller creates)."""
        target = Path(target)
        if target not in self.targets:
            raise KeyError(f"{target} is not an output of this unit")
        return self.scratch / target.name

    def commit(self) -> None:
        """fsync the new outputs (and the manifest), move the old ones aside, rename the new ones in, delete the old
        ones. A failed rename puts every file back where it was (the old manifest included)."""
        for target in self.targets:
            _fsync_tree(self.path(target))
        targets = list(self.targets)
        if self.manifest is not None:
            record = self.scratch / self.manifest
            names = [target.name for target in self.targets]
            record.write_text(json.dumps({"outputs": names}, indent=1) + "\n", encoding="utf-8")
            _fsync_file(record)
            targets.append(self.directory / self.manifest)
        aside = self.scratch / REPLACED
        aside.mkdir()
        moved, placed = [], []
        try:
            for old in targets + self.stale:
                if old.exists() or old.is_symlink():
                    os.replace(old, aside / old.name)
                    moved.append(old)
            for target in targets:
                os.replace(self.scratch / target.name, target)
                placed.append(target)
        except BaseException:  # put everything back as it was
            for target in placed:
                os.replace(target, self.scratch / target.name)
            for old in moved:
                os.replace(aside / old.name, old)
            raise
        _fsync_directory(self.directory)
        self._created = []
        self.abort()

    def abort(self) -> None:
        """Remove the scratch directory (new outputs not committed, old outputs moved aside by an interrupted
        commit); idempotent."""
        if self.scratch is not None and self.scratch.exists():
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        for directory in reversed(self._created):
            try:
                directory.rmdir()
            except OSError:
                break
        self._created = []


def recorded_outputs(directory, manifest: str) -> set[str]:
    """The file names the last unit with this ``manifest`` committed in ``directory`` (empty: none recorded)."""
    try:
        record = json.loads((Path(directory) / manifest).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as error:
        raise OSError(f"cannot read {Path(directory) / manifest}: {error}") from None
    outputs = record.get("outputs") if isinstance(record, dict) else None
    return {name for name in outputs if isinstance(name, str)} if isinstance(outputs, list) else set()


class DirectoryLock:
    """An exclusive, non-blocking ``flock`` on a file (created if missing, holding the owner's host and pid):
    one writer per directory. The kernel drops the lock when its process dies, so a ``kill -9`` leaves no stale
    lock; `release` removes the file while still holding it, and `acquire` retries when the file it locked was
    removed meanwhile (so two writers never hold locks on different files of the same name)."""

    def __init__(self, path):
        self.path = Path(path)
        self._descriptor: int | None = None

    def acquire(self) -> DirectoryLock:
        """Take the lock; BlockingIOError naming the holder when another process has it."""
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(descriptor)
                raise BlockingIOError(
                    f"{self.path.parent} is being written by {holder} (lock {self.path.name}); wait for it to finish"
                ) from None
            try:
                same = os.fstat(descriptor).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(descriptor)  # locked a file its holder removed on release: lock the current one
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        if self._descriptor is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._descriptor)  # closing drops the flock
            self._descriptor = None


def _scratch_prefix() -> str:
    """``.mrloss-tmp-<host>-``, followed by ``<pid>-``: whose scratch directory it is (output directories may be
    shared between hosts)."""
    return f"{SCRATCH_PREFIX}{socket.gethostname().replace('-', '_')}-"


def remove_abandoned_scratch(directory) -> list[Path]:
    """Remove the scratch directories in ``directory`` of processes of this host that no longer run (a
    ``kill -9``); one that holds old outputs (an interrupted commit) is kept and named in a warning. Returns
    the removed paths."""
    removed, prefix = [], _scratch_prefix()
    for scratch in Path(directory).glob(f"{prefix}*-*"):
        pid = scratch.name[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        if (scratch / REPLACED).exists():
            warnings.warn(
                f"{scratch}: an interrupted commit left earlier outputs in {scratch / REPLACED}; "
                "move back what you need and delete the directory",
                stacklevel=2,
            )
            continue
        shutil.rmtree(scratch, ignore_errors=True)
        removed.append(scratch)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                _fsync_file(child)
        _fsync_directory(path)
    else:
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
