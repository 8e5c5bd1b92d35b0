"""The Hugging Face Hub at the edge: pull checkpoints, push soups with a model card that records the recipe.

Three verbs and one helper::

    merge.hub.pull("org/name@v2")                         # -> the local folder (in huggingface_hub's cache)
    merge.hub.push("soup/", "org/my-soup")                # -> PushResult: the URL, what it uploaded and deleted
    merge.hub.model_card("soup/", repo_id="org/my-soup")  # -> README.md text
    merge.hub.resolve_reference("hf://org/name@v2")       # what ``open_checkpoint("hf://...")`` calls
    merge.hub.resolve_adapter("hf://org/lora@v1")         # a LoRA adapter's two files (``base+hf://org/lora``)

Downloads go through huggingface_hub's cache and fetch only what a checkpoint needs: the shard index
and the shards it lists (or ``model.safetensors``, or the legacy ``pytorch_model.bin``), plus the
config and tokenizer files that make a merged folder load with ``from_pretrained``. The endpoint and
token come from ``HF_ENDPOINT`` and ``HF_TOKEN`` (or the saved login) unless given. Every failure of
the Hub is re-raised as one of papa-merge's errors with a one-line message naming the repo, revision
or file and the fix: :class:`~merge.errors.CheckpointNotFoundError` (also a ``FileNotFoundError``) for
a missing repo, revision or file, :class:`~merge.errors.HubError` for everything else.

A push leaves the revision holding exactly the pushed checkpoint (stale weight files and shard indexes
are deleted in the same commit) unless ``keep_existing`` asks for several side by side. Local files are
never modified: a generated model card travels in the commit, not in the user's folder.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from merge.io.formats import CARD_FILE, FOLDER_CANDIDATES, INDEX_SUFFIX, SHARD_RE, WEIGHT_SUFFIXES
from merge.io.schemes import HF_PREFIX, HubReference, register_scheme
from merge.io.schemes import parse_hub_reference as _parse
from merge.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    HubError,
    InvalidArgumentError,
    MergeError,
)

__all__ = ["HubReference", "PushResult", "parse_reference", "resolve_reference", "pull", "push", "model_card",
           "hub_source_of", "HF_PREFIX", "RemoteCheckpoint", "plan_download", "read_range", "resolve_adapter",
           "ADAPTER_FILES"]

# Small files beside the weights that from_pretrained needs (configs, tokenizers, chat templates).
_CONFIG_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
_CACHE_RE = re.compile(r"(?:^|/)(models|datasets)--([^/]+)/snapshots/([0-9a-f]{40})(?:/(.*))?$")


def parse_reference(ref: str) -> tuple[str, str | None]:
    """Split a Hub reference into its repo id and revision.

    Args:
        ref: ``hf://org/name[@revision]`` or ``org/name[@revision]``; the revision is a branch, tag,
            commit sha or ``refs/pr/N``.

    Returns:
        ``(repo_id, revision)``; the revision is None when not given (the default branch).

    Raises:
        InvalidArgumentError: not a repo id, or it names a file inside the repo.

    Example:
        >>> parse_reference("hf://org/name@v2")
        ('org/name', 'v2')
        >>> parse_reference("org/name")
        ('org/name', None)
    """
    r = _parse(ref, allow_path=False)
    return r.repo_id, r.revision


# --- errors ------------------------------------------------------------------------------------------
def _endpoint(endpoint: str | None) -> str | None:
    """The endpoint to use: the argument, else ``HF_ENDPOINT`` as set now (huggingface_hub reads it only on import)."""
    value = endpoint or os.environ.get("HF_ENDPOINT") or None
    return value.rstrip("/") if value else None


def _shown_endpoint(endpoint: str | None) -> str:
    if endpoint:
        return endpoint
    from huggingface_hub import constants

    return constants.ENDPOINT


_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "ConnectionError",
                   "ReadTimeout", "WriteTimeout", "PoolTimeout", "RemoteProtocolError", "ReadError", "WriteError",
                   "TimeoutError", "BrokenPipeError", "ConnectionResetError", "IncompleteRead"}


def _network_cause(e: BaseException) -> BaseException | None:
    """The connection failure behind ``e``: itself, or one it was raised from (an upload wraps it in a RuntimeError)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and len(seen) < 20:
        seen.add(id(cur))
        if {c.__name__ for c in type(cur).__mro__} & _NETWORK_ERRORS:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def _is_timeout(e: BaseException) -> bool:
    return any(c.__name__ in ("TimeoutException", "TimeoutError") for c in type(e).__mro__)


# --- timeouts --------------------------------------------------------------------------------------------
# huggingface_hub's shared HTTP client has no timeout of its own, and several calls (model_info, create_repo,
# create_commit, ...) pass none: a Hub that accepts the connection and never answers would hang them forever.
_ETAG_VAR, _DOWNLOAD_VAR = "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"
_COMMIT_FACTOR = 6  # a commit is answered only once the Hub has stored its files: give it longer


def _seconds(var: str) -> float:
    """``HF_HUB_ETAG_TIMEOUT`` or ``HF_HUB_DOWNLOAD_TIMEOUT`` as set now (huggingface_hub reads them on import)."""
    from huggingface_hub import constants

    fallback = float(getattr(constants, var, None) or 10)
    raw = os.environ.get(var, "").strip()
    try:
        value = float(raw) if raw else fallback
    except ValueError:
        return fallback
    return value if 0 < value < float("inf") else fallback


@contextlib.contextmanager
def _bounded(*, commit: bool = False) -> Iterator[None]:
    """Bound every request of huggingface_hub's shared client in here (connect: the etag timeout; read and write:
    the download timeout, longer for a commit), unless the user gave the client timeouts of their own."""
    from huggingface_hub.utils import get_session

    session = get_session()
    before = session.timeout
    users_own = any(getattr(before, k, None) is not None for k in ("connect", "read", "write", "pool"))
    if users_own and id(before) not in _OURS:
        yield
        return
    read = _seconds(_DOWNLOAD_VAR) * (_COMMIT_FACTOR if commit else 1)
    session.timeout = type(before)(read, connect=_seconds(_ETAG_VAR))
    ours = session.timeout  # the client keeps its own copy
    _OURS.add(id(ours))
    try:
        yield
    finally:
        session.timeout = before
        _OURS.discard(id(ours))


