"""What is wrong with a pickled checkpoint, found without running it.

``torch.load(weights_only=True)`` refuses pickles that call code, and fails on bytes that are no
checkpoint, with messages that do not tell the two apart ("Weights only load failed ... Unsupported
operand 197" for random bytes). It also lets two kinds of damage through: a legacy (pre-zip) file
whose list of storages to read omits one (that tensor holds uninitialised memory), and, memory-mapped,
a zip whose record is shorter than its tensor (the tensor runs into the next record's bytes).

Everything here reads pickles without unpickling them: :mod:`pickletools` walks the opcodes, and a
restricted unpickler whose every global is an inert stub (nothing is imported, nothing real is called)
recovers the storage list and records.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

from merge.errors import CheckpointFormatError

__all__ = ["pickle_error", "check_storages", "pickle_globals"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# Globals a torch.save pickle refers to (and harmless builtins): weights-only loading refusing one of these means a
# damaged or unusual file, not code. Any other global is code, or an object beyond tensors, that it refused to run.
_TORCH_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset",
                  "builtins.bytearray", "builtins.slice", "builtins.complex", "builtins.int", "builtins.float",
                  "builtins.bool", "builtins.str", "builtins.bytes", "builtins.tuple", "builtins.list", "builtins.dict")
_SCAN_OPS = 1_000_000  # enough for any state dict's pickle; a bound on a scan of a damaged file


def pickle_globals(stream: object) -> list[str] | None:
    """The globals (``module.name``) a pickle stream refers to, found without unpickling; None if it is no pickle."""
    import pickletools

    found, strings, memo = [], [], {}
    try:
        for i, (op, arg, _) in enumerate(pickletools.genops(stream)):
            if i > _SCAN_OPS:
                break
            if op.name in ("GLOBAL", "INST"):
                found.append(".".join(str(arg).split(" ", 1)))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str) and op.name.endswith(("UNICODE", "STRING")):
                strings.append(arg)
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[arg] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                strings.append(memo[arg])
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
    except Exception:  # noqa: BLE001 - pickletools raises ValueError and others on bytes that are no pickle
        return found or None
    return found


def _inspect_pickle(path: Path) -> tuple[str | None, str]:
    """(the first global beyond what torch.save writes, or None; what the file is, in words)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
                if not pkl:
                    return None, "a zip archive without data.pkl, not a torch.save file"
                with z.open(pkl[0]) as f:
                    names = pickle_globals(f)
            what = "a torch.save archive whose records are damaged"
        else:
            with open(path, "rb") as f:
                head = f.read(4)
                f.seek(0)
                names = pickle_globals(f)
                for _ in range(_LEGACY_PICKLES_BEFORE_DATA + 1):  # a legacy torch file is several pickles in a row
                    more = pickle_globals(f) if names is not None else None
                    if more is None:
                        break
                    names += more
            if not head:
                return None, "the file is empty"
            if head == b"PK\x03\x04":
                return None, "it starts like a zip archive but is not a readable one"
            what = "neither a zip archive nor a pickle" if names is None else "a pickle that is not a checkpoint"
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError) as e:
        return None, f"a damaged archive ({_first_line(e)})"
    beyond = [n for n in map(_normal_global, names or []) if not n.startswith(_TORCH_GLOBALS)]
    return (beyond[0] if beyond else None), what


