"""What papa-merge guarantees (README, "What papa-merge guarantees"), one test each (issue 11, items 3 and 4).

1. inputs are never modified;                       test_inputs_are_never_modified
2. no pickled code runs;                            test_no_pickled_code_runs
3. nothing appears under the final name unless the output is complete (errors, SIGINT, SIGTERM, SIGHUP);
                                                    test_nothing_under_the_final_name_after_an_error,
                                                    test_a_signal_mid_write_leaves_nothing_behind
4. ``force`` replaces only papa-merge outputs;      test_force_refuses_a_folder_papa_merge_did_not_write,
                                                    test_force_replaces_a_previous_papa_merge_output, ...
5. reruns are bit-identical;                        test_reruns_are_bit_identical
and temporaries of killed runs are removed by the next run into their folder: test_stale_temporaries_...

Issue 25, the second hardening round, one test per class of defect:
6. no infinity is written silently (the cast);      test_no_infinity_is_written_silently_at_the_cast_to_a_narrow_dtype
7. interpolate replaces only its own files;         test_interpolate_never_replaces_a_file_papa_merge_did_not_write
8. a BatchNorm-recomputed soup appears complete;    test_a_soup_with_recomputed_batchnorm_appears_only_when_complete
9. every Hub request is bounded;                    test_every_hub_request_is_bounded
10. push publishes nothing outside the folder;      test_push_never_publishes_a_file_outside_the_folder
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import merge
from cli.main import cli
from merge.io.atomic import MANIFEST, AtomicOutput, _HOST, is_papa_output
from tests.ckpt_factory import member_state, save_members

# The factory's random members share no start: averaging them warns, as it should; no test here checks that.
pytestmark = pytest.mark.filterwarnings("ignore::merge.errors.DifferentStartsWarning")

ROOT = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` with its sha256 and mtime: what "unchanged" means."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def _run(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(cli, args)
    return res.exit_code, res.output


# --- 1. inputs are never modified ----------------------------------------------------------------------------
def test_inputs_are_never_modified(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    paths, sds = save_members(inputs, 2)
    torch.save(sds[0], inputs / "m0.pt")
    merge.soup([paths[0]], out=inputs / "hf", shard_size="2kB")  # a sharded model folder as an input
    (inputs / "hf" / "config.json").write_text("{}")
    before = _tree(inputs)
    members = [*paths, inputs / "m0.pt", inputs / "hf"]
    merge.soup(members, out=tmp_path / "o.safetensors")
    merge.soup(members, out=tmp_path / "o", weights=[1, 2, 3, 4], dtype="bfloat16")
    merge.soup(members, out=tmp_path / "o.pt")
    bad = member_state(9)
    bad["classifier.bias"] = torch.zeros(11)
    save_file(bad, str(inputs / "bad.safetensors"))
    before["bad.safetensors"] = _tree(inputs)["bad.safetensors"]
    assert _run(["soup", *map(str, members), str(inputs / "bad.safetensors"), "-o", str(tmp_path / "x")])[0] == 1
    assert _tree(inputs) == before


# --- 2. no pickled code runs -------------------------------------------------------------------------------
class _Marker:
    """Unpickling this writes a marker file (by calling pathlib.Path.touch on it)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("how", ["torch.save", "legacy", "pickle-2", "pickle-4", "wrapped"])