_OURS: set[int] = set()  # the timeouts _bounded set (a nested _bounded may replace them)


@contextlib.contextmanager
def _progress_bars(show: bool | None) -> Iterator[None]:
    """huggingface_hub's progress bars: ``show`` None draws them only when stderr is a terminal (in a log
    written by nohup, Slurm or ``| tee`` they are noise); False never. ``HF_HUB_DISABLE_PROGRESS_BARS`` wins."""
    import importlib

    bars = importlib.import_module("huggingface_hub.utils.tqdm")
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower() in ("1", "true", "yes", "on"):
        show = False  # as set now (huggingface_hub reads it on import): ``papa-merge -q`` sets it
    elif show is None:
        show = bool(getattr(sys.stderr, "isatty", lambda: False)())
    forced_on = getattr(bars, "HF_HUB_DISABLE_PROGRESS_BARS", None) is False
    if show or forced_on or bars.are_progress_bars_disabled():
        yield
        return
    with bars.disable_progress_bars():
        yield


@contextlib.contextmanager
def _hub_errors(ref: HubReference, *, endpoint: str | None, action: str = "download",
                filename: str | None = None) -> Iterator[None]:
    """Re-raise huggingface_hub's errors as papa-merge's, with a one-line message and the fix."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _shown_endpoint(endpoint)
    repo = f"{HF_PREFIX}{ref.repo_id}"
    rev = ref.revision or "main"
    try:
        with _bounded():
            yield
    except MergeError:
        raise
    except RevisionNotFoundError:
        raise CheckpointNotFoundError(f"{repo}: revision {rev!r} not found on {where}; check the branch, tag or "
                                      f"commit name (or drop @{rev} to use main)") from None
    except GatedRepoError:
        raise HubError(f"{repo}: is gated on {where}; accept its conditions on the repo page, then log in "
                       "(hf auth login) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        if action == "push":
            raise HubError(f"{repo}: cannot write to this repo on {where}; check the name and that your token "
                           "(HF_TOKEN or hf auth login) has write access to it") from None
        raise CheckpointNotFoundError(f"{repo}: repository not found on {where}; check the name, or log in "
                                      "(hf auth login, or HF_TOKEN) if it is private") from None
    except OfflineModeIsEnabled:
        raise HubError(f"{repo}: HF_HUB_OFFLINE is set and the files are not in the local cache; unset "
                       "HF_HUB_OFFLINE (or set it to 0) to download them") from None
    except LocalEntryNotFoundError as e:
        cause = _network_cause(e)
        if cause is not None:
            raise _network_error(repo, where, action, cause) from None
        raise HubError(f"{repo}@{rev}: cannot reach {where} and the files are not in the local cache "
                       f"({_first_line(e)}); check the connection and HF_ENDPOINT") from None
    except EntryNotFoundError:
        name = filename or ref.path or "a file"
        raise CheckpointNotFoundError(f"{repo}@{rev}: file {name!r} not found; list the repo's files on its page "
                                      f"or with `papa-merge pull {ref.repo_id} --include '*'`") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        if status in (401, 403):
            raise HubError(f"{repo}: {where} refused the {action} ({status}): log in (hf auth login) or set "
                           "HF_TOKEN to a token with " + ("write" if action == "push" else "read") +
                           " access") from None
        message = getattr(e, "server_message", None) or _first_line(e)
        raise HubError(f"{repo}: {action} failed, {where} answered {status}: {message}; retry, or set "
                       "PAPA_MERGE_DEBUG=1 for details") from None
    except ValueError as e:
        if type(e).__name__ == "HFValidationError":
            raise InvalidArgumentError(f"{repo}: {_first_line(e)}") from None
        raise
    except Exception as e:
        cause = _network_cause(e)
        if cause is not None:
            raise _network_error(repo, where, action, cause) from None
        raise


def _network_error(repo: str, where: str, action: str, cause: BaseException) -> HubError:
    """One line for a Hub that cannot be reached, stopped answering, or dropped the connection."""
    if _is_timeout(cause):
        return HubError(f"{repo}: {where} did not answer in time during the {action} ({type(cause).__name__}; "
                        f"{_ETAG_VAR}={_seconds(_ETAG_VAR):g} s to connect, {_DOWNLOAD_VAR}="
                        f"{_seconds(_DOWNLOAD_VAR):g} s per read); check the connection and HF_ENDPOINT, or raise "
                        "those limits")
    if action == "push":
        return HubError(f"{repo}: the connection to {where} was lost during the upload ({type(cause).__name__}: "
                        f"{_first_line(cause)}); nothing was committed, push again")
    return HubError(f"{repo}: cannot reach {where} ({type(cause).__name__}: {_first_line(cause)}); check the "
                    "connection and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached files")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


# --- downloads -----------------------------------------------------------------------------------------
def _api(endpoint: str | None, token: str | bool | None):  # HfApi, imported lazily
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="papa-merge", library_version=_version())


def _version() -> str:
    from merge.keys import version

    return version()


def _config_files(files: Sequence[str], folder: str = "") -> list[str]:
    """Config and tokenizer files directly in ``folder`` (not weights, not shard indexes)."""
    prefix = folder + "/" if folder else ""
    out = []
    for f in files:
        rest = f[len(prefix):] if f.startswith(prefix) else None
        if rest is None or "/" in rest or rest.startswith("."):
            continue
        if rest.endswith(_CONFIG_SUFFIXES) and not rest.endswith(INDEX_SUFFIX):
            out.append(f)
    return out


def _weight_files(files: Sequence[str], folder: str = "") -> list[str]:
    prefix = folder + "/" if folder else ""
    return sorted(f for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]
                  and f.endswith(WEIGHT_SUFFIXES))


def _read_index(api, ref: HubReference, sha: str, index: str, endpoint: str | None) -> list[str]:
    """The shard files a ``*.index.json`` lists (downloaded into the cache first)."""
    from huggingface_hub import hf_hub_download

    from merge.io.shards import read_weight_map

    with _hub_errors(ref, endpoint=endpoint, filename=index):
        local = hf_hub_download(ref.repo_id, index, revision=sha, endpoint=endpoint, token=api.token,
                                library_name="papa-merge", library_version=_version(),
                                etag_timeout=_seconds(_ETAG_VAR))
    try:  # the local reader's rules: an index papa-merge would refuse on disk is refused on the Hub too
        shards = sorted(set(read_weight_map(Path(local)).values()))
    except CheckpointFormatError as e:
        detail = str(e).removeprefix(f"{local}: ")
        raise CheckpointFormatError(f"{ref}: {index}: {detail}; the repo's shard index is broken, fix it on the "
                                    "Hub (or pull other files with include)", path=f"{ref}/{index}",
                                    tensor=e.tensor) from None
    folder = str(PurePosixPath(index).parent)
    return [s if folder == "." else f"{folder}/{s}" for s in shards]


def _check_shards(ref: HubReference, index: str, shards: Sequence[str], files: Sequence[str],
                  excluded: Sequence[str] = ()) -> None:
    missing = [s for s in shards if s not in files]
    if missing and all(s in excluded for s in missing):
        raise InvalidArgumentError(f"{ref}: exclude leaves out {_listing(missing, 3)}, listed by {index}; a sharded "
                                   "checkpoint needs all its shards, exclude fewer files", option="exclude")
    if missing:
        raise CheckpointNotFoundError(f"{ref}: {index} lists {len(missing)} shard(s) missing from "
                                      f"{ref.repo_id}@{ref.revision or 'main'}: {_listing(missing, 3)}; "
                                      "the upload is incomplete, push the missing shards")


def _plan_checkpoint_files(api, ref: HubReference, sha: str, files: Sequence[str], endpoint: str | None,
                           excluded: Sequence[str] = ()) -> tuple[list[str], str | None]:
    """Which files a checkpoint needs, and the path inside the snapshot to open (None: the folder itself).

    ``excluded``: repo files the caller left out of ``files`` (a shard among them is refused by name)."""
    path = (ref.path or "").strip("/")
    if path and path in files:  # one file: itself, or an index and its shards
        if path.endswith(INDEX_SUFFIX):
            shards = _read_index(api, ref, sha, path, endpoint)
            _check_shards(ref, path, shards, files, excluded)
            return [path, *shards], path
        return [path], path
    if path and not any(f.startswith(path + "/") for f in files):
        raise CheckpointNotFoundError(f"{ref}: no file or folder {path!r} in {ref.repo_id}@{ref.revision or 'main'}; "
                                      f"files: {_listing(files)}")
    prefix = path + "/" if path else ""
    configs = _config_files(files, path)
    for candidate in FOLDER_CANDIDATES:
        name = prefix + candidate
        if name in files:
            weights = [name]
            if name.endswith(INDEX_SUFFIX):
                shards = _read_index(api, ref, sha, name, endpoint)
                _check_shards(ref, name, shards, files, excluded)
                weights += shards
            return weights + configs, path or None
    weights = _weight_files(files, path)
    if len(weights) == 1:
        return [weights[0]] + configs, weights[0]
    if not weights:
        raise CheckpointNotFoundError(f"{ref}: no weight files ({', '.join(FOLDER_CANDIDATES[:2])}, *.safetensors, "
                                      f"*.bin) in {ref.repo_id}@{ref.revision or 'main'}; files: {_listing(files)}")
    raise _SeveralCheckpoints(f"{ref}: holds {len(weights)} weight files ({_listing(weights)}); name one, "
                                f"e.g. {HF_PREFIX}{ref.repo_id}"
                                f"{'@' + ref.revision if ref.revision else ''}/{weights[0]}")


class _SeveralCheckpoints(CheckpointFormatError):
    """A repo (or folder) holding several checkpoint files side by side and none named."""


def _listing(files: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(list(files)[:n])
    return shown + (f", ... ({len(files)} in all)" if len(files) > n else "") if files else "none"


def _download(api, ref: HubReference, sha: str, names: Sequence[str], endpoint: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [glob.escape(n) for n in names]
    with _hub_errors(ref, endpoint=endpoint):
        folder = snapshot_download(ref.repo_id, revision=sha, allow_patterns=patterns, endpoint=endpoint,
                                   token=api.token, library_name="papa-merge", library_version=_version(),
                                   etag_timeout=_seconds(_ETAG_VAR))
    _remember_revision(ref, sha)
    return Path(folder)


def _repo_files(api, ref: HubReference, endpoint: str | None) -> tuple[str, list[str]]:
    """The commit sha the reference points at, and the files there."""
    with _hub_errors(ref, endpoint=endpoint):
        info = api.model_info(ref.repo_id, revision=ref.revision, timeout=_seconds(_DOWNLOAD_VAR))
    return str(info.sha), [s.rfilename for s in (info.siblings or [])]


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_storage(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def _remember_revision(ref: HubReference, sha: str) -> None:
    """Record branch/tag -> commit in the cache's refs/, as huggingface_hub does, so HF_HUB_OFFLINE=1 finds it."""
    rev = ref.revision or "main"
    if rev == sha:
        return
    target = _cache_storage(ref.repo_id) / "refs" / rev
    try:
        if target.is_file() and target.read_text() == sha:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(sha)
        os.replace(tmp, target)
    except OSError:
        pass  # only a convenience for offline use later


