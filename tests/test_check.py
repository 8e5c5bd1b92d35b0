"""``papa-merge check`` (issue 24, part 4): members checked from their headers before any download.

Against the local Hub server (tests/hubserver.py), which counts the bytes of file content it serves: the check
fetches the configs, the shard index and the safetensors headers, never a tensor byte; an incompatible set is
refused in one line naming the tensor; the sizes it reports are the files'; ``soup`` runs the check first.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi
from safetensors.torch import save_file

import merge
from cli.main import cli
from merge.check import check_members
from merge.errors import MismatchError

pytestmark = [pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:the members come from")]  # random test members share no start


def _state(seed: int, rows: int = 64, vocab: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(vocab, 8, generator=g), "layer.weight": torch.randn(rows, 8, generator=g),
            "layer.bias": torch.randn(rows, generator=g), "steps": torch.tensor(7, dtype=torch.int64)}


def _folder(root: Path, sd: dict[str, torch.Tensor], *, shards: bool = False, arch: str = "TinyForCausalLM",
            vocab: int = 32) -> Path:
    folder = root / uuid.uuid4().hex[:8]
    folder.mkdir(parents=True)
    if shards:
        names = list(sd)
        parts = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
        for shard, keys in parts.items():
            save_file({k: sd[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map = {k: s for s, keys in parts.items() for k in keys}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "tiny",
                                                    "vocab_size": vocab}))
    return folder


def _upload(server, folder: Path) -> str:
    repo_id = f"org/c-{uuid.uuid4().hex[:8]}"
    api = HfApi(endpoint=server.url, token=False)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    return f"hf://{repo_id}"


def _header_bytes(path: Path) -> int:
    """8 bytes of length plus the JSON header: what a header read transfers."""
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


def test_check_fetches_only_configs_index_and_headers(hub, tmp_path: Path) -> None:
    a, b = _folder(tmp_path, _state(0), shards=True), _folder(tmp_path, _state(1), shards=True)
    refs = [_upload(hub, a), _upload(hub, b)]
    hub.served.clear()
    report = check_members(refs)
    small = sum((f / n).stat().st_size for f in (a, b) for n in ("config.json", "model.safetensors.index.json"))
    headers = sum(_header_bytes(p) for f in (a, b) for p in f.glob("*.safetensors"))
    assert hub.file_bytes_served() == small + headers == report.fetched_bytes
    weights = sum(p.stat().st_size for f in (a, b) for p in f.glob("*.safetensors"))
    assert hub.file_bytes_served() < weights / 2  # far from a download
    # The sizes it reports are the files'.
    files = sum(p.stat().st_size for f in (a, b) for p in f.iterdir() if p.name != ".gitattributes")
    assert report.download_bytes == files
    assert report.members[0].files["model-00001-of-00002.safetensors"] == \
        (a / "model-00001-of-00002.safetensors").stat().st_size
    # The merge's own figures: the plan of the soup from the downloaded files is the same.
    plan = merge.plan_soup([a, b])
    assert (report.read_bytes, report.out_bytes, report.peak_memory_bytes) == \
        (plan.read_bytes, plan.out_bytes, plan.buffer_bytes)
    assert report.members[0].architecture == "TinyForCausalLM" and report.members[0].vocab_size == 32
    assert report.disk_bytes == files + plan.out_bytes and report.seconds_estimate > 0
    assert "estimate" in report.estimate_basis


def test_check_refuses_another_shape_in_one_line_naming_the_tensor(hub, tmp_path: Path) -> None:
    a = _upload(hub, _folder(tmp_path, _state(0)))
    b = _upload(hub, _folder(tmp_path, _state(1, rows=48)))
    hub.served.clear()
    with pytest.raises(MismatchError) as e:
        check_members([a, b])
    msg = str(e.value)
    assert "\n" not in msg and e.value.tensor == "layer.bias"
    assert f"tensor 'layer.bias' differs: {a} [64] float32; {b} [48] float32 (2 tensors disagree)" in msg
    res = CliRunner().invoke(cli, ["check", a, b])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "'layer.bias'" in res.stderr
    assert "pass --on-mismatch skip|first" in res.stderr


def test_check_refuses_another_vocabulary_or_architecture(hub, tmp_path: Path) -> None:
    a = _upload(hub, _folder(tmp_path, _state(0)))
    b = _upload(hub, _folder(tmp_path, _state(1, vocab=40), vocab=40))
    with pytest.raises(MismatchError, match=r"vocab size 40 but .* has 32; these members cannot be merged"):
        check_members([a, b])
    c = _upload(hub, _folder(tmp_path, _state(2), arch="OtherForCausalLM"))
    with pytest.raises(MismatchError, match="architecture OtherForCausalLM but"):
        check_members([a, c])


def test_soup_of_hub_members_refuses_before_downloading_weights(hub, tmp_path: Path) -> None:
    a = _upload(hub, _folder(tmp_path, _state(0)))
    b = _upload(hub, _folder(tmp_path, _state(1, rows=48)))
    hub.served.clear()
    res = CliRunner().invoke(cli, ["soup", a, b, "-o", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 1 and "'layer.bias' differs" in res.stderr
    assert all(not p.endswith(".safetensors") or n < 1024 for p, n in hub.served)  # headers only
    assert not (tmp_path / "s.safetensors").exists()


def test_soup_of_compatible_hub_members_checks_then_merges(hub, tmp_path: Path) -> None:
    a = _upload(hub, _folder(tmp_path, _state(0)))
    b = _upload(hub, _folder(tmp_path, _state(1)))
    res = merge.soup([a, b], out=tmp_path / "s.safetensors", verify=True)
    assert res.tensors == 4 and res.verified["checksums"] == "sha256"


def test_cli_check_prints_the_figures(hub, tmp_path: Path) -> None:
    a = _upload(hub, _folder(tmp_path, _state(0)))
    base = _upload(hub, _folder(tmp_path, _state(5)))
    res = CliRunner().invoke(cli, ["check", a, a, "--method", "ties", "--base", base, "--density", "0.5"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "compatible:     yes, with ties (4 tensors, 3 merged)" in out
    assert f"member {a}: 4 tensors" in out and "TinyForCausalLM, vocabulary 32" in out
    assert re.search(r"time:           (under 1 s|about \d+ (s|min)) \(estimate: downloads at 125 MB/s", out), out
