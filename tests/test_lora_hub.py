"""LoRA adapters on the Hub: ``base+hf://org/adapter[@rev]`` as a soup member and ``model: A+org/adapter`` /
``{model: A, lora: B}`` in recipes, fetched (adapter_config.json and adapter_model.safetensors only) through
merge.hub from the local Hub server of tests/hubserver.py, and applied per tensor against a float64 reference."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge
from cli.main import cli
from merge.errors import CheckpointNotFoundError, HubError
from merge.hub import resolve_adapter
from merge.keys import RECIPE_KEY
from merge.mergekit_recipe import load_recipe, run_recipe

TARGETS = ("q_proj", "v_proj")
pytestmark = pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning")  # as tests/test_hub.py


def _base(folder: Path) -> Path:
    """A two-layer Llama-named model folder (config.json, model.safetensors), written by hand."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g), "model.norm.weight": torch.ones(8)}
    for i in range(2):
        for part in ("q_proj", "k_proj", "v_proj"):
            sd[f"model.layers.{i}.self_attn.{part}.weight"] = torch.randn(8, 8, generator=g)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return folder


def _adapter(folder: Path, base: Path, *, seed: int, r: int = 2, alpha: float = 6) -> Path:
    """A PEFT LoRA folder for ``base`` (random non-zero A and B) beside files an adapter repo also holds."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in load_file(str(base / "model.safetensors")).items():
        if any(f".{t}." in name for t in TARGETS):
            stem = "base_model.model." + name[:-len(".weight")]
            tensors[f"{stem}.lora_A.weight"] = 0.1 * torch.randn(r, w.shape[1], generator=g)
            tensors[f"{stem}.lora_B.weight"] = 0.1 * torch.randn(w.shape[0], r, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                            "target_modules": list(TARGETS)}))
    (folder / "README.md").write_text("a LoRA\n")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "training_args.bin").write_bytes(b"\0" * 64)
    return folder


def _expected(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """``W + alpha / r * B @ A`` in float64 for every targeted weight; the rest as it is."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for name, w in load_file(str(base / "model.safetensors")).items():
        stem = "base_model.model." + name[:-len(".weight")]
        w = w.double()
        if f"{stem}.lora_A.weight" in factors:
            a, b = factors[f"{stem}.lora_A.weight"].double(), factors[f"{stem}.lora_B.weight"].double()
            w = w + cfg["lora_alpha"] / cfg["r"] * (b @ a)
        out[name] = w
    return out


def _upload(server, folder: Path, repo: str) -> str:
    api = HfApi(endpoint=server.url, token=False)
    api.create_repo(repo, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo).oid


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, x in got.items():
        torch.testing.assert_close(x.double(), want[name], rtol=0, atol=1e-6, msg=name)


@pytest.fixture()
def published(hub, tmp_path):
    """A local base and an adapter repo with two commits: ``(base, repo, first sha, first folder, main folder)``."""
    base = _base(tmp_path / "base")
    repo = f"org/lora-{uuid.uuid4().hex[:8]}"
    first = _adapter(tmp_path / "v1", base, seed=1)
    sha1 = _upload(hub, first, repo)
    second = _adapter(tmp_path / "v2", base, seed=2)
    _upload(hub, second, repo)
    return base, repo, sha1, first, second