def test_no_pickled_code_runs(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "ran"
    p = tmp_path / "m.pt"
    payload = {"w": torch.ones(2), "x": _Marker(marker)}
    if how == "torch.save":
        torch.save(payload, p)
    elif how == "legacy":  # the pre-1.6 format: several pickles in a row, the code in the fourth
        torch.save(payload, p, _use_new_zipfile_serialization=False)
    elif how == "wrapped":
        torch.save({"state_dict": {"w": torch.ones(2)}, "callback": _Marker(marker)}, p)
    else:
        p.write_bytes(pickle.dumps(payload, protocol=int(how[-1])))
    code, out = _run(["soup", str(p), "-o", str(tmp_path / "o.safetensors")])
    assert code == 1 and out.startswith(f"error: {p}: refuses to load: the pickle calls "), out
    called = out.split("the pickle calls ", 1)[1].split(",", 1)[0]
    assert called in ("builtins.getattr", "pathlib.Path.touch", "pathlib.PosixPath"), called  # named, from the file
    assert "never runs pickled code" in out
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


# --- 3. nothing under the final name unless complete --------------------------------------------------------
def test_nothing_under_the_final_name_after_an_error(tmp_path: Path, monkeypatch) -> None:
    paths, _ = save_members(tmp_path / "in", 2, big=True)
    from merge.io import sources

    real, calls = sources.SafetensorsSource.read_into, {"n": 0}

    def flaky(self, name, offset, out):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk unplugged")
        return real(self, name, offset, out)

    monkeypatch.setattr(sources.SafetensorsSource, "read_into", flaky)
    for out in ("o.safetensors", "o", "o.pt"):
        calls["n"] = 0
        with pytest.raises(OSError, match="disk unplugged"):
            merge.soup(paths, out=tmp_path / out, chunk_bytes=4096)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


_SLOW_SOUP = textwrap.dedent("""
    import signal, sys, time
    # The dispositions a terminal gives a program: a suite run under nohup or in the background starts with
    # SIGHUP or SIGINT ignored, and papa-merge leaves an ignored signal ignored.
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from pathlib import Path
    import merge
    from merge.io import sources
    real = sources.SafetensorsSource.read_into
    ready, final = Path(sys.argv[2]), Path(sys.argv[3])
    def slow(self, name, offset, out):
        if any(".tmp-" in p.name for p in final.parent.iterdir()):
            ready.touch()  # the output's temporary exists: the merge is writing it
        time.sleep(0.02)
        return real(self, name, offset, out)
    sources.SafetensorsSource.read_into = slow
    merge.soup([sys.argv[1]] * 2, out=sys.argv[3], chunk_bytes=1024, force=True)
    print("finished")
""")


@pytest.mark.parametrize("signame, out", [("SIGTERM", "o.pt"), ("SIGHUP", "o"), ("SIGINT", "o.safetensors")])
def test_a_signal_mid_write_leaves_nothing_behind(tmp_path: Path, signame: str, out: str) -> None:
    save_file({"w": torch.randn(64, 1024)}, str(tmp_path / "m.safetensors"))
    if out == "o":  # an earlier papa-merge output that --force would replace: it must survive the signal
        merge.soup([tmp_path / "m.safetensors"], out=tmp_path / out)
    before = sorted(p.name for p in tmp_path.iterdir())
    ready = tmp_path.parent / f"{tmp_path.name}-ready"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SOUP, str(tmp_path / "m.safetensors"), str(ready),
                             str(tmp_path / out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), proc.communicate()
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "the temporary output should exist mid-write"
    sig = getattr(signal, signame)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert b"finished" not in stdout
    # SIGTERM/SIGHUP: exit 128 + signal once cleaned up; SIGINT: Python's KeyboardInterrupt, then death by SIGINT
    assert proc.returncode == (128 + sig if sig != signal.SIGINT else -sig), stderr.decode()[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary, no new final name


def test_a_signal_during_the_final_rename_is_deferred(tmp_path: Path) -> None:
    """The two renames of a forced folder replacement are never cut in half: the signal waits for them."""
    merge.soup([save_members(tmp_path / "in", 1)[0][0]], out=tmp_path / "o")
    import merge.io.atomic as atomic

    real = os.replace
    calls = []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives between the old folder moving aside and the new one in
        return real(a, b)

    with AtomicOutput(tmp_path / "o", folder=True, force=True) as out:
        out.file("model.safetensors").write_bytes(b"new")
        atomic.os.replace = replace
        try:
            with pytest.raises(SystemExit) as e:
                out.commit()
        finally:
            atomic.os.replace = real
    assert e.value.code == 128 + signal.SIGTERM and len(calls) == 2
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == b"new"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are restored once no output is open


@pytest.fixture
def default_signals():
    """SIGTERM and SIGHUP at their defaults for the test (nohup or a background launch ignores SIGHUP)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for s in saved:
        signal.signal(s, signal.SIG_DFL)
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_signal_handlers_are_installed_once_and_restored(tmp_path: Path, default_signals) -> None:
    import merge.io.atomic as atomic

    with AtomicOutput(tmp_path / "a.safetensors", folder=False), AtomicOutput(tmp_path / "b", folder=True):
        assert signal.getsignal(signal.SIGTERM) is atomic._on_signal
        assert atomic._saved[signal.SIGTERM] is signal.SIG_DFL and atomic._saved[signal.SIGHUP] is signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not atomic._saved
    signal.signal(signal.SIGTERM, atomic._on_signal)  # as an output finished in another thread may leave it
    try:
        with AtomicOutput(tmp_path / "c.safetensors", folder=False):
            assert atomic._saved.get(signal.SIGTERM) is not atomic._on_signal  # never chained to itself
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_stale_temporaries_of_dead_processes_are_removed_by_the_next_run(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    save_file({"w": torch.ones(4)}, str(tmp_path / "m.safetensors"))
    stale_file = tmp_path / f".o.safetensors.tmp-{_HOST}-{pid}-0123abcd"
    stale_file.write_bytes(b"x" * 1000)
    stale_dir = tmp_path / f".soup.old-{_HOST}-{pid}-89abcdef"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "model.safetensors").write_bytes(b"x")
    live = tmp_path / f".other.safetensors.tmp-{_HOST}-{os.getpid()}-0123abcd"  # this process: alive
    live.write_bytes(b"y")
    other_host = tmp_path / f".o.safetensors.tmp-{'f' * 8 if _HOST != 'f' * 8 else 'e' * 8}-{pid}-0123abcd"
    other_host.write_bytes(b"z")  # a run on another machine sharing this folder: its pid means nothing here
    user = tmp_path / f".o.safetensors.tmp-{pid}"  # not our pattern: a user's file
    user.write_bytes(b"u")
    merge.soup([tmp_path / "m.safetensors"], out=tmp_path / "o.safetensors")
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other_host.exists() and user.exists()


# --- 4. force replaces only papa-merge outputs ---------------------------------------------------------------
def test_force_refuses_a_folder_papa_merge_did_not_write(tmp_path: Path) -> None:
    save_file({"w": torch.ones(4)}, str(tmp_path / "m.safetensors"))
    models = tmp_path / "models"
    (models / "photos").mkdir(parents=True)
    (models / "notes.txt").write_text("mine")
    (models / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    save_file({"x": torch.zeros(1)}, str(models / "other.safetensors"))
    before = _tree(models)
    code, out = _run(["soup", str(tmp_path / "m.safetensors"), "-o", str(models), "--force"])
    assert code == 1
    assert out == (f"error: {models}: already exists and holds files with no record that papa-merge wrote them "
                   f"(no {MANIFEST}): notes.txt, other.safetensors, photos/; force replaces only a previous "
                   "papa-merge output, so it is left as it is: move it away or choose another output\n")
    assert _tree(models) == before


def test_force_refuses_a_papa_merge_folder_with_files_added_since(tmp_path: Path) -> None:
    save_file({"w": torch.ones(4)}, str(tmp_path / "m.safetensors"))
    out = merge.soup([tmp_path / "m.safetensors"], out=tmp_path / "soup").path
    (out / "my-eval.csv").write_text("acc,0.9\n")
    (out / "runs").mkdir()
    with pytest.raises(merge.OutputExistsError) as e:
        merge.soup([tmp_path / "m.safetensors"], out=out, force=True)
    assert str(e.value) == (f"{out}: already exists and holds files papa-merge did not write: my-eval.csv, runs/; "
                            "force replaces only a previous papa-merge output, so it is left as it is: move it away "
                            "or choose another output")
    assert e.value.option is None and (out / "my-eval.csv").exists()


def test_force_replaces_a_previous_papa_merge_output(tmp_path: Path) -> None:
    paths, _ = save_members(tmp_path / "in", 2)
    (tmp_path / "in" / "config.json").write_text("{}")
    for out in ("soup", "soup.safetensors", "soup.pt"):
        first = merge.soup(paths[:1], out=tmp_path / out)
        second = merge.soup(paths, out=tmp_path / out, force=True)
        assert second.path == first.path and is_papa_output(second.path)
    record = json.loads((tmp_path / "soup" / MANIFEST).read_text())
    assert record["files"] == sorted(p.name for p in (tmp_path / "soup").iterdir() if p.name != MANIFEST)
    # an empty folder holds nothing to lose; a papa-merge file may become a folder and back
    (tmp_path / "empty").mkdir()
    merge.soup(paths, out=tmp_path / "empty", force=True)
    merge.soup(paths, out=tmp_path / "soup.safetensors", force=True)


def test_force_refuses_a_file_papa_merge_did_not_write(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path / "in", 2)
    theirs = tmp_path / "theirs.safetensors"
    save_file(sds[0], str(theirs))
    for target in (theirs, tmp_path / "notes.pt"):
        if target.suffix == ".pt":
            target.write_bytes(b"not ours")
        before = target.read_bytes()
        code, out = _run(["soup", *map(str, paths), "-o", str(target), "--force"])
        assert code == 1 and out.splitlines()[-1] + "\n" == (f"error: {target}: already exists and is a file papa-merge did not write (it "
                                     "has no papa_merge metadata); force replaces only a previous papa-merge output, "
                                     "so it is left as it is: move it away or choose another output\n")
        assert target.read_bytes() == before
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "data.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    code, out = _run(["soup", *map(str, paths), "-o", str(link), "--force"])
    assert code == 1 and f"is a symbolic link (to {tmp_path / 'elsewhere'})" in out
    assert link.is_symlink() and (tmp_path / "elsewhere" / "data.txt").read_text() == "keep"


def test_a_trained_member_is_a_papa_merge_output(tmp_path: Path) -> None:
    """Checkpoints papa-merge trains carry papa_merge metadata, so retraining with force may replace them."""
    path = merge.write_state_dict({"w": torch.ones(2)}, tmp_path / "m.safetensors",
                                  metadata={"papa_merge.train": "{}"})
    assert is_papa_output(path)
    merge.write_state_dict({"w": torch.zeros(2)}, path, metadata={"papa_merge.train": "{}"}, force=True)
    plain = merge.write_state_dict({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    assert not is_papa_output(plain)


# --- 5. reruns are bit-identical -----------------------------------------------------------------------------
def test_reruns_are_bit_identical(tmp_path: Path) -> None:
    paths, _ = save_members(tmp_path / "in", 3)
    (tmp_path / "in" / "config.json").write_text('{"model_type": "toy"}')
    for out, options in (("a.safetensors", {}), ("a", {"shard_size": "2kB"}), ("a.pt", {}),
                         ("w.safetensors", {"weights": [0.2, 0.3, 0.5], "dtype": "bfloat16"})):
        first = _hashes(merge.soup(paths, out=tmp_path / out, **options).path)
        again = _hashes(merge.soup(paths, out=tmp_path / out, force=True, **options).path)
        assert first == again, out
        if out == "a":
            assert len(first) > 3 and MANIFEST in first  # shards, index, config, card and the record


def _hashes(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {k: v[0] for k, v in _tree(path).items()}


def test_the_cli_says_in_one_line_that_a_signal_stopped_it() -> None:
    import click

    from cli.main import _Group
    from merge.io.atomic import Terminated

    @click.group(cls=_Group)
    def group() -> None:
        pass

    @group.command()
    def work() -> None:
        raise Terminated(signal.SIGTERM)  # what the handler raises once the temporary output is removed

    result = CliRunner().invoke(group, ["work"])
    assert result.exit_code == 128 + signal.SIGTERM
    assert result.output.strip() == ("error: stopped by SIGTERM; the unfinished output was removed and nothing "
                                     "else was changed")


# --- issue 25: the classes of defects of the second hardening round, each as a guarantee ------------------------
def test_no_infinity_is_written_silently_at_the_cast_to_a_narrow_dtype(tmp_path: Path) -> None:
    """Finite members whose result the output dtype cannot hold (float16 past 65504) are an error, never inf."""
    save_file({"x": torch.full((4,), 1e6)}, str(tmp_path / "big.safetensors"))
    big = str(tmp_path / "big.safetensors")
    for extra in (["--dtype", "float16"], ["--dtype", "bfloat16", "--weights", "1e39,1e39", "--no-normalize"]):
        r = CliRunner().invoke(cli, ["soup", big, big, *extra, "-o", str(tmp_path / "o.safetensors")])
        assert r.exit_code in (1, 2) and r.stderr.startswith("error: "), r.output
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.safetensors").exists()
    # float16 members whose task-arithmetic result passes 65504.
    f16 = {n: str(tmp_path / f"{n}.safetensors") for n in ("base", "a", "b")}
    for n, v in (("base", 0.0), ("a", 1e4), ("b", 3e4)):
        save_file({"x": torch.full((4,), v, dtype=torch.float16)}, f16[n])
    r = CliRunner().invoke(cli, ["soup", f16["a"], f16["b"], "--base", f16["base"], "--method", "task_arithmetic",
                                 "--lambda", "3", "-o", str(tmp_path / "t.safetensors")])
    assert r.exit_code == 1 and "float16" in r.stderr and not (tmp_path / "t.safetensors").exists(), r.output


def test_interpolate_never_replaces_a_file_papa_merge_did_not_write(tmp_path: Path) -> None:
    """The curve's plot and the table beside it are refused when they exist, before any work; --force replaces only
    an earlier curve, never the user's own file."""
    paths, _ = save_members(tmp_path / "m", 2)
    (tmp_path / "docs").mkdir()
    mine = tmp_path / "docs" / "README.md"
    mine.write_text("# my notes\n")
    for force in ([], ["--force"]):
        r = CliRunner().invoke(cli, ["interpolate", str(paths[0]), str(paths[1]), "-o", str(tmp_path / "docs" /
                                                                                          "README.png"), *force])
        assert r.exit_code == 1 and f"{mine}: already exists" in r.stderr, r.output
    assert mine.read_text() == "# my notes\n" and sorted(p.name for p in mine.parent.iterdir()) == ["README.md"]


def test_a_soup_with_recomputed_batchnorm_appears_only_when_complete(tmp_path: Path) -> None:
    """soup --recompute-bn checks architecture and data before writing, and runs its pass before the rename."""
    paths, _ = save_members(tmp_path / "m", 2)  # no papa_merge.model: no architecture to recompute with
    out = tmp_path / "soup.safetensors"
    r = CliRunner().invoke(cli, ["soup", *map(str, paths), "--recompute-bn", "2", "-o", str(out)])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "--model" not in r.stderr  # a plain soup has no --model: the fix named is one soup takes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing under the final name, no temporary
    r = CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(out)])
    assert r.exit_code == 0, r.output  # and the next run is not refused with "already exists"


