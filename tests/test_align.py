"""merge.align: permutation specs traced from the model, weight and activation matching (Git Re-Basin)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from merge.align import (activation_matching, align, apply_permutation, linear_assignment, permutation_spec,
                         random_permutation, weight_matching)
from merge.errors import InvalidArgumentError, MismatchError
from merge.models import SmallCNN


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm with non-trivial statistics and affine weights, so a wrongly permuted buffer shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_bn(SmallCNN(5, in_chans=1, width=4), seed)


def tiny_resnet(seed: int = 0) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(seed)
    return randomise_bn(ResNet(BasicBlock, (2, 1, 1, 1), num_classes=4, channels=(4, 6, 8, 8)), seed)


def vgg_like(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU-pool stacks, then a Flatten of a 2x2 map into a two-layer classifier (VGG's shape)."""
    torch.manual_seed(seed)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return randomise_bn(nn.Sequential(*block(3, 6), *block(6, 8), nn.Flatten(), nn.Linear(8 * 2 * 2, 10), nn.ReLU(),
                                      nn.Dropout(), nn.Linear(10, 4)), seed)


def tiny_bottleneck_resnet(seed: int = 0) -> nn.Module:
    from timm.models.resnet import Bottleneck, ResNet

    torch.manual_seed(seed)
    return randomise_bn(ResNet(Bottleneck, (1, 1, 1, 1), num_classes=4, channels=(4, 4, 8, 8), stem_width=8,
                               stem_type="deep"), seed)


CASES = {
    "mlp": (mlp, (32, 1, 4, 4)),
    "small_cnn": (small_cnn, (8, 1, 12, 12)),
    "vgg_like": (vgg_like, (8, 3, 8, 8)),
    "timm_resnet": (tiny_resnet, (4, 3, 32, 32)),
    "timm_bottleneck_resnet": (tiny_bottleneck_resnet, (2, 3, 32, 32)),
}