def test_soup_member_with_a_hub_adapter_fetches_two_files_and_applies_it(hub, published, tmp_path) -> None:
    base, repo, _, _, main = published
    before, served = len(hub.downloads()), hub.file_bytes_served()
    out = tmp_path / "out.safetensors"
    res = CliRunner().invoke(cli, ["soup", f"{base}+hf://{repo}", "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    _close(load_file(str(out)), _expected(base, main))
    # the two adapter files and nothing else (README, tokenizer, training args stay on the Hub): by name for the
    # regular files, by bytes for the LFS ones (served from another address)
    assert {d.rsplit("/", 1)[-1] for d in hub.downloads()[before:]} <= {"adapter_config.json",
                                                                         "adapter_model.safetensors"}
    sizes = sum((main / n).stat().st_size for n in ("adapter_config.json", "adapter_model.safetensors"))
    assert hub.file_bytes_served() - served == sizes
    # the same bits as the adapter's local folder, and the recipe names the adapter by its Hub commit
    local = tmp_path / "local.safetensors"
    merge.soup([f"{base}+{main}"], out=local)
    ours, theirs = load_file(str(out)), load_file(str(local))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with safe_open(str(out), "pt") as f:
        member = json.loads(f.metadata()[RECIPE_KEY])["members"][0]
    sha = HfApi(endpoint=hub.url, token=False).model_info(repo).sha
    assert member["format"] == "lora" and member["adapter"] == f"hf://{repo}@{sha}"


def test_a_revision_picks_that_commits_adapter(hub, published, tmp_path) -> None:
    base, repo, sha1, first, _ = published
    out = tmp_path / "v1.safetensors"
    merge.soup([f"{base}+hf://{repo}@{sha1}"], out=out)
    _close(load_file(str(out)), _expected(base, first))


def test_recipe_adapters_on_the_hub_as_mergekit_writes_them(hub, published, tmp_path) -> None:
    base, repo, sha1, first, main = published
    text = (f"merge_method: linear\nparameters: {{normalize: false}}\ndtype: float32\nmodels:\n"
            f"  - model: {base}+{repo}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {{model: {base}, lora: {{path: {repo}, revision: {sha1}}}}}\n    parameters: {{weight: 0.5}}\n")
    recipe = load_recipe(text=text)
    assert recipe.members == [f"{base}+hf://{repo}", f"{base}+hf://{repo}@{sha1}"]
    out = tmp_path / "r.safetensors"
    run_recipe(recipe, out=out)
    a, b = _expected(base, main), _expected(base, first)
    _close(load_file(str(out)), {k: 0.5 * a[k] + 0.5 * b[k] for k in a})


def test_hub_base_and_hub_adapter_with_two_jobs(hub, published, tmp_path) -> None:
    base, repo, _, _, main = published
    base_repo = f"org/base-{uuid.uuid4().hex[:8]}"
    _upload(hub, base, base_repo)
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    members = [f"hf://{base_repo}+hf://{repo}", str(base)]
    merge.soup(members, out=one)
    merge.soup(members, out=two, jobs=2)  # each worker reopens base+adapter from the cache
    plain = {k: v.double() for k, v in load_file(str(base / "model.safetensors")).items()}
    adapted = _expected(base, main)
    _close(load_file(str(one)), {k: (adapted[k] + plain[k]) / 2 for k in plain})
    x, y = load_file(str(one)), load_file(str(two))
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_offline_uses_the_cached_adapter(hub, published, monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants

    _, repo, _, _, _ = published
    online = resolve_adapter(f"hf://{repo}")
    assert sorted(p.name for p in online.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    n = len(hub.requests)
    assert resolve_adapter(f"hf://{repo}") == online and len(hub.requests) == n
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and this adapter is not in the local cache"):
        resolve_adapter("hf://org/never-fetched")


def test_a_pickled_hub_adapter_is_refused_by_name(hub, tmp_path) -> None:
    base = _base(tmp_path / "base")
    folder = _adapter(tmp_path / "ad", base, seed=3)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    repo = f"org/pickled-{uuid.uuid4().hex[:8]}"
    _upload(hub, folder, repo)
    with pytest.raises(CheckpointNotFoundError, match=r"no adapter_model.safetensors in .* \(it holds "
                                                      r"adapter_model.bin, a pickle, which is never fetched"):
        resolve_adapter(f"hf://{repo}")
    res = CliRunner().invoke(cli, ["soup", f"{base}+hf://{repo}", "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 1 and "adapter_model.bin, a pickle" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o.safetensors").exists()


def test_a_missing_adapter_repo_and_a_bad_reference(hub, tmp_path) -> None:
    base = _base(tmp_path / "base")
    res = CliRunner().invoke(cli, ["soup", f"{base}+hf://org/no-such-lora", "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 1 and "hf://org/no-such-lora: repository not found" in res.output
    with pytest.raises(CheckpointNotFoundError, match=r"LoRA adapter './gone' is neither a local folder nor a Hub "
                                                      r"repository \(org/name\[@revision\]\)"):
        load_recipe(text=f"merge_method: linear\nmodels:\n  - model: {base}+./gone\n")