def _cached_snapshot(ref: HubReference) -> Path | None:
    """The cached snapshot folder for a reference, without asking the Hub (for HF_HUB_OFFLINE=1)."""
    storage = _cache_storage(ref.repo_id)
    rev = ref.revision or "main"
    sha = rev if re.fullmatch(r"[0-9a-f]{40}", rev) else None
    if sha is None and (storage / "refs" / rev).is_file():
        sha = (storage / "refs" / rev).read_text().strip()
    folder = storage / "snapshots" / sha if sha else None
    return folder if folder is not None and folder.is_dir() else None


def resolve_reference(ref: str, *, endpoint: str | None = None, token: str | bool | None = None) -> Path:
    """Download what a Hub checkpoint needs into huggingface_hub's cache and return its local path.

    ``open_checkpoint("hf://...")`` (hence ``merge.soup`` and ``papa-merge soup``) calls this.
    For a model repo this fetches the shard index and the shards it lists, or ``model.safetensors``,
    or ``pytorch_model.bin[.index.json]`` (first found, in that order; other formats are left on the
    Hub), plus the config and tokenizer files; a repo holding a single other weight file gets that
    file. ``hf://org/name/sub/file.safetensors`` names one file (or a sub-folder). With
    ``HF_HUB_OFFLINE=1`` the cached snapshot is used without asking the Hub.

    Args:
        ref: ``hf://org/name[@revision][/path]``.
        endpoint: the Hub's URL (default: ``HF_ENDPOINT``, else https://huggingface.co).
        token: a token, or False for none (default: ``HF_TOKEN`` or the saved login).

    Returns:
        The local snapshot folder (a model folder), or the weight file inside it.

    Raises:
        CheckpointNotFoundError: the repo, revision or file does not exist (or has no weights).
        CheckpointFormatError: the repo holds several weight files and none is named.
        HubError: the Hub cannot be reached or refused the request.
        InvalidArgumentError: ``ref`` is not a Hub reference.

    Example:
        >>> folder = resolve_reference("hf://org/member-a@v2")  # doctest: +SKIP
        >>> merge.open_checkpoint(folder).names[:3]              # doctest: +SKIP
    """
    r = _parse(ref)
    endpoint = _endpoint(endpoint)
    if _offline():
        folder = _cached_snapshot(r)
        if folder is None:
            raise HubError(f"{r}: HF_HUB_OFFLINE is set and this revision is not in the local cache; unset "
                           "HF_HUB_OFFLINE (or set it to 0) to download it")
        return folder / r.path if r.path else folder
    with _progress_bars(None):
        api = _api(endpoint, token)
        sha, files = _repo_files(api, r, endpoint)
        names, target = _plan_checkpoint_files(api, r, sha, files, endpoint)
        folder = _download(api, r, sha, names, endpoint)
    return folder / target if target else folder


