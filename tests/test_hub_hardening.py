"""The Hub under faults and hostile folders (issue 25 items 6, 8, 9, 10, 14; issue 26 item 10).

The real huggingface_hub client against tests/hubserver.py: a Hub that never answers, one that drops the
connection mid-upload, symlinks pointing out of a pushed folder, a malformed shard index, a full disk.
"""

from __future__ import annotations

import errno
import json
import re
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi
from safetensors.torch import save_file

import merge
from cli.main import cli
from merge.errors import CheckpointFormatError, CheckpointNotFoundError, HubError, InvalidArgumentError
from merge.hub import pull, push
from tests.hubserver import HubServer

pytestmark = [pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:the members come from")]


def _name(prefix: str = "h") -> str:
    return f"org/{prefix}-{uuid.uuid4().hex[:8]}"


def _weights(path: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}, str(path))
    return path


def _upload(server: HubServer, folder: Path, repo_id: str) -> None:
    api = HfApi(endpoint=server.url, token=False)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id)


def _within(seconds: float, fn):
    """fn()'s result, or a test failure (not a hung suite) when it runs past ``seconds``."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: a Hub request without a timeout"
    if "error" in box:
        raise box["error"]
    return box["value"]


# --- item 8: every request bounded --------------------------------------------------------------------------
@pytest.fixture()
def silent_hub(hub, tmp_path, monkeypatch):
    """A Hub that accepts every connection and never answers, as the endpoint, with 1-second limits."""
    server = HubServer(tmp_path / "silent").start()
    server.hang = True
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    yield server
    server.stop()


@pytest.mark.parametrize("command", ["pull", "soup", "push"])
def test_a_hub_that_never_answers_gives_one_line_in_bounded_time(silent_hub, tmp_path, command):
    args = {"pull": ["pull", "org/a"],
            "soup": ["soup", "hf://org/a", "hf://org/b", "-o", str(tmp_path / "s.safetensors")],
            "push": ["push", str(_weights(tmp_path / "m.safetensors")), "org/a"]}[command]
    start = time.monotonic()
    r = _within(30, lambda: CliRunner().invoke(cli, args))
    assert time.monotonic() - start < 20
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: hf://org/a: {silent_hub.url} did not answer in time"), lines[0]
    assert "HF_HUB_ETAG_TIMEOUT=1 s" in lines[0] and "HF_HUB_DOWNLOAD_TIMEOUT=1 s" in lines[0]
    assert silent_hub.requests  # it did reach the server (connected, then waited)


def test_the_library_call_is_bounded_too(silent_hub):
    with pytest.raises(HubError, match=r"did not answer in time during the download"):
        _within(30, lambda: pull("org/a"))


def test_a_users_own_client_timeout_is_kept(hub):
    from huggingface_hub.utils import get_session

    import merge.hub as hub_mod

    session = get_session()
    before = session.timeout
    try:
        session.timeout = type(before)(123.0)
        with hub_mod._bounded():
            assert session.timeout.read == 123.0
    finally:
        session.timeout = before
    with hub_mod._bounded():
        assert session.timeout.read is not None and session.timeout.connect is not None
        with hub_mod._bounded(commit=True):
            assert session.timeout.read == 6 * hub_mod._seconds("HF_HUB_DOWNLOAD_TIMEOUT")
    assert session.timeout == before  # put back as it was


# --- item 6: the connection dropped mid-upload ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lfs", "regular"])
def test_connection_dropped_mid_upload_is_a_hub_error(hub, tmp_path, monkeypatch, mode):
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http.time, "sleep", lambda s: None)  # the client's retries, without their back-off
    hub.upload_mode = mode
    repo = _name("drop")
    model = _weights(tmp_path / "m.safetensors")
    hub.drop_uploads = True
    try:
        r = _within(60, lambda: CliRunner().invoke(cli, ["push", str(model), repo]))
    finally:
        hub.drop_uploads = False
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "this is a bug" not in r.stderr, r.stderr
    assert lines[0].startswith(f"error: hf://{repo}: the connection to {hub.url} was lost during the upload ("), lines[0]
    assert lines[0].endswith("nothing was committed, push again")
    assert hub.list_files(repo) == [".gitattributes"]  # nothing committed


# --- item 9: symlinks out of a pushed folder ------------------------------------------------------------------
def _folder(tmp_path: Path, name: str = "soup") -> Path:
    d = tmp_path / name
    d.mkdir()
    _weights(d / "model.safetensors")
    (d / "config.json").write_text("{}")
    return d


def test_push_refuses_a_symlink_out_of_the_folder(hub, tmp_path):
    d = _folder(tmp_path)
    (tmp_path / "secret.txt").write_text("password")
    (d / "notes.txt").symlink_to("../secret.txt")
    repo = _name("link")
    with pytest.raises(CheckpointFormatError, match=rf"^{d}/notes.txt: is a symlink to ../secret.txt, outside {d}; "
                                                   "push would publish what it points to"):
        push(d, repo)
    r = CliRunner().invoke(cli, ["push", str(d), repo, "--dry-run"])
    assert r.exit_code == 1 and r.stderr.startswith(f"error: {d}/notes.txt: is a symlink"), r.output
    assert ("model", repo) not in hub.repos  # refused before any request


def test_push_refuses_a_linked_folder_outside(hub, tmp_path):
    d = _folder(tmp_path)
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "key.json").write_text("{}")
    (d / "extra").symlink_to(tmp_path / "private", target_is_directory=True)
    with pytest.raises(CheckpointFormatError, match=rf"^{d}/extra: is a symlink to {tmp_path}/private, outside"):
        push(d, _name("link"))


def test_links_inside_the_folder_and_into_the_hub_cache_are_pushed(hub, tmp_path):
    # a pulled snapshot: every file a link into the cache's blobs
    src = _folder(tmp_path, "src")
    repo = _name("snap")
    _upload(hub, src, repo)
    snapshot = pull(repo)
    assert (snapshot / "model.safetensors").is_symlink()
    d = _folder(tmp_path)
    (d / "same.json").symlink_to("config.json")  # inside the folder
    (d / "tokenizer.json").symlink_to(snapshot / "config.json")  # into the cache
    result = push(d, _name("ok"))
    assert {"same.json", "tokenizer.json", "model.safetensors"} <= set(result.uploaded)
    again = push(snapshot, _name("again"))  # the snapshot folder itself
    assert "model.safetensors" in again.uploaded


def test_an_excluded_or_hidden_link_is_not_refused(hub, tmp_path):
    d = _folder(tmp_path)
    (tmp_path / "secret.txt").write_text("password")
    (d / "notes.txt").symlink_to("../secret.txt")
    (d / ".hidden").symlink_to("../secret.txt")
    result = push(d, _name("ex"), exclude=["notes.txt"], dry_run=True)
    assert result.uploaded == ["README.md", "config.json", "model.safetensors"]


# --- item 10: a malformed shard index on the Hub ----------------------------------------------------------------
@pytest.mark.parametrize("index, detail", [
    ({"weight_map": {"a": 1, "b": [2]}}, "'weight_map' entry 'a' is 1, not a shard file name"),
    ({"weight_map": {"a": "../x.safetensors"}}, "shard name '../x.safetensors' leads outside the folder"),
    ({"weight_map": []}, "'weight_map' is a JSON list"),
])
def test_pull_refuses_a_malformed_shard_index(hub, tmp_path, index, detail):
    d = tmp_path / "sharded"
    d.mkdir()
    _weights(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    repo = _name("index")
    _upload(hub, d, repo)
    out = tmp_path / "out"
    with pytest.raises(CheckpointFormatError, match=rf"^hf://{repo}: model.safetensors.index.json: {re.escape(detail)}"):
        pull(repo, out=out)
    assert not out.exists()
    r = CliRunner().invoke(cli, ["pull", repo, "-o", str(out)])
    assert r.exit_code == 1 and r.stderr.startswith(f"error: hf://{repo}: model.safetensors.index.json: "), r.output
    assert not out.exists()
    with pytest.raises(CheckpointFormatError, match="model.safetensors.index.json: "):
        merge.open_checkpoint(f"hf://{repo}")


# --- issue 26 item 10: --exclude and push --dry-run ------------------------------------------------------------
def test_pull_exclude(hub, tmp_path):
    d = _folder(tmp_path, "src")
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    (d / "original").mkdir()
    (d / "original" / "params.json").write_text("{}")
    repo = _name("ex")
    _upload(hub, d, repo)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["pull", repo, "--include", "*", "--exclude", "*.bin", "--exclude", "original/*",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir() if p.name != ".papa-merge.json") == ["config.json",
                                                                                     "model.safetensors"]
    with pytest.raises(CheckpointNotFoundError, match="no weight files"):
        pull(repo, exclude="*.safetensors,*.bin")


def test_pull_exclude_cannot_drop_a_shard(hub, tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    for i in (1, 2):
        save_file({f"t{i}": torch.zeros(2)}, str(d / f"model-0000{i}-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"t1": "model-00001-of-00002.safetensors", "t2": "model-00002-of-00002.safetensors"}}))
    repo = _name("shards")
    _upload(hub, d, repo)
    for exclude in ("model-00002-*", "*.safetensors"):
        with pytest.raises(InvalidArgumentError, match=r"exclude leaves out (model-00001-of-00002.safetensors, )?"
                                                       r"model-00002-of-00002.safetensors, listed by "
                                                       r"model.safetensors.index.json; a sharded checkpoint needs all"):
            pull(repo, include="*", exclude=exclude) if exclude == "*.safetensors" else pull(repo, exclude=exclude)


def test_push_exclude_and_dry_run(hub, tmp_path):
    d = _folder(tmp_path)
    (d / "optimizer.pt").write_bytes(b"\0" * 100)
    (d / "logs").mkdir()
    (d / "logs" / "train.log").write_text("x")
    repo = _name("dry")
    n = len(hub.requests)
    r = CliRunner().invoke(cli, ["push", str(d), repo, "--exclude", "optimizer.pt", "--exclude", "*.log", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[:4] == [f"would push {d} to {repo}@main (3 files; dry run, nothing sent):",
                                         "  README.md", "  config.json", "  model.safetensors"]
    assert hub.requests[n:] == [] and ("model", repo) not in hub.repos
    result = push(d, repo, exclude=["optimizer.pt", "*.log"])
    assert hub.list_files(repo) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert not result.dry_run
    with pytest.raises(InvalidArgumentError, match=r"leaves out model.safetensors, which the checkpoint reads"):
        push(d, repo, exclude="*.safetensors")


# --- item 14: progress bars and full disks ---------------------------------------------------------------------
def test_no_progress_bars_in_a_log(hub, tmp_path):
    d = _folder(tmp_path, "src")
    repo = _name("bars")
    _upload(hub, d, repo)
    r = CliRunner().invoke(cli, ["pull", repo, "-o", str(tmp_path / "out")])  # stderr is not a terminal
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    r = CliRunner().invoke(cli, ["push", str(d), repo])
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    r = CliRunner().invoke(cli, ["soup", f"hf://{repo}", f"hf://{repo}", "-o", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 0 and "it/s" not in r.stderr and "B/s" not in r.stderr, r.stderr
    from huggingface_hub.utils import are_progress_bars_disabled

    assert not are_progress_bars_disabled()  # put back for the caller


def test_progress_bars_follow_the_environment_as_set_now(monkeypatch, capsys):
    import merge.hub as hub_mod
    from huggingface_hub.utils import are_progress_bars_disabled

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with hub_mod._progress_bars(True):
        assert are_progress_bars_disabled()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    with hub_mod._progress_bars(False):
        assert are_progress_bars_disabled()
    with hub_mod._progress_bars(True):
        assert not are_progress_bars_disabled()
    assert not are_progress_bars_disabled()


def test_pull_out_on_a_full_disk_names_the_output(hub, tmp_path, monkeypatch):
    d = _folder(tmp_path, "src")
    repo = _name("full")
    _upload(hub, d, repo)
    out = tmp_path / "out"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    import merge.hub as hub_mod

    with pytest.MonkeyPatch.context() as m:
        m.setattr(hub_mod.shutil, "copyfile", full)
        r = CliRunner().invoke(cli, ["pull", repo, "-o", str(out)])
    assert r.exit_code == 1 and r.stderr.startswith(f"error: no space left on the device ({out}"), r.stderr
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []

    def full_cache(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/blobs/x.incomplete")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", full_cache)
    r = CliRunner().invoke(cli, ["pull", repo, "-o", str(out)])
    assert r.exit_code == 1 and r.stderr.startswith(f"error: no space left on the device ({out}: while downloading "
                                                    "into huggingface_hub's cache"), r.stderr
