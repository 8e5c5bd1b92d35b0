"""Outputs that appear whole or not at all, and replace only what papa-merge wrote.

An output (a file, or a model folder) is written under a hidden temporary name beside its final
path, ``.NAME.tmp-HOST-PID-RANDOM``, and renamed into place only when complete (a NAME too long
for that to fit the file system's limit of 255 bytes is cut, with a hash of the whole name in its
place, so any legal final name can be written):

- an error, Ctrl-C (SIGINT), SIGTERM or SIGHUP (what ``timeout``, Slurm and ``docker stop`` send)
  removes the temporary output; the process then exits as the signal asked (status 128 + signal);
  the rename itself is never interrupted halfway;
- a process killed outright (SIGKILL, power loss) leaves its temporary behind; the next output
  written into that folder removes it, once no process of that id runs on this host;
- ``force`` replaces an existing output only if papa-merge wrote it: a checkpoint file carrying
  ``papa_merge.*`` metadata, or a folder holding nothing but the files its record
  (``.papa-merge.json``, written with every folder output) lists. Anything else is left alone and
  the error says what is there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from merge.errors import InvalidArgumentError, MergeError, OutputExistsError
from merge.keys import PREFIX, version

__all__ = ["AtomicOutput", "check_output_free", "check_output_name", "Terminated", "MANIFEST", "is_papa_output",
           "remove_stale_temporaries"]

MANIFEST = ".papa-merge.json"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_RE = re.compile(r"^\..+\.(?:tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}$")
_SHOWN = 5  # entries named in a refusal
_NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems


def check_output_name(path: str | os.PathLike) -> Path:
    """The output path, refused if it names no file or folder (``''``, ``.``, ``/``).

    Raises:
        InvalidArgumentError: the path has no name to write under.
    """
    p = Path(path)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise InvalidArgumentError(f"output {str(path)!r} names no file or folder; give a name such as "
                                   "soup.safetensors or soup/", path=path, option="out")
    return p


# --- what papa-merge wrote -------------------------------------------------------------------------------
def _papa_file(path: Path) -> bool:
    """A checkpoint file papa-merge wrote: safetensors or torch file with papa_merge.* metadata."""
    try:
        if zipfile.is_zipfile(path):  # a torch state-dict file: merge.io.torch_writer stores extra/<key>
            with zipfile.ZipFile(path) as z:
                return any(n.split("/extra/", 1)[-1].startswith(PREFIX) for n in z.namelist() if "/extra/" in n)
        from merge.io.safetensors_format import read_checked_header

        fd = os.open(path, os.O_RDONLY)
        try:
            return any(k.startswith(PREFIX) for k in read_checked_header(path, fd).metadata)
        finally:
            os.close(fd)
    except (OSError, MergeError, zipfile.BadZipFile, ValueError):
        return False


def _foreign_in_folder(folder: Path) -> tuple[list[str], bool]:
    """Entries of ``folder`` papa-merge did not write (first few, ``name/`` for folders) and whether it has a record."""
    record = folder / MANIFEST
    listed: set[str] | None = None
    if record.is_file() and not record.is_symlink():
        try:
            files = json.loads(record.read_text(encoding="utf-8"))["files"]
            listed = {f for f in files if isinstance(f, str)}
        except (OSError, ValueError, KeyError, TypeError):
            listed = None
    foreign: list[str] = []
    if listed is None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            foreign.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
            if len(foreign) > _SHOWN:
                break
        return foreign, False
    parents = {p.as_posix() for f in listed for p in Path(f).parents if str(p) != "."}
    for root, dirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        for d in sorted(dirs):
            rel = (rel_root / d).as_posix()
            if rel not in parents or (Path(root) / d).is_symlink():
                foreign.append(rel + "/")
                dirs.remove(d)  # not descended into: it is foreign as a whole
        for n in sorted(names):
            rel = (rel_root / n).as_posix()
            if rel != MANIFEST and (rel not in listed or (Path(root) / n).is_symlink()):
                foreign.append(rel)
        if len(foreign) > _SHOWN:
            break
    return sorted(foreign), True


def is_papa_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is something ``force`` may replace: absent, an empty folder, or a papa-merge output."""
    return _not_ours(Path(path)) is None