# The files of a PEFT LoRA adapter that merge.lora applies: all that is fetched of an adapter repo.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def resolve_adapter(ref: str, *, endpoint: str | None = None, token: str | bool | None = None) -> Path:
    """Download a PEFT LoRA adapter into huggingface_hub's cache and return its local folder.

    Only ``adapter_config.json`` and ``adapter_model.safetensors`` are fetched (an adapter repo's README,
    tokenizer and training files are left on the Hub; a pickled ``adapter_model.bin`` is never fetched).
    ``hf://org/name@rev/sub`` names an adapter in a sub-folder. With ``HF_HUB_OFFLINE=1`` the cached snapshot
    is used without asking the Hub. ``merge.lora`` calls this for ``base+hf://org/adapter``.

    Returns:
        The local folder holding the two files.

    Raises:
        CheckpointNotFoundError: the repo, revision or one of the two files does not exist.
        HubError: the Hub cannot be reached or refused the request.
        InvalidArgumentError: ``ref`` is not a Hub reference.

    Example:
        >>> folder = resolve_adapter("hf://org/my-lora@v1")  # doctest: +SKIP
        >>> sorted(p.name for p in folder.iterdir())          # doctest: +SKIP
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    r = _parse(ref)
    endpoint = _endpoint(endpoint)
    sub = (r.path or "").strip("/")
    names = [f"{sub}/{n}" if sub else n for n in ADAPTER_FILES]
    if _offline():
        folder = _cached_snapshot(r)
        if folder is None or not all((folder / n).is_file() for n in names):
            raise HubError(f"{r}: HF_HUB_OFFLINE is set and this adapter is not in the local cache; unset "
                           "HF_HUB_OFFLINE (or set it to 0) to download it")
        return folder / sub if sub else folder
    with _progress_bars(None):
        api = _api(endpoint, token)
        sha, files = _repo_files(api, r, endpoint)
        missing = [n for n in names if n not in files]
        if missing:
            pickled = missing == [names[1]] and names[1].replace(".safetensors", ".bin") in files
            why = (" (it holds adapter_model.bin, a pickle, which is never fetched: convert it to safetensors)"
                   if pickled else "")
            raise CheckpointNotFoundError(f"{r}: no {missing[0]} in {r.repo_id}@{r.revision or 'main'}{why}; a LoRA "
                                          f"adapter is a PEFT folder with {' and '.join(ADAPTER_FILES)}; files: "
                                          f"{_listing(files)}", path=str(r))
        folder = _download(api, r, sha, names, endpoint)
    return folder / sub if sub else folder


@dataclass
class RemoteCheckpoint:
    """What :func:`resolve_reference` would download for a Hub checkpoint, known without downloading weights.

    Attributes:
        ref: the reference as given (``hf://org/name@rev[/path]``).
        repo_id, sha: the repo and the commit the revision resolves to (every later read uses the sha).
        files: ``name -> size in bytes`` of each file the download would fetch (weights, index, configs).
        target: the path inside the snapshot that opens as the checkpoint (None: the folder itself).
        cached: the snapshot is already in the local cache (nothing would be downloaded).
    """

    ref: str
    repo_id: str
    sha: str
    files: dict[str, int]
    target: str | None
    cached: bool = False

    @property
    def download_bytes(self) -> int:
        return 0 if self.cached else sum(self.files.values())


def plan_download(ref: str, *, endpoint: str | None = None, token: str | bool | None = None) -> RemoteCheckpoint:
    """The files (and their sizes) :func:`resolve_reference` would download for ``ref``, asking the Hub for the
    repo's listing only (a sharded checkpoint's index is fetched too: it names the shards).

    Raises:
        As :func:`resolve_reference`.
    """
    r = _parse(ref)
    endpoint = _endpoint(endpoint)
    api = _api(endpoint, token)
    with _hub_errors(r, endpoint=endpoint):
        info = api.model_info(r.repo_id, revision=r.revision, files_metadata=True, timeout=_seconds(_DOWNLOAD_VAR))
    sha = str(info.sha)
    sizes = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
    names, target = _plan_checkpoint_files(api, r, sha, list(sizes), endpoint)
    snapshot = _cache_storage(r.repo_id) / "snapshots" / sha
    cached = all((snapshot / n).is_file() for n in names)
    return RemoteCheckpoint(ref, r.repo_id, sha, {n: sizes.get(n, 0) for n in names}, target, cached)


def read_range(ref: str, filename: str, start: int, length: int, *, endpoint: str | None = None,
               token: str | bool | None = None) -> bytes:
    """``length`` bytes of a file in a Hub repo from byte ``start``, by one HTTP range request (nothing else of
    the file is transferred, and nothing is cached).

    Args:
        ref: ``hf://org/name[@revision]`` (a commit sha keeps every read on one commit).
        filename: the path of the file in the repo.
        start, length: the byte range; a range past the end returns what is there.

    Raises:
        CheckpointNotFoundError: no such repo, revision or file.
        HubError: the Hub cannot be reached or refused the request.

    Example:
        >>> n = int.from_bytes(read_range("hf://org/model", "model.safetensors", 0, 8), "little")  # doctest: +SKIP
    """
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if length <= 0:
        return b""
    r = _parse(ref)
    endpoint = _endpoint(endpoint)
    url = hf_hub_url(r.repo_id, filename, revision=r.revision, endpoint=endpoint)
    headers = {**build_hf_headers(token=token, library_name="papa-merge", library_version=_version()),
               "Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
    with _hub_errors(r, endpoint=endpoint, filename=filename):
        response = get_session().get(url, headers=headers, follow_redirects=True)
        hf_raise_for_status(response)
        data = response.content
    if response.status_code == 200 and start:  # a server that ignores Range sends the whole file
        data = data[start:]
    return data[:length]


def _patterns(include: str | Sequence[str] | None, *, what: str = "include") -> list[str] | None:
    if include is None:
        return None
    items = [include] if isinstance(include, str) else list(include)
    out = [p.strip() for item in items for p in item.split(",") if p.strip()]
    if not out:
        raise InvalidArgumentError(f"{what} patterns are empty; pass e.g. '*.safetensors' or '*'", option=what)
    return out


def pull(repo: str, *, revision: str | None = None, include: str | Sequence[str] | None = None,
         exclude: str | Sequence[str] | None = None, out: str | os.PathLike | None = None,
         endpoint: str | None = None, token: str | bool | None = None, force: bool = False,
         progress: bool | None = None) -> Path:
    """Download a checkpoint (or chosen files) from the Hub, through huggingface_hub's cache.

    Without ``include``, only what the checkpoint needs is fetched (as :func:`resolve_reference`),
    plus the model card README.md; a repo holding several checkpoint files side by side (and no
    ``model.safetensors``) gets all of its top-level weight files.

    Args:
        repo: ``org/name[@revision]`` or ``hf://org/name[@revision]``.
        revision: branch, tag, commit sha or ``refs/pr/N`` (default: the reference's, else main).
        include: glob patterns (``"*.safetensors"``, a list, or comma-separated) of files to fetch.
            Weight shards always bring the shard index that lists them (a sharded checkpoint does
            not open without it).
        exclude: glob patterns of files not to fetch (applied after ``include``); a shard its index
            lists cannot be excluded (the checkpoint would not open).
        out: copy the files into this new folder (default: return the cache's snapshot folder).
            The copy is written under a temporary name and renamed when complete.
        endpoint: the Hub's URL (default: ``HF_ENDPOINT``, else https://huggingface.co).
        token: a token, or False for none (default: ``HF_TOKEN`` or the saved login).
        force: replace an existing, non-empty ``out`` (only once the new copy is complete).
        progress: draw huggingface_hub's progress bars (default: only when stderr is a terminal).

    Every request is bounded in time: ``HF_HUB_ETAG_TIMEOUT`` seconds to connect and
    ``HF_HUB_DOWNLOAD_TIMEOUT`` seconds per read (read when called; both default to 10).

    Returns:
        The local folder holding the files.

    Raises:
        CheckpointNotFoundError: the repo, revision or file does not exist, or no file matches ``include``.
        CheckpointFormatError: the repo's shard index is malformed (the local reader's rules).
        OutputExistsError: ``out`` exists and is not empty, and ``force`` is False.
        HubError: the Hub cannot be reached or refused the request.
        InvalidArgumentError: ``repo`` is not a repo id, or two different revisions were given.

    Example:
        >>> merge.hub.pull("org/member-a@v2", include="*.safetensors", out="members/a")  # doctest: +SKIP
        PosixPath('members/a')
    """
    r = _parse(repo, allow_path=False)
    if revision is not None and r.revision is not None and revision != r.revision:
        raise InvalidArgumentError(f"{repo!r} names revision {r.revision!r} but revision={revision!r} was also "
                                   "given; pass one")
    r = HubReference(r.repo_id, revision or r.revision)
    endpoint = _endpoint(endpoint)
    patterns = _patterns(include)
    excluded = _patterns(exclude, what="exclude")
    empty_dir = False
    if out is not None:
        from merge.io.writer import check_output_free

        out = Path(out)
        empty_dir = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
        check_output_free(out, force=force or empty_dir)
    with _progress_bars(progress):
        api = _api(endpoint, token)
        sha, files = _repo_files(api, r, endpoint)
        names = _pull_plan(api, r, sha, files, endpoint, patterns, excluded)
        try:
            folder = _download(api, r, sha, names, endpoint)
        except OSError as e:
            if out is not None and e.errno == errno.ENOSPC and not isinstance(e, MergeError):
                raise OSError(errno.ENOSPC, e.strerror or "No space left on device",
                              f"{out}: while downloading into huggingface_hub's cache, {_cache_storage(r.repo_id)}"
                              ) from None
            raise
    if out is None:
        return folder
    return _copy_out(folder, names, out, force=force or empty_dir)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A repo path against glob patterns: the whole path, or its file name (``*.bin`` excludes ``sub/x.bin``)."""
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(PurePosixPath(name).name, p) for p in patterns)


