"""Model cards (merge/card.py): loading snippets that run, no local paths, the whole recipe in the table.

Issue 25 item 14 (a sharded folder's card showed a ``load_file`` line that fails; cards embedded the absolute
output path) and issue 26 items 3 (no absolute local path in a published card or recipe) and 6 (the member
table shows the base, the parameters, and folders as folders).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import merge
from merge.card import model_card
from merge.hub import push
from merge.keys import RECIPE_KEY

pytestmark = [pytest.mark.filterwarnings("ignore:the members come from")]


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(8, 4, generator=g), "b.weight": torch.randn(8, 4, generator=g),
            "c.bias": torch.randn(8, generator=g)}


def _files(tmp_path: Path, n: int = 2) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp_path / f"m{i}.safetensors"
        save_file(_state(i), str(p))
        paths.append(p)
    return paths


def _python_block(card: str) -> str:
    usage = card.split("## Usage", 1)[1]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


class _Model:
    def load_state_dict(self, sd):
        self.sd = sd


def _run_snippet(card: str) -> dict[str, torch.Tensor]:
    model = _Model()
    exec(compile(_python_block(card), "<card>", "exec"), {"model": model})
    return model.sd


def _recipe(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()[RECIPE_KEY])


# --- the loading snippet runs ------------------------------------------------------------------------------
def test_a_sharded_folders_card_loads_every_shard(tmp_path, monkeypatch):
    members = _files(tmp_path)
    out = tmp_path / "soup"
    merge.soup(members, out=out, shard_size=200)  # several shards
    assert (out / "model.safetensors.index.json").is_file()
    card = (out / "README.md").read_text()
    assert "load_file(" in card and "model.safetensors.index.json" in card
    monkeypatch.chdir(tmp_path)
    sd = _run_snippet(card)
    expected = {k: (_state(0)[k] + _state(1)[k]) / 2 for k in _state(0)}
    assert sd.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(sd[k], expected[k])


def test_a_pickle_files_card_uses_torch_load(tmp_path, monkeypatch):
    sd = _state(0)
    path = tmp_path / "averaged.pth"
    torch.save(sd, path)
    card = model_card(path)
    assert "load_file" not in card and "weights_only=True" in card
    monkeypatch.chdir(tmp_path)
    got = _run_snippet(card)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_a_repo_cards_sharded_snippet_downloads_the_snapshot(tmp_path):
    out = tmp_path / "soup"
    merge.soup(_files(tmp_path), out=out, shard_size=200)
    code = _python_block(model_card(out, repo_id="org/soup"))
    assert "folder = Path(snapshot_download('org/soup'))" in code and str(tmp_path) not in code
    compile(code, "<card>", "exec")


# --- no absolute local path ---------------------------------------------------------------------------------
def _no_local_path(text: str, *roots: Path) -> None:
    for root in roots:
        assert str(root) not in text, f"{root} in:\n{text}"
    assert os.path.expanduser("~") not in text or os.path.expanduser("~") in ("/", "")


def test_card_of_a_folder_output_has_no_absolute_path(tmp_path):
    out = tmp_path / "deep" / "soup"
    merge.soup(_files(tmp_path), out=out)  # absolute members and output
    card = (out / "README.md").read_text()
    _no_local_path(card, tmp_path)
    assert "Or merge it further: `papa-merge soup soup ..." in card
    pushed = model_card(out, repo_id="org/soup")
    _no_local_path(pushed, tmp_path)
    assert "| 0 | `m0.safetensors` | local file |" in card


# huggingface_hub's LFS upload (the set-up's upload_file) passes data= to httpx, which deprecates it: not ours.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
def test_hub_members_are_recorded_by_reference(hub, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=False)
    refs = []
    for i, p in enumerate(_files(tmp_path)):
        repo = f"org/card-member-{i}-{os.getpid()}-{tmp_path.name[-6:]}"
        api.create_repo(repo, exist_ok=True)
        sha = api.upload_file(path_or_fileobj=str(p), path_in_repo="model.safetensors", repo_id=repo).oid
        refs.append((repo, sha))
    out = tmp_path / "soup"
    merge.soup([f"hf://{r}" for r, _ in refs], out=out)
    recipe = _recipe(out / "model.safetensors")
    assert [m["path"] for m in recipe["members"]] == [f"hf://{r}@{sha}" for r, sha in refs]
    assert [m["source"] for m in recipe["members"]] == [f"hf://{r}@{sha}" for r, sha in refs]
    cache = Path(os.environ.get("HF_HOME", "/nonexistent"))
    card = (out / "README.md").read_text()
    for text in (card, json.dumps(recipe), model_card(out, repo_id="org/soup")):
        _no_local_path(text, tmp_path, cache)
        assert "snapshots" not in text
    assert f"| 0 | `hf://{refs[0][0]}@{refs[0][1]}` | Hub |" in card
    result = push(out, "org/card-soup-" + tmp_path.name[-6:])
    _no_local_path(hub.read_file("org/card-soup-" + tmp_path.name[-6:], "README.md").decode(), tmp_path, cache)
    assert "README.md" in result.uploaded


# --- the member table: base, parameters, folders --------------------------------------------------------------
def test_member_table_shows_base_parameters_and_folders(tmp_path):
    folders = []
    for name, seed in (("base", 0), ("ft-a", 1), ("ft-b", 2)):
        d = tmp_path / name
        d.mkdir()
        save_file(_state(seed), str(d / "model.safetensors"))
        folders.append(d)
    out = tmp_path / "ties"
    merge.soup(folders[1:], out=out, method="ties", base=folders[0], params={"density": 0.5})
    card = (out / "README.md").read_text()
    assert "| 0 | `ft-a` | local folder |" in card and "| 1 | `ft-b` | local folder |" in card
    assert "| base | `base` | local folder | (base) |" in card
    assert "- method: `ties`" in card
    params = re.search(r"- parameters: (.*)", card).group(1)
    assert "`density=0.5`" in params
    assert "local file" not in card