def _not_ours(path: Path) -> str | None:
    """None if ``force`` may replace ``path``; else what is there, as a phrase for the refusal."""
    if not (path.exists() or path.is_symlink()):
        return None
    if path.is_symlink():
        return f"is a symbolic link (to {os.readlink(path)})"
    if path.is_file():
        return None if _papa_file(path) else "is a file papa-merge did not write (it has no papa_merge metadata)"
    if not path.is_dir():
        return "is neither a file nor a folder"
    foreign, recorded = _foreign_in_folder(path)
    if not foreign:
        return None
    shown = ", ".join(foreign[:_SHOWN]) + (", ..." if len(foreign) > _SHOWN else "")
    if recorded:
        return f"holds files papa-merge did not write: {shown}"
    return f"holds files with no record that papa-merge wrote them (no {MANIFEST}): {shown}"


def check_output_free(path: Path, *, force: bool, ours: Callable[[Path], bool] | None = None) -> None:
    """Refuse an existing output, unless ``force`` and papa-merge wrote it.

    ``ours`` recognises a file papa-merge wrote that is not a checkpoint (a plot, a table); without it only
    checkpoints and recorded folders are recognised.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is False, or it exists and is not a papa-merge output.
    """
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise OutputExistsError(f"{path}: already exists; choose another output, or replace it", path=path,
                                option="force", choices=(True,))
    why = _not_ours(path)
    if why is not None and ours is not None and path.is_file() and not path.is_symlink() and ours(path):
        why = None
    if why is not None:
        raise OutputExistsError(f"{path}: already exists and {why}; force replaces only a previous papa-merge output, "
                                "so it is left as it is: move it away or choose another output", path=path)


def _write_manifest(folder: Path) -> None:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not p.is_symlink() and p.relative_to(folder).as_posix() != MANIFEST)
    record = {"written_by": "papa-merge", "version": version(), "files": files}
    (folder / MANIFEST).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


# --- leftovers of dead processes --------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or an id we cannot ask about): leave its files alone
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove temporary outputs in ``folder`` left by papa-merge processes of this host that no longer run."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or m.group("host") != _HOST or _alive(int(m.group("pid"))):
            continue
        p = Path(entry.path)
        try:
            shutil.rmtree(p) if entry.is_dir(follow_symlinks=False) else p.unlink()
            removed.append(p)
        except OSError:
            pass  # another run is cleaning it up, or it is not ours to remove: nothing is lost by leaving it
    return removed


# --- signals ------------------------------------------------------------------------------------------------
class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived while an output was being written: unwinds (cleaning up), then exits 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


_CAUGHT = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)
_active: set[int] = set()
_saved: dict[int, object] = {}
_deferred: list[int] = []
_critical = 0
_lock = threading.Lock()


def _on_signal(signum: int, frame: object) -> None:
    previous = _saved.get(signum)
    if callable(previous):
        previous(signum, frame)  # the program's own handler decides; if it raises, outputs are cleaned up
        return
    if _critical:
        _deferred.append(signum)  # in the middle of a rename: finish it first
        return
    raise Terminated(signum)


def _register(key: int) -> None:
    with _lock:
        if not _active and threading.current_thread() is threading.main_thread():
            for sig in _CAUGHT:
                previous = signal.getsignal(sig)
                if previous in (signal.SIG_IGN, None) or previous is _on_signal:
                    continue  # ignored stays ignored; a handler installed outside Python (or ours) is left alone
                signal.signal(sig, _on_signal)
                _saved[sig] = previous
        _active.add(key)