def _pull_plan(api, r: HubReference, sha: str, files: Sequence[str], endpoint: str | None,
               patterns: list[str] | None, excluded: list[str] | None) -> list[str]:
    """The repo files a pull fetches: the checkpoint's (or those ``patterns`` match), less ``excluded``."""
    candidates = [f for f in files if not (excluded and _matches(f, excluded))]
    left_out = sorted(set(files) - set(candidates))
    if patterns is None:
        try:
            names, _ = _plan_checkpoint_files(api, r, sha, candidates, endpoint, left_out)
        except _SeveralCheckpoints:  # several checkpoints side by side (members of a soup): take them all
            names = _weight_files(candidates) + _config_files(candidates)
        names += [f for f in (CARD_FILE,) if f in candidates]
    else:
        names = [f for f in candidates if any(fnmatch.fnmatch(f, p) for p in patterns) and f != ".gitattributes"]
        if not names:
            raise CheckpointNotFoundError(f"{r}: no file matches {', '.join(map(repr, patterns))}"
                                          f"{' (less the excluded)' if excluded else ''} in "
                                          f"{r.repo_id}@{r.revision or 'main'}; files: {_listing(files)}")
        names += _indexes_of(api, r, sha, names, candidates, endpoint)
    if excluded:
        for index in [n for n in names if n.endswith(INDEX_SUFFIX)]:
            lost = [s for s in _read_index(api, r, sha, index, endpoint) if s not in names and s in files]
            if lost:
                raise InvalidArgumentError(f"{r}: exclude leaves out {_listing(lost, 3)}, listed by {index}; a "
                                           "sharded checkpoint needs all its shards, exclude fewer files",
                                           option="exclude")
    return names