def pickle_error(path: Path, e: BaseException) -> CheckpointFormatError:
    """Say what is wrong with a pickle torch refused: code in it (named), or bytes that are no checkpoint."""
    m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([^\s`']+)", str(e))
    code, what = _inspect_pickle(path)  # the first global beyond torch's, from the opcodes: the most telling
    code = _normal_global(code or (m.group(1) if m else None))
    if code and _dotted(code) and not code.startswith(_TORCH_GLOBALS):
        return CheckpointFormatError(
            f"{path}: refuses to load: the pickle calls {code}, code or an object beyond tensors, and papa-merge "
            "reads checkpoints only with weights_only loading (it never runs pickled code); re-save it as a state "
            "dict of tensors (or as safetensors)", path=path)
    if code and _dotted(code):
        detail = f"its pickle calls {code}, which weights_only loading does not allow (a damaged or unusual file)"
    elif code:
        detail = "its pickle is damaged (it names a global that is no Python name)"
    else:
        detail = what
        if not isinstance(e, (pickle.UnpicklingError, EOFError, KeyError)) and "Weights only load failed" not in str(e):
            detail += f": {_first_line(e)}"  # torch's own words, where they say more than "not a pickle"
    return CheckpointFormatError(f"{path}: cannot be read as a PyTorch checkpoint: {detail}; is it truncated, "
                                 "or another format?", path=path)


def _normal_global(name: str | None) -> str | None:
    """``builtins.getattr`` for torch's ``getattr`` and protocol 2's ``__builtin__.getattr``."""
    if name is None:
        return None
    if name.startswith("__builtin__."):
        return "builtins." + name[len("__builtin__."):]
    return name if "." in name else "builtins." + name


def _dotted(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and all(p.isidentifier() and p.isascii() for p in parts)


# --- storages torch.load cannot vouch for ----------------------------------------------------------------
_ITEMSIZE = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
             "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
             "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1}
_LEGACY_PICKLES_BEFORE_DATA = 3  # magic number, protocol version, sys_info


class _Stub:
    """Stands in for every global a pickle names: accepts any construction, call or state, does nothing."""

    name = ""

    def __new__(cls, *args: object, **kwargs: object) -> _Stub:
        return object.__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> _Stub:
        return _Stub()

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass


class _Inert(pickle.Unpickler):
    """Unpickles structure only: globals become stubs and persistent ids (storages) are collected."""

    def __init__(self, f: object):
        super().__init__(f)
        self.storages: list[tuple[str, str, int]] = []  # (key, storage class name, numel)

    def find_class(self, module: str, name: str) -> type:
        return type("_Stub", (_Stub,), {"name": f"{module}.{name}"})

    def persistent_load(self, pid: object) -> object:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            kind = getattr(pid[1], "name", "").rsplit(".", 1)[-1]
            numel = pid[4] if isinstance(pid[4], int) else -1
            self.storages.append((str(pid[2]), kind, numel))
        return _Stub()


def _storages_of(f: object) -> list[tuple[str, str, int]]:
    u = _Inert(f)
    u.load()
    return u.storages


def _check_crc(z: zipfile.ZipFile, name: str, damaged) -> None:
    """Read a record through zipfile, which checks its CRC-32 (a memory-mapped torch.load never does)."""
    try:
        with z.open(name) as f:
            while f.read(1 << 22):
                pass
    except zipfile.BadZipFile:
        raise damaged(f"record {name.split('/', 1)[-1]} fails its CRC check") from None


def check_storages(path: Path) -> None:
    """Refuse a pickle whose tensors torch.load filled from nowhere (see the module docstring).

    Raises:
        CheckpointFormatError: a storage that no record backs, or a record shorter or longer than its storage.
    """
    def damaged(what: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{path}: cannot be read as a PyTorch checkpoint: {what} (the file is damaged); "
                                     "re-download or re-save it", path=path)

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if pkl is None:
                    return
                with z.open(pkl) as f:
                    storages = _storages_of(f)
                prefix = pkl[: -len("data.pkl")]
                for key, kind, numel in storages:
                    size = _ITEMSIZE.get(kind)
                    try:
                        record = z.getinfo(f"{prefix}data/{key}").file_size
                    except KeyError:
                        raise damaged(f"storage {key!r} has no record") from None
                    if size is not None and numel >= 0 and record != numel * size:
                        raise damaged(f"record data/{key} holds {record} bytes but its storage needs {numel * size}")
                    _check_crc(z, f"{prefix}data/{key}", damaged)
            return
        with open(path, "rb") as f:
            for _ in range(_LEGACY_PICKLES_BEFORE_DATA):
                _Inert(f).load()
            storages = _storages_of(f)
            listed = _Inert(f).load()
        keys = {str(k) for k in listed} if isinstance(listed, list) else set()
        unread = sorted({key for key, _, _ in storages} - keys)
        if unread:
            raise damaged(f"storage {unread[0]!r} is never read from the file")
    except CheckpointFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load read it; if our stricter walk cannot, it is damaged
        raise damaged(f"its pickle cannot be walked ({_first_line(e)})") from None