def _unregister(key: int) -> None:
    with _lock:
        _active.discard(key)
        if not _active and _saved and threading.current_thread() is threading.main_thread():
            for sig, previous in _saved.items():
                signal.signal(sig, previous)
            _saved.clear()


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP until the block is done (a rename pair must not be cut in half)."""
    global _critical
    main = threading.current_thread() is threading.main_thread()
    old_int = signal.getsignal(signal.SIGINT) if main else None
    if old_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, lambda s, f: _deferred.append(s))
    _critical += 1
    try:
        yield
    finally:
        _critical -= 1
        if old_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, old_int)
        if _deferred and not _critical:
            signum = _deferred[0]
            _deferred.clear()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Terminated(signum)


def _hidden_name(name: str, kind: str) -> str:
    """``.NAME.KIND-HOST-PID-RANDOM`` within :data:`_NAME_MAX` bytes (a long NAME cut, with a hash of it added)."""
    suffix = f".{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    room = _NAME_MAX - 1 - len(suffix)
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > room:
        digest = hashlib.sha1(raw).hexdigest()[:8]
        # cut on a character boundary: a name that is not valid UTF-8 on disk stays as it was (surrogateescape)
        cut = raw[: room - len(digest) - 1].decode("utf-8", "ignore").encode("utf-8", "surrogateescape")
        name = cut.decode("utf-8", "surrogateescape") + "~" + digest
    return f".{name}{suffix}"


# --- the output -----------------------------------------------------------------------------------------
class AtomicOutput:
    """A temporary file or folder beside ``path`` that replaces it only on :meth:`commit`.

    Use it as a context manager: leaving the block without :meth:`commit` (an error, Ctrl-C, SIGTERM,
    SIGHUP) removes the temporary output. A folder output gets a record of its files (``.papa-merge.json``)
    so that a later ``force`` knows what it may replace.

    Args:
        path: the final output path.
        folder: whether the output is a folder.
        force: replace an existing output papa-merge wrote (it is removed only after the new one is complete).
        ours: recognises a file papa-merge wrote that is not a checkpoint (see :func:`check_output_free`).

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is False, or it is not a papa-merge output.
        InvalidArgumentError: ``path`` names no file or folder.

    Example:
        >>> with AtomicOutput("soup.safetensors", folder=False) as atomic:  # doctest: +SKIP
        ...     atomic.file("soup.safetensors").write_bytes(data)
        ...     atomic.commit()
    """

    def __init__(self, path: str | os.PathLike, *, folder: bool, force: bool = False,
                 ours: Callable[[Path], bool] | None = None):
        self.path = check_output_name(path)
        self.folder = folder
        self.force = force
        self.ours = ours
        check_output_free(self.path, force=force, ours=ours)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path.parent)
        self.tmp = self.path.parent / self._hidden("tmp")
        self._done = False
        _register(id(self))
        try:
            if folder:
                self.tmp.mkdir()
        except BaseException:
            _unregister(id(self))
            raise

    def _hidden(self, kind: str) -> str:
        return _hidden_name(self.path.name, kind)

    def file(self, name: str) -> Path:
        """Where a file of the output is written while in progress."""
        return self.tmp / name if self.folder else self.tmp

    def commit(self) -> Path:
        """Move the complete output into place (replacing an old papa-merge output only if forced)."""
        check_output_free(self.path, force=self.force, ours=self.ours)
        if self.folder:
            _write_manifest(self.tmp)
        old = None
        try:
            with _uninterrupted():
                exists = self.path.exists() or self.path.is_symlink()
                if exists and (self.folder or (self.path.is_dir() and not self.path.is_symlink())):
                    # A folder cannot be renamed over a non-empty folder: move the old one aside first.
                    old = self.path.parent / self._hidden("old")
                    os.replace(self.path, old)
                os.replace(self.tmp, self.path)  # a file replaces a file atomically
                self._done = True
        finally:
            if self._done:
                _unregister(id(self))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
        return self.path

    def abort(self) -> None:
        """Remove the temporary output."""
        if not self._done and (self.tmp.exists() or self.tmp.is_symlink()):
            shutil.rmtree(self.tmp, ignore_errors=True) if self.tmp.is_dir() else self.tmp.unlink()
        _unregister(id(self))

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, MergeError):
            self._name_the_output(exc)  # a real OS error (ENOSPC, EIO, ...), not OSError("some message")
        if exc_type is not None or not self._done:
            self.abort()
        _unregister(id(self))

    def _name_the_output(self, e: OSError) -> None:
        """An OSError about the temporary output names the final path instead (or names it at all)."""
        name = None if e.filename is None else str(e.filename)
        tmp = str(self.tmp)
        if name is None:
            e.filename = str(self.path)
        elif name == tmp or name.startswith(tmp + os.sep):
            e.filename = str(self.path) + name[len(tmp):]