def _indexes_of(api, ref: HubReference, sha: str, names: Sequence[str], files: Sequence[str],
                endpoint: str | None) -> list[str]:
    """The shard indexes that list any of ``names``: shards without their index do not open as a checkpoint."""
    chosen = set(names)
    found = []
    for index in files:
        if not index.endswith(INDEX_SUFFIX) or index in chosen:
            continue
        folder = str(PurePosixPath(index).parent)
        if not any(str(PurePosixPath(n).parent) == folder and n.endswith(WEIGHT_SUFFIXES) for n in chosen):
            continue  # no weight file of its folder was chosen: no need to read it
        if chosen & set(_read_index(api, ref, sha, index, endpoint)):
            found.append(index)
    return found


def _copy_out(folder: Path, names: Sequence[str], out: Path, *, force: bool) -> Path:
    from merge.io.writer import AtomicOutput

    with AtomicOutput(out, folder=True, force=force) as atomic:
        for name in names:
            dst = atomic.file(name)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, dst)  # follows the cache's symlink to the blob
        return atomic.commit()


# --- model card ----------------------------------------------------------------------------------------
def hub_source_of(path: str) -> str | None:
    """The ``hf://org/name@sha[/file]`` a path inside huggingface_hub's cache was downloaded from, else None.

    Example:
        >>> hub_source_of("/home/u/.cache/huggingface/hub/models--org--a/snapshots/" + "0" * 40)
        'hf://org/a@0000000000000000000000000000000000000000'
    """
    m = _CACHE_RE.search(str(path).replace(os.sep, "/"))
    if m is None or m.group(1) != "models":
        return None
    repo_id = "/".join(m.group(2).split("--"))
    return f"{HF_PREFIX}{repo_id}@{m.group(3)}" + (f"/{m.group(4)}" if m.group(4) else "")


def model_card(path: str | os.PathLike, *, repo_id: str | None = None, weights_name: str | None = None,
               checkpoints: Sequence[str] | None = None) -> str:
    """The README.md (model card) :func:`push` writes for a checkpoint; see :func:`merge.card.model_card`.

    Example:
        >>> print(merge.hub.model_card("soup/", repo_id="org/my-soup")[:3])  # doctest: +SKIP
        ---
    """
    from merge.card import model_card as _card

    return _card(path, repo_id=repo_id, weights_name=weights_name, checkpoints=checkpoints)


# --- uploads -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PushResult:
    """What :func:`push` did.

    Attributes:
        url: the commit URL, or the pull request URL with ``create_pr`` (also ``str(result)``).
        commit_url: the commit's URL.
        pr_url: the pull request's URL, or None.
        uploaded: the paths in the repo written by the commit (README.md included).
        deleted: the stale weight files and shard indexes the commit deleted.
        checkpoint: the path in the repo that opens as the pushed checkpoint ("" for the repo itself).
        dry_run: nothing was sent: ``uploaded`` is what the push would upload (the URLs are empty, and
            ``deleted`` is empty: which stale files to delete is read from the Hub only when pushing).
    """

    url: str
    commit_url: str
    pr_url: str | None
    uploaded: list[str]
    deleted: list[str]
    checkpoint: str
    dry_run: bool = False

    def __str__(self) -> str:
        return self.url


