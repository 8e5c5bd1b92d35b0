"""Pull from and push to a Hub: the real huggingface_hub client against tests/hubserver.py on 127.0.0.1.

No test reaches the real Hub, the user's token or the user's cache (see the Hub block of conftest.py:
a throwaway HF_HOME, no token, and HF_ENDPOINT pointing at the local server or at a dead port).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi, ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge
import merge.hub as hub_mod
from cli.main import cli
from merge.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    HubError,
    InvalidArgumentError,
    OutputExistsError,
)
from merge.hub import model_card, parse_reference, pull, push, resolve_reference
from merge.io.sources import open_checkpoint
from merge.soups import RECIPE_KEY

pytestmark = [pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:the members come from")]  # random test members share no start


def _name(prefix: str = "m") -> str:
    return f"org/{prefix}-{uuid.uuid4().hex[:8]}"


def _state(seed: int, n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(n, 8, generator=g),
        "encoder.bias": torch.randn(n, generator=g),
        "head.weight": torch.randn(3, n, generator=g),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def _f64_mean(sds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sds[0].items():
        if v.is_floating_point():
            out[k] = (sum(sd[k].double() for sd in sds) / len(sds)).to(v.dtype)
        else:
            out[k] = v
    return out


def _sharded_folder(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    """A transformers-style folder: two shards + index, config, tokenizer, and distractors."""
    folder.mkdir(parents=True)
    names = list(sd)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    torch.save(sd, folder / "pytorch_model.bin")  # the same weights in a format nobody needs
    (folder / "optimizer.pt").write_bytes(b"\0" * 1000)
    (folder / "notes").mkdir()
    (folder / "notes" / "run.json").write_text("{}")
    return folder


def _upload(server, folder: Path, repo_id: str, **kw) -> str:
    api = HfApi(endpoint=server.url, token=False)
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, **kw).oid


def _files_under(folder: Path) -> set[str]:
    """The files pulled into ``folder`` (without papa-merge's record of them, .papa-merge.json)."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != ".papa-merge.json"}


# --- references ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("hf://org/name", ("org/name", None)),
    ("org/name@v2", ("org/name", "v2")),
    ("hf://org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("hf://org/name@refs%2Fpr%2F3", ("org/name", "refs/pr/3")),
    ("hf://gpt2", ("gpt2", None)),
    ("hf://org/my.model-v1_2@" + "a" * 40, ("org/my.model-v1_2", "a" * 40)),
])
def test_parse_reference(text, expected):
    assert parse_reference(text) == expected


def test_parse_file_reference():
    r = hub_mod._parse("hf://org/name@main/sub/w.safetensors")
    assert (r.repo_id, r.revision, r.path) == ("org/name", "main", "sub/w.safetensors")
    r = hub_mod._parse("hf://org/name/w.safetensors")
    assert (r.repo_id, r.revision, r.path) == ("org/name", None, "w.safetensors")
    assert str(r) == "hf://org/name/w.safetensors"


@pytest.mark.parametrize("bad", ["", "hf://", "org/na me", "org--x/y", "org/../x", "hf://org/name@", "org/name.git"])
def test_parse_reference_rejects(bad):
    with pytest.raises(InvalidArgumentError, match="Hub reference|revision|expected a repo"):
        parse_reference(bad)


def test_parse_reference_rejects_a_file_path():
    with pytest.raises(InvalidArgumentError, match="expected a repo"):
        parse_reference("org/name/file.safetensors")


def test_hub_source_of_cache_paths():
    sha = "b" * 40
    assert hub_mod.hub_source_of(f"/x/hub/models--org--a/snapshots/{sha}") == f"hf://org/a@{sha}"
    assert hub_mod.hub_source_of(f"/x/hub/models--gpt2/snapshots/{sha}/w.bin") == f"hf://gpt2@{sha}/w.bin"
    assert hub_mod.hub_source_of("/data/ckpts/a.safetensors") is None