def test_every_hub_request_is_bounded(hub, tmp_path: Path, monkeypatch) -> None:
    """A Hub that accepts connections and never answers gives one line naming the endpoint, in bounded time."""
    import threading

    from tests.hubserver import HubServer

    silent = HubServer(tmp_path / "silent").start()
    silent.hang = True
    url = silent.url
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    box: dict = {}
    try:
        t = threading.Thread(target=lambda: box.update(r=CliRunner().invoke(cli, ["pull", "org/a"])), daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "pull still waiting after 60 s on a Hub that never answers"
    finally:
        silent.stop()
    r = box["r"]
    assert r.exit_code == 1 and r.stderr.startswith(f"error: hf://org/a: {url} did not answer in time"), r.output


def test_push_never_publishes_a_file_outside_the_folder(hub, tmp_path: Path) -> None:
    """A symbolic link leading out of the pushed folder is refused, naming the link, before any request."""
    folder = tmp_path / "soup"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (tmp_path / "secret.txt").write_text("password")
    (folder / "notes.txt").symlink_to("../secret.txt")
    r = CliRunner().invoke(cli, ["push", str(folder), "org/linked"])
    assert r.exit_code == 1 and r.stderr.startswith(f"error: {folder}/notes.txt: is a symlink to ../secret.txt"), r.output
    assert ("model", "org/linked") not in hub.repos