def _local_files(path: Path, name_in_repo: str, exclude: Sequence[str] | None = None) -> list[tuple[str, Path]]:
    """(path in repo, local path) for a file or every non-hidden file under a folder (placed under ``name_in_repo``).

    Raises:
        CheckpointFormatError: a symlink in the folder points outside it (and outside huggingface_hub's
            cache, where a pulled snapshot's links lead): its target would be published.
    """
    if path.is_file():
        return [(name_in_repo, path)]
    prefix = name_in_repo + "/" if name_in_repo else ""
    roots = [path.resolve(), _hub_cache_root()]
    out = []
    seen_dirs: set[Path] = set()
    for top, dirs, names in os.walk(path, followlinks=True):
        here = Path(top)
        real_top = here.resolve()
        if real_top in seen_dirs:  # a link back to a folder already walked
            dirs[:] = []
            continue
        seen_dirs.add(real_top)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .cache/huggingface, a .tmp output
        for entry in sorted(names):
            p = here / entry
            rel = p.relative_to(path)
            if entry.startswith(".") or not p.is_file() or (exclude and _matches(rel.as_posix(), exclude)):
                continue
            if not any(p.resolve().is_relative_to(root) for root in roots):
                link = next((q for q in (path.joinpath(*rel.parts[:i + 1]) for i in range(len(rel.parts)))
                             if q.is_symlink()), p)
                raise CheckpointFormatError(f"{link}: is a symlink to {os.readlink(link)}, outside {path}; push would "
                                            "publish what it points to: copy the file into the folder, or remove "
                                            "the link", path=link)
            out.append((prefix + rel.as_posix(), p))
    return sorted(out)


def _hub_cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().resolve()


def _in_repo_name(path: Path, path_in_repo: str | None, keep_existing: bool) -> str:
    """Where the checkpoint goes in the repo: a file as ``model.safetensors`` (its own name beside others)."""
    from merge.card import weight_file_name

    if path_in_repo is None:
        if path.is_dir():
            return ""
        return path.name if keep_existing else weight_file_name(path)
    name = path_in_repo.replace("\\", "/").strip("/")
    parts = name.split("/") if name else []
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts) or path_in_repo.startswith("/"):
        raise InvalidArgumentError(f"path_in_repo {path_in_repo!r} is not a relative path inside the repo; write "
                                   "e.g. 'soups/greedy.safetensors'")
    if path.is_file() and not name.endswith(WEIGHT_SUFFIXES):
        raise InvalidArgumentError(f"path_in_repo {path_in_repo!r} names where the file goes; end it in a weight "
                                   f"suffix ({', '.join(WEIGHT_SUFFIXES)}), e.g. '{name or 'model'}{path.suffix}'")
    return name


