"""Merged outputs load where users load models: transformers' AutoModel and timm, weights = float64 average."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge
from merge.hub import pull, push

pytestmark = [pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::merge.errors.DifferentStartsWarning")]  # members from two seeds

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


def _f64_average(sds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The reference: float64 mean of floating tensors cast back once; integer buffers from member 0."""
    out = {}
    for k, v in sds[0].items():
        if v.is_floating_point():
            out[k] = (sum(sd[k].to(torch.float64) for sd in sds) / len(sds)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def _tiny_bert_config():
    return transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32, type_vocab_size=2)


@pytest.fixture()
def bert_members(tmp_path):
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = transformers.BertModel(_tiny_bert_config())
        d = tmp_path / f"bert{seed}"
        model.save_pretrained(d)
        dirs.append(d)
    return dirs


def test_transformers_soup_loads_with_auto_model(bert_members, tmp_path):
    members = [load_file(str(d / "model.safetensors")) for d in bert_members]
    assert not torch.equal(members[0]["embeddings.word_embeddings.weight"],
                           members[1]["embeddings.word_embeddings.weight"])  # different random inits
    out = tmp_path / "soup"

    merge.soup(bert_members, out=out)
    model = transformers.AutoModel.from_pretrained(out)

    assert type(model).__name__ == "BertModel"
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 16
    ref = _f64_average(members)
    state = model.state_dict()
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    model.eval()
    with torch.no_grad():  # and it runs
        hidden = model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    assert hidden.shape == (1, 3, 16) and torch.isfinite(hidden).all()


def test_transformers_soup_from_the_hub_loads(hub, bert_members, tmp_path):
    """Members pushed as model folders, soup of hf:// references, pushed and pulled back: AutoModel loads it."""
    repos = []
    for i, d in enumerate(bert_members):
        repo = f"org/bert-member-{i}-{tmp_path.name[-12:]}"
        push(d, repo)
        repos.append(repo)
    out = tmp_path / "soup"
    merge.soup([f"hf://{r}" for r in repos], out=out)
    push(out, f"{repos[0]}-soup")

    pulled = pull(f"{repos[0]}-soup", out=tmp_path / "pulled")
    model = transformers.AutoModel.from_pretrained(pulled)

    ref = _f64_average([load_file(str(d / "model.safetensors")) for d in bert_members])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ref.items())
    from huggingface_hub import ModelCard

    card = ModelCard((pulled / "README.md").read_text())  # the YAML is written by ModelCardData, so read it back
    assert card.data.library_name == "transformers" and card.data.base_model == repos


@pytest.fixture()
def timm_members(tmp_path):
    paths, sds = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = timm.create_model("test_resnet", num_classes=3)
        with torch.no_grad():  # BatchNorm statistics as after training, so they differ between members
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 1.5)
                    m.num_batches_tracked.fill_(10 + seed)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        p = tmp_path / f"timm{seed}.safetensors"
        save_file(sd, str(p))
        paths.append(p)
        sds.append(sd)
    return paths, sds


def test_timm_soup_loads_with_pretrained_cfg_overlay(timm_members, tmp_path):
    paths, sds = timm_members
    out = tmp_path / "soup.safetensors"
    merge.soup(paths, out=out)
    ref = _f64_average(sds)

    # num_classes in the overlay too: timm drops the classifier when it differs from the pretrained config's.
    model = timm.create_model("test_resnet", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(out), num_classes=3))

    state = model.state_dict()
    assert set(state) == set(ref)
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    assert int(state["bn1.num_batches_tracked"]) == 10  # integer buffers copied from member 0, not averaged


def test_timm_soup_loads_with_load_state_dict(timm_members, tmp_path):
    paths, sds = timm_members
    out = tmp_path / "soup.safetensors"
    merge.soup(paths, out=out, accumulate="float64")
    model = timm.create_model("test_resnet", num_classes=3)

    result = model.load_state_dict(load_file(str(out)), strict=True)

    assert not result.missing_keys and not result.unexpected_keys
    ref = _f64_average(sds)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ref.items())
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