# --- pull --------------------------------------------------------------------------------------------------
def test_pull_sharded_model_fetches_only_what_it_needs(hub, tmp_path):
    sd = _state(0)
    src = _sharded_folder(tmp_path / "src", sd)
    (src / "README.md").write_text("---\ntags: [x]\n---\nhello\n")
    repo = _name("sharded")
    sha = _upload(hub, src, repo)
    before = len(hub.downloads())

    folder = pull(repo)

    assert folder.parent.name == "snapshots" and folder.name == sha
    expected = {"model.safetensors.index.json", "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors", "config.json", "tokenizer.json", "README.md"}
    assert _files_under(folder) == expected
    for name in expected:
        assert (folder / name).read_bytes() == (src / name).read_bytes(), name
    fetched = {d.rsplit("/", 1)[-1] for d in hub.downloads()[before:]}
    assert "pytorch_model.bin" not in fetched and "optimizer.pt" not in fetched and ".gitattributes" not in fetched
    with open_checkpoint(f"hf://{repo}") as ck:  # the same cache, through the checkpoint reader
        got = ck.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_pull_include_and_out_copies_files(hub, tmp_path):
    src = _sharded_folder(tmp_path / "src", _state(1))
    repo = _name("inc")
    _upload(hub, src, repo)
    out = tmp_path / "pulled"

    got = pull(f"hf://{repo}", include="*.safetensors", out=out)

    assert got == out
    # Shards bring the index that lists them (the README's `pull --include '*.safetensors'` then soups).
    pulled = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"}
    assert _files_under(out) == pulled
    assert not any(p.is_symlink() for p in out.iterdir())  # real copies, not links into the cache
    for name in pulled:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    with pytest.raises(OutputExistsError, match="already exists"):
        pull(repo, include="*.json", out=out)
    assert _files_under(out) == pulled
    pull(repo, include=["*.json"], out=out, force=True)
    assert _files_under(out) == {"model.safetensors.index.json", "config.json", "tokenizer.json", "notes/run.json"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _files_under(pull(repo, include="config.json", out=empty)) == {"config.json"}


def test_sharded_pull_with_include_then_soup(hub, tmp_path):
    """Issue 12.6, the README's own commands: `pull --include '*.safetensors'` of a sharded repo, then `soup`."""
    sd = _state(2)
    src = _sharded_folder(tmp_path / "src", sd)
    repo = _name("shards")
    _upload(hub, src, repo)
    out = tmp_path / "members" / "a"
    r = CliRunner().invoke(cli, ["pull", repo, "--include", "*.safetensors", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "model.safetensors.index.json" in _files_under(out)
    soup = tmp_path / "soup.safetensors"
    r = CliRunner().invoke(cli, ["soup", str(out), str(out), "-o", str(soup)])
    assert r.exit_code == 0, r.output
    got = load_file(str(soup))
    assert set(got) == set(sd) and all(torch.equal(got[k], v) for k, v in sd.items())
    # One shard asked for: its index comes too, and the soup names the shard that is missing.
    one = pull(repo, include="model-00001-*", out=tmp_path / "one")
    assert _files_under(one) == {"model-00001-of-00002.safetensors", "model.safetensors.index.json"}
    with pytest.raises(CheckpointNotFoundError, match="model-00002-of-00002.safetensors"):
        merge.soup([one, one], out=tmp_path / "never.safetensors")
    # Weights that no index lists bring none.
    assert _files_under(pull(repo, include="pytorch_model.bin", out=tmp_path / "bin")) == {"pytorch_model.bin"}


def test_pull_revisions(hub, tmp_path):
    repo = _name("rev")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    save_file(_state(1), str(a / "model.safetensors"))
    save_file(_state(2), str(b / "model.safetensors"))
    first = _upload(hub, a, repo)
    HfApi(endpoint=hub.url, token=False).create_branch(repo, branch="v1", revision=first)
    _upload(hub, b, repo)

    old = pull(f"{repo}@v1")
    assert (old / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
    assert (pull(repo, revision=first) / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
    assert (pull(repo) / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    with pytest.raises(InvalidArgumentError, match="pass one"):
        pull(f"{repo}@v1", revision="main")


def test_resolve_single_file_repo_and_named_file(hub, tmp_path):
    repo = _name("single")
    d = tmp_path / "d"
    d.mkdir()
    save_file(_state(3), str(d / "member.safetensors"))
    _upload(hub, d, repo)
    p = resolve_reference(f"hf://{repo}")
    assert p.name == "member.safetensors" and p.read_bytes() == (d / "member.safetensors").read_bytes()
    assert resolve_reference(f"hf://{repo}/member.safetensors") == p
    save_file(_state(4), str(d / "other.safetensors"))
    _upload(hub, d, repo)
    with pytest.raises(CheckpointFormatError, match=r"2 weight files .*name one, e\.g\. hf://"):
        resolve_reference(f"hf://{repo}")
    both = pull(repo)  # pull, unlike a checkpoint reference, takes every checkpoint of such a repo
    assert _files_under(both) == {"member.safetensors", "other.safetensors"}
    assert (both / "other.safetensors").read_bytes() == (d / "other.safetensors").read_bytes()


def test_offline_uses_the_cache(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    repo = _name("offline")
    d = tmp_path / "d"
    d.mkdir()
    save_file(_state(5), str(d / "model.safetensors"))
    _upload(hub, d, repo)
    online = resolve_reference(f"hf://{repo}")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    n = len(hub.requests)
    assert resolve_reference(f"hf://{repo}") == online
    assert len(hub.requests) == n  # no request at all
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and this revision is not in the local cache"):
        resolve_reference(f"hf://{_name('never-pulled')}")


# --- bad inputs: Python errors and the CLI's one-line messages ----------------------------------------------
def test_missing_repo(hub):
    repo = _name("missing")
    with pytest.raises(CheckpointNotFoundError, match=f"hf://{repo}: repository not found on {hub.url}; check the "
                                                      "name, or log in") as e:
        pull(repo)
    assert isinstance(e.value, FileNotFoundError)
    r = CliRunner().invoke(cli, ["pull", repo])
    assert r.exit_code == 1
    assert r.stderr.strip() == f"error: hf://{repo}: repository not found on {hub.url}; check the name, or log " \
                               "in (hf auth login, or HF_TOKEN) if it is private"
    r = CliRunner().invoke(cli, ["soup", f"hf://{repo}", f"hf://{repo}", "-o", "never.safetensors"])
    assert r.exit_code == 1 and f"hf://{repo}: repository not found" in r.stderr


def test_missing_revision(hub, tmp_path):
    repo = _name("norev")
    d = tmp_path / "d"
    d.mkdir()
    save_file(_state(0), str(d / "model.safetensors"))
    _upload(hub, d, repo)
    with pytest.raises(CheckpointNotFoundError, match="revision 'v9' not found"):
        resolve_reference(f"hf://{repo}@v9")
    r = CliRunner().invoke(cli, ["pull", f"{repo}@v9"])
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"error: hf://{repo}: revision 'v9' not found on {hub.url}; check the branch, tag "
                                "or commit name (or drop @v9 to use main)")


def test_missing_file(hub, tmp_path):
    repo = _name("nofile")
    d = tmp_path / "d"
    d.mkdir()
    save_file(_state(0), str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    _upload(hub, d, repo)
    with pytest.raises(CheckpointNotFoundError, match=r"no file or folder 'nope.safetensors'"):
        resolve_reference(f"hf://{repo}/nope.safetensors")
    r = CliRunner().invoke(cli, ["soup", f"hf://{repo}/nope.safetensors", "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"error: hf://{repo}/nope.safetensors: no file or folder 'nope.safetensors' in "
                                f"{repo}@main; files: .gitattributes, config.json, model.safetensors")
    r = CliRunner().invoke(cli, ["pull", repo, "--include", "*.gguf"])
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"error: hf://{repo}: no file matches '*.gguf' in {repo}@main; files: "
                                ".gitattributes, config.json, model.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_a_shard_missing_on_the_hub(hub, tmp_path):
    """The index lists a shard the repo does not hold: the download names the file."""
    repo = _name("brokenidx")
    d = tmp_path / "d"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    _upload(hub, d, repo)
    with pytest.raises(CheckpointNotFoundError) as e:
        open_checkpoint(f"hf://{repo}")
    assert str(e.value) == (f"hf://{repo}: model.safetensors.index.json lists 1 shard(s) missing from {repo}@main: "
                            "gone.safetensors; the upload is incomplete, push the missing shards")


def test_repo_without_weights(hub, tmp_path):
    repo = _name("noweights")
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text("{}")
    _upload(hub, d, repo)
    with pytest.raises(CheckpointNotFoundError, match=r"no weight files .* files: .gitattributes, config.json"):
        resolve_reference(f"hf://{repo}")


def test_unreachable_hub(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubError, match=r"hf://org/x: cannot reach http://127.0.0.1:9 .*check the connection and "
                                       "HF_ENDPOINT"):
        pull("org/x")
    r = CliRunner().invoke(cli, ["pull", "org/x"])
    assert r.exit_code == 1 and r.stderr.startswith("error: hf://org/x: cannot reach http://127.0.0.1:9")


def test_bad_reference_through_the_cli(hub):
    r = CliRunner().invoke(cli, ["pull", "not a repo"])
    assert r.exit_code == 2
    assert "error: not a Hub reference: 'not a repo'; write org/name[@revision]" in r.stderr


def test_push_nonexistent_path(hub, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointNotFoundError, match="no such file or folder"):
        push(missing, _name())
    r = CliRunner().invoke(cli, ["push", str(missing), _name()])
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"error: {missing}: no such file or folder; pass the checkpoint (a .safetensors "
                                "file or a model folder) to push")


def test_push_not_a_checkpoint(hub, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    n = len(hub.requests)
    r = CliRunner().invoke(cli, ["push", str(junk), _name()])
    assert r.exit_code == 1 and "not a safetensors file" in r.stderr
    assert len(hub.requests) == n  # refused before any upload


def test_push_without_write_access(hub, tmp_path):
    f = tmp_path / "a.safetensors"
    save_file(_state(0), str(f))
    hub.forbidden_orgs.add("acme")
    try:
        r = CliRunner().invoke(cli, ["push", str(f), "acme/soup"])
    finally:
        hub.forbidden_orgs.discard("acme")
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"error: hf://acme/soup: {hub.url} refused the push (403): log in (hf auth login) "
                                "or set HF_TOKEN to a token with write access")
    assert ("model", "acme/soup") not in hub.repos


def test_push_create_pr_with_revision_is_refused(tmp_path):
    f = tmp_path / "a.safetensors"
    save_file(_state(0), str(f))
    r = CliRunner().invoke(cli, ["push", str(f), "org/x", "--create-pr", "--revision", "dev"])
    assert r.exit_code == 2 and "--create-pr opens a pull request against main; drop --revision dev" in r.stderr


# --- push --------------------------------------------------------------------------------------------------
def _soup_file(tmp_path: Path, n: int = 2, metrics: dict | None = None) -> tuple[Path, list[dict]]:
    sds = [_state(i) for i in range(n)]
    paths = []
    for i, sd in enumerate(sds):
        p = tmp_path / f"member{i}.safetensors"
        save_file(sd, str(p))
        paths.append(p)
    out = tmp_path / "soup.safetensors"
    merge.soup(paths, out=out, weights=[3.0, 1.0] if n == 2 else None,
               metadata={"papa_merge.metrics": json.dumps(metrics)} if metrics else None)
    return out, sds


@pytest.mark.parametrize("xet_disabled, mode", [(True, "lfs"), (True, "regular"), (False, "regular")],
                         ids=["lfs-batch", "regular-no-xet", "regular-xet-client"])
def test_push_new_repo_both_upload_paths(hub, tmp_path, monkeypatch, xet_disabled, mode):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", xet_disabled)
    hub.upload_mode = mode
    soup, _ = _soup_file(tmp_path)
    repo = _name("push")
    n = len(hub.requests)

    result = push(soup, repo, private=True, commit_message="my soup")

    api = HfApi(endpoint=hub.url, token=False)
    head = api.model_info(repo).sha
    assert result.url == str(result) == result.commit_url == f"{hub.url}/{repo}/commit/{head}"
    assert result.pr_url is None and result.deleted == [] and result.checkpoint == "model.safetensors"
    assert result.uploaded == ["README.md", "model.safetensors"]
    assert hub.list_files(repo) == [".gitattributes", "README.md", "model.safetensors"]  # the name loaders look for
    assert hub.read_file(repo, "model.safetensors") == soup.read_bytes()
    assert hub.repos[("model", repo)].private is True
    assert api.list_repo_commits(repo)[0].title == "my soup"
    batch = [p for m, p in hub.requests[n:] if p.endswith("/info/lfs/objects/batch")]
    puts = [p for m, p in hub.requests[n:] if m == "PUT"]
    stored = hub.repos[("model", repo)].commits[head].files["model.safetensors"]
    if mode == "lfs":
        assert len(batch) == 1 and len(puts) == 1 and stored.lfs
    else:
        assert batch == [] and puts == [] and not stored.lfs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["member0.safetensors", "member1.safetensors",
                                                          "soup.safetensors"]  # no README written locally


def test_push_update_replaces_stale_weights(hub, tmp_path):
    repo = _name("update")
    sharded = _sharded_folder(tmp_path / "v1", _state(0))
    url1 = push(sharded, repo).url
    assert "pytorch_model.bin" in hub.list_files(repo) and "model.safetensors.index.json" in hub.list_files(repo)
    v2 = tmp_path / "v2"
    v2.mkdir()
    save_file(_state(9), str(v2 / "model.safetensors"), metadata={"format": "pt"})
    (v2 / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 16}))

    result = push(v2, repo)

    assert url1 != result.url
    assert result.deleted == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                              "model.safetensors.index.json", "optimizer.pt", "pytorch_model.bin"]
    assert hub.list_files(repo) == [".gitattributes", "README.md", "config.json", "model.safetensors",
                                    "notes/run.json", "tokenizer.json"]
    assert json.loads(hub.read_file(repo, "config.json"))["hidden_size"] == 16
    got = load_file(str(pull(repo) / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in _state(9).items())
    commits = HfApi(endpoint=hub.url, token=False).list_repo_commits(repo)
    assert len(commits) == 3  # the Hub's initial commit, v1, v2


def _inspect_revision(repo: str, rev: str) -> dict:
    """``papa-merge inspect hf://repo@rev --json``: the revision must open as one checkpoint."""
    r = CliRunner().invoke(cli, ["inspect", f"hf://{repo}@{rev}", "--json"])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_push_to_branch_and_pull_request(hub, tmp_path):
    repo = _name("branches")
    soup, _ = _soup_file(tmp_path)
    push(soup, repo)
    main_head = HfApi(endpoint=hub.url, token=False).model_info(repo).sha
    other = tmp_path / "other.safetensors"
    save_file(_state(7), str(other))

    push(other, repo, revision="dev")  # a new branch from main, which holds soup's model.safetensors
    assert hub.list_files(repo, revision="dev") == [".gitattributes", "README.md", "model.safetensors"]
    assert hub.read_file(repo, "model.safetensors", revision="dev") == other.read_bytes()
    assert hub.read_file(repo, "model.safetensors") == soup.read_bytes()

    pr = push(other, repo, create_pr=True)
    assert pr.url == pr.pr_url == f"{hub.url}/{repo}/discussions/1"
    assert hub.read_file(repo, "model.safetensors", revision="refs/pr/1") == other.read_bytes()
    assert HfApi(endpoint=hub.url, token=False).model_info(repo).sha == main_head  # main untouched
    assert (resolve_reference(f"hf://{repo}@refs/pr/1") / "model.safetensors").read_bytes() == other.read_bytes()


@pytest.mark.parametrize("branch", [None, "v2"], ids=["main", "new-branch"])
def test_push_leaves_each_revision_holding_exactly_one_checkpoint(hub, tmp_path, branch):
    """Issue 13: pushing a second file with another name replaces the first; each revision opens as one checkpoint."""
    repo = _name("exact")
    soup, _ = _soup_file(tmp_path)
    first = push(soup, repo)
    first_head = HfApi(endpoint=hub.url, token=False).model_info(repo).sha
    w = tmp_path / "w.safetensors"
    save_file(_state(7), str(w), metadata={"format": "pt"})
    # A stale file under another name on the target (left by an older tool), and a config that must stay.
    api = HfApi(endpoint=hub.url, token=False)
    api.upload_file(path_or_fileobj=str(soup), path_in_repo="soup.safetensors", repo_id=repo)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo)
    before_main = hub.list_files(repo)

    result = push(w, repo, revision=branch)

    rev = branch or "main"
    assert result.deleted == ["soup.safetensors"]
    assert hub.list_files(repo, revision=rev) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert hub.read_file(repo, "model.safetensors", revision=rev) == w.read_bytes()
    summary = _inspect_revision(repo, rev)
    assert summary["tensors"] == 4 and summary["format"] == "safetensors"
    with open_checkpoint(f"hf://{repo}@{rev}") as ck:
        assert all(torch.equal(ck.read(k), v) for k, v in _state(7).items())
    card = hub.read_file(repo, "README.md", revision=rev).decode()
    assert "The model is `model.safetensors`" in card
    if branch:  # the other revision is unchanged
        assert hub.list_files(repo) == before_main
        assert hub.read_file(repo, "model.safetensors") == soup.read_bytes()
        assert _inspect_revision(repo, first_head)["tensors"] == 4
    assert first.deleted == []


def test_push_keep_existing_and_path_in_repo(hub, tmp_path):
    repo = _name("side")
    soup, _ = _soup_file(tmp_path)
    push(soup, repo)
    w = tmp_path / "w.safetensors"
    save_file(_state(7), str(w))

    result = push(w, repo, keep_existing=True)

    assert result.deleted == [] and result.checkpoint == "w.safetensors"
    assert hub.list_files(repo) == [".gitattributes", "README.md", "model.safetensors", "w.safetensors"]
    card = hub.read_file(repo, "README.md").decode()
    assert "## Checkpoints in this repo" in card
    assert "- `model.safetensors`\n- `w.safetensors`" in card
    assert "The model is `w.safetensors`" in card
    # The repo itself still opens as model.safetensors (what loaders look for); the other is named.
    assert (resolve_reference(f"hf://{repo}") / "model.safetensors").read_bytes() == soup.read_bytes()
    assert resolve_reference(f"hf://{repo}/w.safetensors").read_bytes() == w.read_bytes()

    # path_in_repo names the file; without keep_existing the other weights of that folder go.
    named = push(w, repo, path_in_repo="soups/greedy.safetensors")
    assert named.checkpoint == "soups/greedy.safetensors" and named.deleted == []  # top-level files are elsewhere
    assert hub.read_file(repo, "soups/greedy.safetensors") == w.read_bytes()
    assert push(soup, repo, path_in_repo="soups/uniform.safetensors").deleted == ["soups/greedy.safetensors"]
    for bad, msg in (("../x.safetensors", "not a relative path inside the repo"),
                     ("soup", "end it in a weight suffix")):
        with pytest.raises(InvalidArgumentError, match=msg):
            push(w, repo, path_in_repo=bad)


def test_cli_push_prints_what_it_deleted(hub, tmp_path):
    repo = _name("cli-del")
    soup, _ = _soup_file(tmp_path)
    api = HfApi(endpoint=hub.url, token=False)
    api.create_repo(repo)
    api.upload_file(path_or_fileobj=str(soup), path_in_repo="old.safetensors", repo_id=repo)
    r = CliRunner().invoke(cli, ["push", str(soup), repo])
    assert r.exit_code == 0, r.output
    head = api.model_info(repo).sha
    assert r.stdout.splitlines() == [
        f"deleted from {repo}@main: old.safetensors (not part of the pushed checkpoint; --keep-existing keeps them)",
        f"pushed {soup} as model.safetensors to {repo}: {hub.url}/{repo}/commit/{head}"]
    assert hub.repos[("model", repo)].commits[head].message == "Deleted stale weight files: old.safetensors"
    assert hub.list_files(repo) == [".gitattributes", "README.md", "model.safetensors"]
    r = CliRunner().invoke(cli, ["push", str(tmp_path / "member0.safetensors"), repo, "--keep-existing"])
    assert r.exit_code == 0 and r.stdout.strip().startswith(f"pushed {tmp_path / 'member0.safetensors'} as "
                                                              "member0.safetensors to")
    assert hub.list_files(repo) == [".gitattributes", "README.md", "member0.safetensors", "model.safetensors"]


def test_push_keeps_the_users_readme(hub, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    save_file(_state(0), str(d / "model.safetensors"))
    (d / "README.md").write_text("---\nlicense: mit\n---\nmine\n")
    (d / ".secret").write_text("hidden files are not uploaded")
    repo = _name("readme")
    push(d, repo)
    assert hub.read_file(repo, "README.md") == b"---\nlicense: mit\n---\nmine\n"
    assert ".secret" not in hub.list_files(repo)


def test_push_regenerates_the_card_soup_wrote_but_keeps_an_edited_one(hub, tmp_path):
    members = []
    for i in range(2):
        p = tmp_path / f"m{i}.safetensors"
        save_file(_state(i), str(p))
        members.append(p)
    folder = tmp_path / "soup"
    merge.soup(members, out=folder)
    local = (folder / "README.md").read_text()
    assert "# soup" in local and "load_file('soup/model.safetensors')" in local  # no absolute local path
    repo = _name("card")

    push(folder, repo)

    pushed = hub.read_file(repo, "README.md").decode()
    assert f"# {repo}" in pushed and f"hf_hub_download('{repo}', 'model.safetensors')" in pushed
    assert (folder / "README.md").read_text() == local  # the local folder is never changed
    edited = local.replace("# soup", "# my greedy soup, by hand")
    (folder / "README.md").write_text(edited)
    push(folder, repo)
    assert hub.read_file(repo, "README.md").decode() == edited


# --- the model card ------------------------------------------------------------------------------------------
def test_model_card_of_a_local_soup(tmp_path):
    metrics = {"val": {"acc": 0.9125, "nll": 0.31, "ece": 0.021}, "test": {"acc": 0.9, "nll": 0.35, "ece": 0.03}}
    soup, _ = _soup_file(tmp_path, metrics=metrics)
    with safe_open(str(soup), "pt") as f:
        recipe = json.loads(f.metadata()[RECIPE_KEY])

    text = model_card(soup, repo_id="org/my-soup")
    card = ModelCard(text)

    assert card.data.tags == ["merge", "papa-merge", "model-soup", "safetensors"]
    assert card.data.base_model is None  # local members: no Hub base model
    assert card.data.library_name is None
    assert "# org/my-soup" in text
    assert "This checkpoint is a **weighted** merge of 2 checkpoints, made with papa-merge 0.1.0." in text
    assert "| 0 | `member0.safetensors` | local file | 0.75 |" in text
    assert "| 1 | `member1.safetensors` | local file | 0.25 |" in text
    assert "4 tensors, " in text
    assert "- output dtype: `as input`, accumulated in `float32`" in text
    assert "| split | acc | nll | ece |" in text
    assert "| val | 0.9125 | 0.31 | 0.021 |" in text and "| test | 0.9 | 0.35 | 0.03 |" in text
    assert "The model is `model.safetensors`: 4 tensors" in text  # the name push stores it under
    assert "hf_hub_download('org/my-soup', 'model.safetensors')" in text
    block = text.split("```json\n", 1)[1].split("\n```", 1)[0]
    # the recorded recipe, with each absolute local path shown by its public name (a card is published)
    public = json.loads(json.dumps(recipe))
    for m in public["members"]:
        m["path"] = Path(m["path"]).name
    assert json.loads(block) == public and str(tmp_path) not in text


def test_model_card_of_hub_members_and_transformers_folder(hub, tmp_path):
    a, b = _name("a"), _name("b")
    for i, repo in enumerate((a, b)):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file(_state(i), str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
        push(d, repo)
    out = tmp_path / "soup"
    merge.soup([f"hf://{a}", f"hf://{b}"], out=out)
    assert (out / "config.json").exists()  # carried from the first member's snapshot

    card = ModelCard(model_card(out, repo_id="org/the-soup"))

    assert card.data.base_model == [a, b]
    assert card.data.library_name == "transformers"
    assert card.data.to_dict()["base_model_relation"] == "merge"
    assert "merge" in card.data.tags
    sha_a = HfApi(endpoint=hub.url, token=False).model_info(a).sha
    assert f"| 0 | `hf://{a}@{sha_a}` | Hub" in card.text
    assert "AutoModel.from_pretrained('org/the-soup')" in card.text


def test_model_card_timm_and_name_or_path(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    save_file(_state(0), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"architecture": "resnet10t", "num_classes": 3}))
    card = ModelCard(model_card(d, repo_id="org/t"))
    assert card.data.library_name == "timm" and card.data.base_model is None
    assert "timm.create_model('hf-hub:org/t', pretrained=True)" in card.text
    assert "holds no merge recipe" in card.text
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "_name_or_path": "google/bert-base"}))
    assert ModelCard(model_card(d)).data.base_model == ["google/bert-base"]
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "_name_or_path": "/home/me/run/ckpt"}))
    assert ModelCard(model_card(d)).data.base_model is None