def outputs(model: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_randomly_permuted_network_computes_the_same_function(case):
    build, shape = CASES[case]
    model, x = build(), torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    spec = permutation_spec(model, x)
    assert spec.sizes and not spec.fixed
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    perm = random_permutation(spec, seed=3)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
    permuted = apply_permutation(spec, perm, sd)
    assert any(not torch.equal(permuted[k], sd[k]) for k in sd)
    torch.testing.assert_close(outputs(model, permuted, x), outputs(model, sd, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_weight_matching_recovers_a_known_permutation_exactly(case):
    build, shape = CASES[case]
    model, x = build(), torch.randn(*shape)
    spec = permutation_spec(model, x)
    sd = model.state_dict()
    permuted = apply_permutation(spec, random_permutation(spec, seed=7), sd)
    result = align(model, [sd, permuted], method="weight", spec=spec)
    for k in sd:
        assert torch.equal(result.state_dicts[1][k], sd[k]), k
    assert result.record()["units_moved"][0] == 0 and result.record()["units_moved"][1] > 0


@pytest.mark.parametrize("case", ["mlp", "small_cnn"])
def test_activation_matching_recovers_a_known_permutation_exactly(case):
    """BatchNorm left at its initial statistics: a unit that is always zero (dead) has no correlation to match."""
    _, shape = CASES[case]
    model = mlp() if case == "mlp" else SmallCNN(5, in_chans=1, width=4)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(*shape, generator=g) for _ in range(4)]
    sd = model.state_dict()
    permuted = apply_permutation(permutation_spec(model, batches[0]), random_permutation(
        permutation_spec(model, batches[0]), seed=5), sd)
    result = align(model, [sd, permuted], method="activation", batches=batches)
    for k in sd:
        assert torch.equal(result.state_dicts[1][k], sd[k]), k
    # the model's own weights are left as they were
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_the_assignment_step_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        cost = torch.randn(5, 5, generator=g, dtype=torch.float64)
        best = max(itertools.permutations(range(5)), key=lambda p: sum(cost[i, p[i]].item() for i in range(5)))
        assert linear_assignment(cost).tolist() == list(best)


def test_weight_matching_of_one_hidden_layer_is_the_brute_force_optimum():
    """With one permutation the coordinate descent is one assignment: the best of all 5! permutations."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    spec = permutation_spec(net, torch.zeros(1, 3))
    a = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    b = {k: torch.randn_like(v) for k, v in net.state_dict().items()}

    def score(p):
        p = torch.tensor(p)
        return float((a["0.weight"].double() * b["0.weight"].double()[p]).sum()
                     + (a["0.bias"].double() * b["0.bias"].double()[p]).sum()
                     + (a["2.weight"].double() * b["2.weight"].double()[:, p]).sum())

    best = max(itertools.permutations(range(5)), key=score)
    assert weight_matching(spec, a, b)["0"].tolist() == list(best)


def test_residual_streams_share_one_permutation():
    model = tiny_resnet()
    axes = permutation_spec(model, torch.zeros(2, 3, 32, 32)).axes_to_perm
    spec = permutation_spec(model, torch.zeros(2, 3, 32, 32))
    stem, stream = axes["conv1.weight"][0][0], axes["layer1.0.conv2.weight"][0][0]
    assert axes["bn1.running_var"][0][0] == stem != stream
    # a block with a downsampling shortcut: the shortcut writes the stream its second convolution writes
    assert axes["layer1.0.downsample.0.weight"][:2] == ((stream, 1), (stem, 1))
    assert axes["layer1.0.downsample.1.running_mean"][0][0] == stream
    # a block with an identity shortcut writes the same stream again, and the next stage reads it
    assert axes["layer1.1.conv2.weight"][0][0] == stream and axes["layer1.1.bn2.bias"][0][0] == stream
    assert axes["layer1.1.conv1.weight"][1][0] == stream and axes["layer2.0.conv1.weight"][1][0] == stream
    # inner units of a block are a permutation of their own; the head's outputs are not permuted
    inner = axes["layer1.1.conv1.weight"][0][0]
    assert inner not in (stem, stream) and axes["layer1.1.conv2.weight"][1][0] == inner
    assert axes["fc.weight"] == (None, (axes["layer4.0.conv2.weight"][0][0], 1))
    assert len(spec.sizes) == 1 + 4 + 5  # the stem, one stream per stage, one inner permutation per block


def test_a_flatten_before_a_linear_moves_whole_blocks_of_features():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 2))
    spec = permutation_spec(net, torch.zeros(1, 1, 4, 4))
    assert spec.axes_to_perm["3.weight"] == (None, ("0", 4))
    sd = apply_permutation(spec, {"0": torch.tensor([2, 0, 1])}, net.state_dict())
    assert torch.equal(sd["3.weight"][:, :4], net[3].weight.detach()[:, 8:12])
    x = torch.randn(5, 1, 4, 4)
    torch.testing.assert_close(outputs(net, sd, x), outputs(net, dict(net.state_dict()), x), atol=1e-6, rtol=0)


class Reshaping(nn.Module):
    """A hidden layer whose units reach a reshape the tracer does not know: they must stay in place."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = self.b(h).view(-1, 2, 3).transpose(1, 2).reshape(-1, 6)
        return self.c(h)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_units_it_cannot_tie_soundly_are_left_in_place_and_reported():
    net = Reshaping()
    spec = permutation_spec(net, torch.zeros(3, 4))
    assert list(spec.sizes) == ["a"]
    assert list(spec.fixed) == ["b"] and "view" in spec.fixed["b"]
    assert spec.axes_to_perm["b.weight"] == (None, ("a", 1)) and spec.axes_to_perm["c.weight"] == (None, None)
    assert any(line.startswith("left in place b:") for line in spec.describe())
    tied = permutation_spec(Tied(), torch.zeros(3, 4))
    assert not tied.sizes and "shared" in tied.fixed["a"]


def test_align_refuses_bad_input():
    net = mlp()
    sd = net.state_dict()
    with pytest.raises(InvalidArgumentError, match="unknown alignment method 'cosine'; choose one of weight, act"):
        align(net, [sd, sd], method="cosine", example_input=torch.zeros(1, 16))
    with pytest.raises(InvalidArgumentError, match="member index from 0 to 1, got 2"):
        align(net, [sd, sd], reference=2, example_input=torch.zeros(1, 16))
    with pytest.raises(InvalidArgumentError, match="activation matching needs batches"):
        align(net, [sd, sd], method="activation")
    other = {k: v[:2] if k == "1.bias" else v for k, v in sd.items()}
    with pytest.raises(MismatchError, match=r"1.bias: shapes differ \(\(12,\) vs \(2,\)\)"):
        align(net, [sd, other], example_input=torch.zeros(1, 16))
    spec = permutation_spec(net, torch.zeros(1, 16))
    with pytest.raises(InvalidArgumentError, match="at least one batch"):
        activation_matching(spec, net, sd, sd, [])

    class Broken(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on the input: not traceable by fx, so the model is run instead
                return x
            raise RuntimeError("no negative inputs\nsecond line")

    with pytest.raises(InvalidArgumentError, match=r"^Broken does not run on the example input \(RuntimeError: no "
                                                   r"negative inputs\), so its permutations are unknown; pass one "
                                                   r"batch of its inputs$"):
        permutation_spec(Broken(), torch.zeros(1))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and the command line


def digit_members(out, seeds=(0, 1, 2)):
    """small_cnn members of sklearn digits from different initialisations (untrained; BatchNorm randomised)."""
    import json

    from merge.data import load_dataset
    from merge.io.writer import write_state_dict
    from merge.models import build_model, model_spec

    spec = model_spec("small_cnn", 10, in_chans=1, image_size=8, width=4)
    data = load_dataset("digits", seed=0).spec
    paths = []
    for s in seeds:
        torch.manual_seed(s)
        model = randomise_bn(build_model("small_cnn", num_classes=10, in_chans=1, width=4), s)
        meta = {"papa_merge.model": json.dumps(spec), "papa_merge.data": json.dumps(data),
                "papa_merge.train": json.dumps({"member": s})}
        paths.append(write_state_dict(model.state_dict(), out / f"member-{s}.safetensors", metadata=meta))
    return paths


def logits_of(path, x):
    from merge.models import load_member

    model, _ = load_member(path)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_align_command_writes_members_that_compute_the_same_function(tmp_path, method):
    import json

    from click.testing import CliRunner

    from cli.main import cli
    from merge.io.sources import read_safetensors_metadata

    paths = digit_members(tmp_path)
    res = CliRunner().invoke(cli, ["align", *map(str, paths), "-o", str(tmp_path / "aligned"), "--method", method,
                                   "--batches", "2"])
    assert res.exit_code == 0, res.output
    assert f"{method} matching onto {paths[0]}: 3 permutations (28 units)" in res.output
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for p in paths:
        out = tmp_path / "aligned" / p.name
        torch.testing.assert_close(logits_of(out, x), logits_of(p, x), atol=1e-5, rtol=0)
        recipe = json.loads(read_safetensors_metadata(out)["papa_merge.recipe"])
        assert recipe["align"]["method"] == method and recipe["align"]["reference"] == 0
        assert read_safetensors_metadata(out)["papa_merge.train"] == read_safetensors_metadata(p)["papa_merge.train"]
    assert "(0 units moved" in res.output.splitlines()[1] and "(0 units moved" not in res.output.splitlines()[2]
    again = CliRunner().invoke(cli, ["align", *map(str, paths), "-o", str(tmp_path / "aligned")])
    assert again.exit_code == 1 and "exists" in again.output and "--force" in again.output


def test_soup_align_merges_the_aligned_members_and_recomputes_batchnorm(tmp_path):
    import json

    from click.testing import CliRunner
    from safetensors.torch import load_file

    from cli.main import cli
    from merge.io.sources import read_safetensors_metadata

    paths = digit_members(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["align", *map(str, paths), "-o", str(tmp_path / "aligned")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["soup", "--align", "weight", *map(str, paths), "-o", str(tmp_path / "soup.safetensors"),
                              "--align-batches", "2", "--batch-size", "64"])
    assert res.exit_code == 0, res.output
    assert f"aligned 3 members onto {paths[0]} by weight matching (3 permutations, units moved: 0," in res.output
    assert "BatchNorm statistics recomputed on 2 training batches of 64" in res.output
    soup = load_file(tmp_path / "soup.safetensors")
    aligned = [load_file(tmp_path / "aligned" / p.name) for p in paths]
    for k in ("features.0.weight", "features.4.weight", "features.5.bias", "head.weight"):
        torch.testing.assert_close(soup[k], sum(a[k].double() for a in aligned).float() / 3, atol=1e-6, rtol=0)
    mean_stats = sum(a["features.1.running_mean"] for a in aligned) / 3
    assert not torch.allclose(soup["features.1.running_mean"], mean_stats)  # recomputed, not averaged
    recipe = json.loads(read_safetensors_metadata(tmp_path / "soup.safetensors")["papa_merge.recipe"])
    assert recipe["align"]["method"] == "weight" and recipe["align"]["members"] == [p.name for p in paths]  # public names
    assert recipe["statistics"]["fix"] == "batchnorm" and recipe["statistics"]["batches"] == 2
    assert "different starts" not in res.output

    res = runner.invoke(cli, ["soup", "--align", "activation", "--no-repair", "--align-to", "1", *map(str, paths),
                              "-o", str(tmp_path / "plain.safetensors"), "--align-batches", "1"])
    assert res.exit_code == 0, res.output
    assert f"onto {paths[1]} by activation matching" in res.output and "statistics" not in res.output
    recipe = json.loads(read_safetensors_metadata(tmp_path / "plain.safetensors")["papa_merge.recipe"])
    assert recipe["align"]["reference"] == 1 and "statistics" not in recipe


def test_soup_align_refuses_what_it_cannot_do(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    paths = [str(p) for p in digit_members(tmp_path, seeds=(0, 1))]
    runner = CliRunner()
    res = runner.invoke(cli, ["soup", "--align", "weight", "--recompute-bn", "2", *paths, "-o", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 2 and "drop --recompute-bn, --dry-run, --base and --jobs" in res.output
    res = runner.invoke(cli, ["soup", "--align", "weight", "--jobs", "2", *paths, "-o", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 2 and "drop --recompute-bn, --dry-run, --base and --jobs" in res.output
    res = runner.invoke(cli, ["soup", "--align", "weight", "--align-to", "2", *paths, "-o", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 2 and "member index from 0 to 1, got 2" in res.output and "--align-to" in res.output
    res = runner.invoke(cli, ["soup", "--align", "weight", *paths, "-o", str(tmp_path / "s.pt")])
    assert res.exit_code == 2 and "one .safetensors file" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s.pt").exists() and not (tmp_path / "s.safetensors").exists()


def test_the_different_starts_warning_names_align(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    paths = [str(p) for p in digit_members(tmp_path, seeds=(0, 1))]
    res = CliRunner().invoke(cli, ["soup", *paths, "-o", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 0, res.output
    assert "different starts" in res.output and "papa-merge soup --align weight|activation" in res.output


def test_interpolate_align_draws_the_line_before_and_after_alignment(tmp_path):
    import json

    from click.testing import CliRunner

    from cli.main import cli

    a, b = digit_members(tmp_path, seeds=(0, 1))
    png = tmp_path / "line.png"
    res = CliRunner().invoke(cli, ["interpolate", str(a), str(b), "-o", str(png), "--alphas", "0,0.5,1", "--bn-batches",
                                   "1", "--batch-size", "64", "--split", "val", "--align", "weight", "--json"])
    assert res.exit_code == 0, res.output
    assert png.exists() and "| aligned 0.50 |" in png.with_suffix(".md").read_text()
    curve = json.loads(res.output.splitlines()[-1])
    assert curve["align"]["method"] == "weight" and [p["alpha"] for p in curve["aligned"]] == [0.0, 0.5, 1.0]
    # B permuted computes what B computes, and alpha 0 is A: the aligned line's ends are the plain line's
    for i in (0, 2):
        plain, aligned = curve["points"][i]["metrics"]["val"], curve["aligned"][i]["metrics"]["val"]
        assert plain["acc"] == aligned["acc"] and abs(plain["nll"] - aligned["nll"]) < 1e-5


class TinyEncoder(nn.Module):
    """A transformer encoder block written out (embeddings, pre-norm attention with reshaped heads, GELU MLP)."""

    def __init__(self, vocab=11, dim=8, heads=2, hidden=12, classes=3, length=5, fused=True):
        super().__init__()
        self.heads = heads
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(length, dim)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)
        self.register_buffer("positions", torch.arange(length))

    def forward(self, ids):
        x = self.tok(ids) + self.pos(self.positions)
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).split(d, dim=-1) if hasattr(self, "qkv") else (self.q(h), self.k(h), self.v(h))
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = self.attend(q, k, v)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))
        return self.head(self.ln_f(x).mean(dim=1))

    def attend(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class MaskedEncoder(TinyEncoder):
    """Attention with a mask that differs per head: permuting the heads would change the function."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        mask = torch.ones(self.heads, 5, 5, dtype=torch.bool).tril()
        mask[0] = True  # head 0 sees every position, the others only the ones before
        self.register_buffer("mask", mask)

    def attend(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def test_a_transformer_encoder_permutes_its_stream_and_mlp_units_and_moves_attention_heads_whole():
    torch.manual_seed(0)
    net = TinyEncoder().eval()
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(0))
    spec = permutation_spec(net, ids)
    axes = spec.axes_to_perm
    stream, mlp_units = axes["tok.weight"][1][0], axes["fc1.weight"][0][0]
    # the residual stream: both embeddings, the LayerNorms, the attention output and the MLP output
    assert axes["pos.weight"][1][0] == stream and axes["ln2.bias"][0][0] == stream
    assert axes["proj.weight"][0][0] == stream and axes["fc2.weight"] == ((stream, 1), (mlp_units, 1))
    assert axes["head.weight"] == (None, (stream, 1))
    # the fused query/key/value output: 3 chunks (q, k, v) of 2 heads of 4 units, the heads moved alike in each;
    # the output projection takes the heads' units in the same order
    assert axes["qkv.weight"] == (("qkv.heads", 4, 3), (stream, 1)) and axes["qkv.bias"] == (("qkv.heads", 4, 3),)
    assert axes["proj.weight"][1] == ("qkv.heads", 4) and spec.sizes["qkv.heads"] == 2 and not spec.fixed
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    permuted = apply_permutation(spec, random_permutation(spec, seed=1), sd)
    assert not torch.equal(permuted["fc1.weight"], sd["fc1.weight"])
    torch.testing.assert_close(outputs(net, permuted, ids), outputs(net, sd, ids), atol=1e-5, rtol=0)
    back = align(net, [sd, permuted], method="weight", spec=spec).state_dicts[1]
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_qkv", "separate_qkv"])
def test_attention_heads_move_as_whole_heads(fused):
    net = TinyEncoder(dim=12, heads=3, fused=fused).eval()
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(0))
    spec = permutation_spec(net, ids)
    heads = "qkv.heads" if fused else "q.heads"
    assert spec.sizes[heads] == 3 and not spec.fixed
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    perm = {p: torch.arange(n) for p, n in spec.sizes.items()}
    perm[heads] = torch.tensor([2, 0, 1])
    permuted = apply_permutation(spec, perm, sd)
    # computed independently: head i of the queries, keys and values (and the output projection's columns)
    # is old head perm[i], its 4 units kept in order
    order = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7])
    if fused:
        assert torch.equal(permuted["qkv.weight"], sd["qkv.weight"][torch.cat([order, order + 12, order + 24])])
    else:
        assert all(torch.equal(permuted[f"{n}.weight"], sd[f"{n}.weight"][order]) for n in "qkv")
        assert all(torch.equal(permuted[f"{n}.bias"], sd[f"{n}.bias"][order]) for n in "qkv")
    assert torch.equal(permuted["proj.weight"], sd["proj.weight"][:, order])
    assert torch.equal(permuted["proj.bias"], sd["proj.bias"])
    torch.testing.assert_close(outputs(net, permuted, ids), outputs(net, sd, ids), atol=1e-5, rtol=0)
    # undone by the inverse permutation: the original weights exactly
    undone = apply_permutation(spec, {p: torch.argsort(v) for p, v in perm.items()}, permuted)
    assert all(torch.equal(undone[k], sd[k]) for k in sd)
    # weight matching recovers a known random permutation of heads, stream and MLP units exactly
    known = random_permutation(spec, seed=4)
    assert not torch.equal(known[heads], torch.arange(3))
    shuffled = apply_permutation(spec, known, sd)
    torch.testing.assert_close(outputs(net, shuffled, ids), outputs(net, sd, ids), atol=1e-5, rtol=0)
    result = align(net, [sd, shuffled], method="weight", spec=spec)
    assert all(torch.equal(result.state_dicts[1][k], sd[k]) for k in sd)
    assert torch.equal(result.perms[1][heads], torch.argsort(known[heads]))
    # activation matching too: heads by the correlations of their outputs, unit by unit
    g = torch.Generator().manual_seed(1)
    result = align(net, [sd, shuffled], method="activation", batches=[torch.randint(0, 11, (8, 5), generator=g)
                                                                       for _ in range(3)], spec=spec)
    assert torch.equal(result.perms[1][heads], torch.argsort(known[heads]))
    assert all(torch.equal(result.state_dicts[1][k], sd[k]) for k in sd)


def test_attention_with_a_mask_per_head_keeps_its_heads_in_place():
    net = MaskedEncoder(dim=12, heads=3).eval()
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(0))
    spec = permutation_spec(net, ids)
    assert not any("heads" in p for p in spec.sizes)
    assert list(spec.fixed) == ["qkv"] and "split" in spec.fixed["qkv"]
    assert spec.axes_to_perm["qkv.weight"][0] is None and spec.axes_to_perm["proj.weight"][1] is None
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    permuted = apply_permutation(spec, random_permutation(spec, seed=1), sd)
    torch.testing.assert_close(outputs(net, permuted, ids), outputs(net, sd, ids), atol=1e-5, rtol=0)
    # moving its heads as the unmasked block's would change what it computes
    unmasked = permutation_spec(TinyEncoder(dim=12, heads=3), ids)
    moved = apply_permutation(unmasked, {p: torch.tensor([2, 0, 1]) if p == "qkv.heads" else torch.arange(n)
                                         for p, n in unmasked.sizes.items()}, sd)
    assert (outputs(net, moved, ids) - outputs(net, sd, ids)).abs().max() > 1e-3
