"""``verify`` on a merge (issue 24, part 5): every tensor's sha256 read back against what the writer sent, and a
model folder's keys against the ones transformers' ``from_pretrained`` expects."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge
import merge.verify
from cli.main import cli
from merge.errors import CheckpointFormatError, MismatchError
from merge.verify import expected_model_keys, tensor_digests, verify_output
from tests.ckpt_factory import save_members

pytestmark = pytest.mark.filterwarnings("ignore:the members come from")  # random test members share no start
transformers = pytest.importorskip("transformers")


def _flip_a_byte_of(path: Path, tensor: str) -> None:
    """Change one byte inside ``tensor``'s data in a safetensors file (the header says where it lies)."""
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
    assert tensor in names
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin = 8 + n + json.loads(raw[8:8 + n])[tensor]["data_offsets"][0]
    data = bytearray(raw)
    data[begin] ^= 0x01
    path.write_bytes(bytes(data))


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("out_name", ["soup.safetensors", "soup.pt", "soup_folder"])
def test_verify_checks_every_tensor_of_each_output_kind(tmp_path: Path, out_name: str) -> None:
    paths, _ = save_members(tmp_path, 2)
    res = merge.soup(paths, out=tmp_path / out_name, verify=True, shard_size="2KB")
    assert res.verified == {"tensors": 9, "checksums": "sha256"}


def test_digests_are_the_sha256_of_the_tensors_as_written(tmp_path: Path) -> None:
    paths, _ = save_members(tmp_path, 2)
    out = tmp_path / "s.safetensors"
    merge.soup(paths, out=out)
    got = load_file(str(out))
    assert tensor_digests(out) == {k: _sha(v) for k, v in got.items()}


def test_a_corrupted_byte_is_caught_naming_the_tensor(tmp_path: Path) -> None:
    paths, _ = save_members(tmp_path, 2)
    out = tmp_path / "s.safetensors"
    merge.soup(paths, out=out)
    written = tensor_digests(out)
    bad = tmp_path / "copy.safetensors"
    shutil.copy(out, bad)
    _flip_a_byte_of(bad, "classifier.weight")
    with pytest.raises(CheckpointFormatError) as e:
        verify_output(bad, written)
    assert e.value.tensor == "classifier.weight" and "'classifier.weight'" in str(e.value)
    assert "\n" not in str(e.value)
    verify_output(out, written)  # the untouched output passes


def test_soup_verify_catches_storage_that_changes_a_byte_after_publishing(tmp_path: Path, monkeypatch) -> None:
    paths, _ = save_members(tmp_path, 2)
    out = tmp_path / "s.safetensors"
    real = merge.verify.verify_output

    def corrupt_then_check(path, digests, **kw):  # the disk changes a byte between the rename and the check
        _flip_a_byte_of(Path(path), "features.0.weight")
        return real(path, digests, **kw)

    monkeypatch.setattr(merge.verify, "verify_output", corrupt_then_check)
    with pytest.raises(CheckpointFormatError, match="features.0.weight"):
        merge.soup(paths, out=out, verify=True)
    res = CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(tmp_path / "t.safetensors"), "--verify"])
    errors = [ln for ln in res.stderr.splitlines() if not ln.startswith("warning: ")]
    assert res.exit_code == 1 and len(errors) == 1 and errors[0].startswith("error: ")
    assert "'features.0.weight' reads back with sha256" in errors[0]


def _tiny_gpt2(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_a_model_folder_is_checked_against_transformers_keys(tmp_path: Path) -> None:
    a, b = _tiny_gpt2(tmp_path / "a", 0), _tiny_gpt2(tmp_path / "b", 1)
    res = merge.soup([a, b], out=tmp_path / "soup", verify=True)
    assert res.verified["architecture"] == "GPT2LMHeadModel" and res.verified["keys"] == "match"
    arch, keys, tied = expected_model_keys(tmp_path / "soup")
    assert "lm_head.weight" in tied  # tied to the embeddings: transformers does not save it
    # A folder whose tensors are not the architecture's keys is refused by name.
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "soup", broken)
    sd = load_file(str(broken / "model.safetensors"))
    sd["transformer.h.0.extra.weight"] = torch.zeros(2)
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MismatchError) as e:
        verify_output(broken, None)
    assert "unexpected 1 (e.g. transformer.h.0.extra.weight)" in str(e.value) and "GPT2LMHeadModel" in str(e.value)


def test_cli_soup_and_run_print_what_was_verified(tmp_path: Path) -> None:
    paths, _ = save_members(tmp_path, 2)
    res = CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(tmp_path / "s.safetensors"), "--verify",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-1] == "verified: 9 tensors read back with the sha256 written"
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {paths[0]}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {paths[1]}\n    parameters: {{weight: 1.0}}\ndtype: float32\n")
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "r.safetensors"), "--verify"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-1] == "verified: 9 tensors read back with the sha256 written"


def test_a_split_merge_is_reread_without_checksums(tmp_path: Path) -> None:
    paths, _ = save_members(tmp_path, 2)
    res = merge.soup(paths, out=tmp_path / "split.safetensors", jobs=2, verify=True)
    assert res.verified == {"tensors": 9, "checksums": None}
    assert CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(tmp_path / "s2.safetensors"), "--jobs", "2",
                                    "--verify"]).stdout.splitlines()[-1] == \
        "verified: 9 tensors read back (a split merge records no checksums)"