# --- the round trip --------------------------------------------------------------------------------------------
def test_round_trip_pull_soup_push_pull(hub, tmp_path):
    """Push two members, soup them from the Hub, push the soup, pull it back: the same bytes."""
    sds = [_state(10), _state(11)]
    repos = [_name("rt-a"), _name("rt-b")]
    for sd, repo, name in zip(sds, repos, ("a.safetensors", "b.safetensors")):
        p = tmp_path / name
        save_file(sd, str(p))
        push(p, repo)
    local = tmp_path / "soup.safetensors"

    merge.soup([f"hf://{r}" for r in repos], out=local)
    soup_repo = _name("rt-soup")
    push(local, soup_repo)
    back = pull(soup_repo, out=tmp_path / "back")

    assert (back / "model.safetensors").read_bytes() == local.read_bytes()
    assert hashlib.sha256((back / "model.safetensors").read_bytes()).hexdigest() == \
        hashlib.sha256(local.read_bytes()).hexdigest()
    got, ref = load_file(str(back / "model.safetensors")), _f64_mean(sds)
    for k, v in ref.items():
        assert torch.allclose(got[k].double(), v.double(), rtol=0, atol=1e-6) if v.is_floating_point() \
            else torch.equal(got[k], v), k
    card = ModelCard((back / "README.md").read_text())
    assert card.data.base_model == repos
    # and the soup itself merges straight from the Hub again
    again = tmp_path / "again.safetensors"
    merge.soup([f"hf://{soup_repo}", f"hf://{soup_repo}"], out=again)
    assert load_file(str(again)).keys() == got.keys()