def _is_weights(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(INDEX_SUFFIX)


def _folder_of(name: str) -> str:
    parent = str(PurePosixPath(name).parent)
    return "" if parent == "." else parent



def _checkpoint_listing(names: Sequence[str], folder: str) -> list[str]:
    """The checkpoints in one folder of a repo: weight files and indexes (shards are named by their index)."""
    inside = [n for n in names if _folder_of(n) == folder and _is_weights(n)]
    indexed = any(n.endswith(INDEX_SUFFIX) for n in inside)
    return sorted(n for n in inside if not (indexed and SHARD_RE.fullmatch(n)))


def push(path: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, endpoint: str | None = None, token: str | bool | None = None,
         commit_message: str | None = None, path_in_repo: str | None = None,
         keep_existing: bool = False, exclude: str | Sequence[str] | None = None, dry_run: bool = False,
         progress: bool | None = None) -> PushResult:
    """Upload a checkpoint (file or model folder) so the repo revision holds exactly it, with a model card.

    Creates the repo if needed (``private`` applies only then) and the branch ``revision`` (from main)
    if it does not exist, and makes one commit that uploads the checkpoint and its README.md and
    deletes every other weight file and shard index in the folder it lands in, so the revision opens
    as this one checkpoint (``hf://org/name@rev``) and no stale shard index can shadow it. A single
    file is stored as ``model.safetensors`` (``pytorch_model.bin`` for a pickle), the name transformers,
    timm and huggingface_hub load, unless ``path_in_repo`` names another. Config, tokenizer and other
    files of the repo are left alone unless the pushed folder replaces them.

    The README.md is the card :func:`merge.card.model_card` writes; a folder's own README.md is
    uploaded as is, unless it is a card papa-merge wrote and nobody edited (``soup -o folder/``
    writes one), which is regenerated for the repo.

    Args:
        path: a ``.safetensors`` (or other checkpoint) file, or a model folder.
        repo_id: ``org/name`` (or ``hf://org/name``).
        private: create the repo private.
        revision: the branch to commit to (created from main if missing; default main).
        create_pr: open a pull request against main instead of committing to it.
        endpoint: the Hub's URL (default: ``HF_ENDPOINT``, else https://huggingface.co).
        token: a token with write access (default: ``HF_TOKEN`` or the saved login).
        commit_message: the commit title (default: says what was pushed).
        path_in_repo: where the checkpoint goes in the repo: a file's name (``soups/greedy.safetensors``)
            or a folder's folder (default: ``model.safetensors``, or the top of the repo for a folder).
        keep_existing: keep the other checkpoints of the revision beside this one (nothing is
            deleted; a file keeps its own name); the card lists every checkpoint the revision holds.
        exclude: glob patterns of a folder's files not to upload (matched against the path inside the
            folder and the file name); the files the checkpoint reads cannot be excluded.
        dry_run: check everything and say what would be uploaded, without any request to the Hub.
        progress: draw huggingface_hub's progress bars (default: only when stderr is a terminal).

    Symlinks inside the folder may point into it or into huggingface_hub's cache (a pulled snapshot's
    files are links to its blobs); one pointing anywhere else is refused, naming the link, because its
    target would be published. Every request is bounded in time (``HF_HUB_ETAG_TIMEOUT`` to connect,
    ``HF_HUB_DOWNLOAD_TIMEOUT`` per read, six times that for the commit's answer).

    Returns:
        A :class:`PushResult` (``str(result)`` is the commit or pull request URL; ``deleted`` lists the
        stale weight files removed).

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CheckpointFormatError: ``path`` is not a readable checkpoint, or a symlink in it leads out of it.
        InvalidArgumentError: bad repo id or ``path_in_repo``, ``create_pr`` with a ``revision`` other
            than main, or ``exclude`` matching the checkpoint's own files.
        HubError: the Hub cannot be reached or refused the upload.

    Example:
        >>> result = merge.hub.push("soup.safetensors", "org/my-soup", private=True)  # doctest: +SKIP
        >>> result.url, result.deleted  # doctest: +SKIP
        ('https://huggingface.co/org/my-soup/commit/...', ['old.safetensors'])
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    from merge.card import is_generated_card

    path = Path(path)
    ref = _parse(repo_id, allow_path=False)
    if revision is not None and ref.revision is not None and revision != ref.revision:
        raise InvalidArgumentError(f"{repo_id!r} names revision {ref.revision!r} but revision={revision!r} was "
                                   "also given; pass one")
    revision = revision or ref.revision
    if create_pr and revision not in (None, "main"):
        raise InvalidArgumentError(f"a pull request (create_pr) is opened against main; push it without the "
                                   f"revision {revision!r}")
    ref = HubReference(ref.repo_id, revision)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or folder; pass the checkpoint (a .safetensors file "
                                      "or a model folder) to push", path=path)
    name = _in_repo_name(path, path_in_repo, keep_existing)
    excluded = _patterns(exclude, what="exclude")
    files = _local_files(path, name, excluded)
    if not files:
        left = " once the excluded files are left out" if excluded else ""
        raise CheckpointNotFoundError(f"{path}: the folder is empty{left}; nothing to push", path=path)
    if excluded and path.is_dir():
        _check_not_excluded(path, {p.resolve() for _, p in files}, excluded)
    folder = _folder_of(name) if path.is_file() else name
    card_name = CARD_FILE  # one card per repo, at its top, whatever folder the checkpoint lands in
    own_card = path / CARD_FILE if path.is_dir() else None
    keep_card = (own_card is not None and own_card.is_file()
                 and not is_generated_card(own_card.read_text(errors="replace")))
    weights_name = name if path.is_file() else None
    # Read the checkpoint (and build its card) before any request: a bad file costs nothing remote.
    card = None if keep_card else model_card(path, repo_id=ref.repo_id, weights_name=weights_name)
    if dry_run:
        names = {n for n, _ in files} | ({CARD_FILE} if card is not None else set())
        return PushResult(url="", commit_url="", pr_url=None, uploaded=sorted(names), deleted=[], checkpoint=name,
                          dry_run=True)
    endpoint = _endpoint(endpoint)
    api = _api(endpoint, token)
    with _progress_bars(progress), _hub_errors(ref, endpoint=endpoint, action="push"):
        api.create_repo(ref.repo_id, private=private, exist_ok=True)
        if revision not in (None, "main") and not revision.startswith("refs/"):
            api.create_branch(ref.repo_id, branch=revision, exist_ok=True)
        remote = api.list_repo_files(ref.repo_id, revision=None if create_pr else revision)
        ours = {n for n, _ in files}
        deleted = [] if keep_existing else [f for f in remote if _folder_of(f) == folder and f not in ours
                                             and _is_weights(f)]
        if card is not None and keep_existing:
            listing = _checkpoint_listing([*(f for f in remote if f not in deleted), *ours], folder)
            card = model_card(path, repo_id=ref.repo_id, weights_name=weights_name, checkpoints=listing)
        ops: list = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(p)) for n, p in files
                     if not (card is not None and n == f"{name}/{CARD_FILE}".lstrip("/"))]
        if card is not None:
            ops.append(CommitOperationAdd(path_in_repo=card_name, path_or_fileobj=card.encode()))
        ops += [CommitOperationDelete(path_in_repo=f) for f in deleted]
        summary = _recipe_summary(path)
        message = commit_message or f"Upload {summary or path.name} with papa-merge"
        description = ("Deleted stale weight files: " + ", ".join(deleted)) if deleted else None
        with _bounded(commit=True):
            info = api.create_commit(ref.repo_id, operations=ops, commit_message=message, revision=revision,
                                     create_pr=create_pr, commit_description=description)
    uploaded = sorted({op.path_in_repo for op in ops if isinstance(op, CommitOperationAdd)})
    pr_url = str(info.pr_url) if create_pr and info.pr_url else None
    return PushResult(url=pr_url or str(info.commit_url), commit_url=str(info.commit_url), pr_url=pr_url,
                      uploaded=uploaded, deleted=sorted(deleted), checkpoint=name)


def _check_not_excluded(folder: Path, kept: set[Path], excluded: Sequence[str]) -> None:
    """Refuse an ``exclude`` that leaves out a file the folder's checkpoint reads (its weights or shard index)."""
    from merge.io.sources import open_checkpoint

    with open_checkpoint(folder) as src:
        needed = [*src.files, *([src.index_path] if getattr(src, "index_path", None) else [])]
    lost = [p for p in needed if Path(p).resolve() not in kept]
    if lost:
        raise InvalidArgumentError(f"{folder}: exclude {', '.join(map(repr, excluded))} leaves out "
                                   f"{_listing([Path(p).name for p in lost], 3)}, which the checkpoint reads; "
                                   "exclude fewer files", path=folder, option="exclude")


def _recipe_summary(path: Path) -> str | None:
    from merge.io.sources import read_safetensors_metadata
    from merge.keys import RECIPE_KEY

    try:
        recipe = json.loads(read_safetensors_metadata(path).get(RECIPE_KEY, "null"))
    except (MergeError, ValueError):
        return None
    if not isinstance(recipe, dict):
        return None
    return f"{recipe.get('method', 'merged')} merge of {len(recipe.get('members') or [])} checkpoints"


# Make ``open_checkpoint("hf://...")`` work wherever merge.hub is imported (``import merge`` does).
register_scheme("hf", resolve_reference, describe=hub_source_of)