# --- the CLI ---------------------------------------------------------------------------------------------------
def test_cli_pull_and_push(hub, tmp_path):
    soup, _ = _soup_file(tmp_path)
    repo = _name("cli")
    runner = CliRunner()
    r = runner.invoke(cli, ["push", str(soup), repo, "--private", "--message", "from the cli"])
    assert r.exit_code == 0, r.output
    head = HfApi(endpoint=hub.url, token=False).model_info(repo).sha
    assert r.stdout.strip() == f"pushed {soup} as model.safetensors to {repo}: {hub.url}/{repo}/commit/{head}"
    assert hub.repos[("model", repo)].private

    out = tmp_path / "pulled"
    r = runner.invoke(cli, ["pull", f"{repo}@main", "--include", "*.safetensors", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"pulled {repo}@main to {out}"
    assert (out / "model.safetensors").read_bytes() == soup.read_bytes()

    r = runner.invoke(cli, ["pull", repo])
    assert r.exit_code == 0 and f"models--{repo.replace('/', '--')}" in r.stdout

    other = tmp_path / "member1.safetensors"
    r = runner.invoke(cli, ["push", str(other), repo, "--create-pr"])
    assert r.exit_code == 0
    assert r.stdout.strip() == f"pushed {other} as model.safetensors to {repo}: {hub.url}/{repo}/discussions/1"
    assert hub.read_file(repo, "model.safetensors", revision="refs/pr/1") == other.read_bytes()
    assert hub.read_file(repo, "model.safetensors") == soup.read_bytes()  # main untouched


def test_cli_help_has_examples():
    for cmd in ("pull", "push"):
        r = CliRunner().invoke(cli, [cmd, "--help"])
        assert r.exit_code == 0 and "Examples:" in r.output and f"papa-merge {cmd} " in r.output
