"""Neural network subspaces (Wortsman et al., 2021): a line or a simplex of networks trained in one run.

Reference: apple/learning-subspaces (``trainers/train_one_dim_subspaces.py``, ``trainers/train_simplexes.py``,
``models/modules.py``, ``utils.update_bn``, ``experiment_configs/*/eval_lines.py``). Every parameter has
one value per endpoint (the reference's ``LinesConv``/``LinesBN`` hold ``weight`` and ``weight1``);
the network at a point with coefficients ``c`` (``c_i >= 0``, ``sum c_i = 1``) has ``sum_i c_i w_i``.

1. Each training batch samples one point for the whole network: ``a ~ U(0, 1)`` on a line
   (coefficients ``(1 - a, a)``), ``Z_i ~ Exp(1)`` normalised on a simplex (uniform on the simplex),
   and the loss of the network at that point is back-propagated to every endpoint.
2. The loss gains ``beta * cos^2(w_i, w_j)`` for a random pair of endpoints (the line's only pair),
   where the cosine is ONE ratio over all conv weights of the network:
   ``(sum_l w_i^l . w_j^l)^2 / (sum_l |w_i^l|^2 * sum_l |w_j^l|^2)`` (``args.beta = 1``).
3. BatchNorm running statistics are shared by the whole subspace during training, so they describe
   no particular point: every point that is evaluated or written, endpoints included, gets its
   statistics recomputed on the training data first (``utils.update_bn``, a cumulative average).

Deliberate differences from the reference:

- "Conv weights" are the weights of convolutions and of linear layers: the reference's networks have
  no linear layer (their classifier is a 1x1 convolution, in the penalty), ours have linear heads
  (and transformers are made of linear layers). Biases, norm layers and embeddings stay out, as there.
- Statistics are recomputed on ``bn_batches`` fixed, seeded, unaugmented training batches
  (:meth:`merge.evaluate.CheckpointEvaluator.bn_loader`; by default enough batches to cover the
  training split once, as ``update_bn`` does over the train loader), so that ``papa-merge interpolate``
  with the same batches reproduces every endpoint's recorded metrics.
- The optimizer and schedule are this package's (:func:`merge.train.make_optimizer`: no weight decay on
  biases and norm scales; warmup and cosine per step), not the reference's SGD with 5 warmup epochs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from merge.bn import bn_layers
from merge.data import Splits
from merge.engine import resolve_device
from merge.errors import InvalidArgumentError
from merge.evaluate import CheckpointEvaluator
from merge.io.sources import read_safetensors_metadata
from merge.io.writer import check_output_free
from merge.keys import TRAIN_KEY
from merge.params import Param
from merge.train.kit import (
    build_member,
    check_recipe_fits,
    evaluate_model,
    member_path,
    resolve_spec,
    resolve_splits,
    save_member,
    train_loader,
    train_record,
)
from merge.train.loop import Callback, TrainState, fit
from merge.train.recipe import Recipe, default_recipe
from merge.train.registry import TrainJob, TrainResult, register_method
from merge.train.report import FINAL_PARAM, finish_run

__all__ = ["Subspace", "SubspaceLine", "SubspacePenalty", "train_subspace", "penalty_weight_names",
           "global_cos2", "full_pass_batches", "END_SEED_OFFSET"]

# Endpoint i is initialised with the recipe's seed plus i times this.
END_SEED_OFFSET = 1_000_003
PENALTY_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


def penalty_weight_names(net: nn.Module) -> list[str]:
    """The parameters the cos^2 penalty runs over: the ``weight`` of every convolution and linear layer."""
    return [f"{name}.weight" if name else "weight" for name, m in net.named_modules()
            if isinstance(m, PENALTY_LAYERS) and isinstance(getattr(m, "weight", None), nn.Parameter)]


def global_cos2(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``(sum_l a_l . b_l)^2 / (sum_l |a_l|^2 * sum_l |b_l|^2)``: one squared cosine over all layers at once.

    This is the reference's regulariser (equation 3 of the paper), not a mean of per-layer cosines.

    Example:
        >>> float(global_cos2([torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 1.0])]))
        0.5
    """
    if len(a) != len(b) or not a:
        raise InvalidArgumentError(f"global_cos2 needs the same number (>0) of tensors on each side, got {len(a)} "
                                   f"and {len(b)}")
    num = sum((x * y).sum() for x, y in zip(a, b))
    na = sum(x.pow(2).sum() for x in a)
    nb = sum(y.pow(2).sum() for y in b)
    return num.pow(2) / (na * nb)


class Subspace(nn.Module):
    """A line (2 endpoints) or simplex (3 or more) of networks of one architecture.

    ``forward`` runs the network at a point: in training mode a new random point per call (uniform on
    the line or the simplex), in eval mode :attr:`eval_coefficients` (the centre by default).

    Args:
        nets: the endpoints' initial networks, one architecture; ``nets[0]`` also provides the
            buffers (BatchNorm statistics), which the whole subspace shares during training.
        seed: seeds the draws of points and of penalty pairs.

    Raises:
        InvalidArgumentError: fewer than 2 networks, or networks with different parameters.

    Example:
        >>> s = Subspace([nn.Linear(2, 2), nn.Linear(2, 2)])
        >>> s.kind, s.eval_coefficients
        ('line', [0.5, 0.5])
    """

    def __init__(self, nets: Sequence[nn.Module], *, seed: int = 0):
        super().__init__()
        if len(nets) < 2:
            raise InvalidArgumentError(f"a subspace needs at least 2 endpoints, got {len(nets)}", option="members",
                                       choices=(2,))
        self.net = nets[0]
        self.names = [n for n, _ in self.net.named_parameters()]
        ends = []
        for i, net in enumerate(nets):
            params = dict(net.named_parameters())
            if sorted(params) != sorted(self.names):
                raise InvalidArgumentError(f"endpoint {i} is not the same architecture as endpoint 0")
            ends.append(nn.ParameterDict({_key(n): nn.Parameter(params[n].detach().clone()) for n in self.names}))
        self.ends = nn.ModuleList(ends)
        for p in self.net.parameters():
            p.requires_grad_(False)  # the endpoints are what trains; the wrapped net gives the shape and buffers
        self.penalty_names = penalty_weight_names(self.net)
        self.generator = torch.Generator().manual_seed(seed)
        self.eval_coefficients = [1.0 / len(nets)] * len(nets)
        self.coefficients = list(self.eval_coefficients)

    @property
    def points(self) -> int:
        return len(self.ends)

    @property
    def kind(self) -> str:
        return "line" if self.points == 2 else "simplex"

    def sample(self) -> list[float]:
        """A random point: ``(1 - a, a)`` with ``a ~ U(0, 1)`` on a line; normalised ``Exp(1)`` draws on a simplex."""
        if self.points == 2:
            a = float(torch.rand(1, generator=self.generator))
            return [1.0 - a, a]
        z = -torch.log1p(-torch.rand(self.points, generator=self.generator, dtype=torch.float64))  # Exp(1)
        return (z / z.sum()).tolist()

    def check_coefficients(self, coefficients: Sequence[float]) -> list[float]:
        c = [float(x) for x in coefficients]
        if len(c) != self.points or any(x < 0 for x in c) or not math.isclose(sum(c), 1.0, abs_tol=1e-9):
            raise InvalidArgumentError(f"a point of a {self.points}-endpoint subspace needs {self.points} non-negative "
                                       f"coefficients summing to 1, got {c}")
        return c

    def weights_at(self, coefficients: Sequence[float]) -> dict[str, Tensor]:
        """The network's parameters at a point (differentiable in every endpoint)."""
        c = self.check_coefficients(coefficients)
        return {n: sum(ci * end[_key(n)] for ci, end in zip(c, self.ends)) for n in self.names}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.coefficients = self.sample() if self.training else list(self.eval_coefficients)
        return functional_call(self.net, self.weights_at(self.coefficients), args, kwargs)

    def penalty_pair(self) -> tuple[int, int]:
        """The endpoints the penalty compares this step: the line's pair, or a random pair of a simplex."""
        if self.points == 2:
            return 0, 1
        i, j = torch.randperm(self.points, generator=self.generator)[:2].tolist()
        return int(i), int(j)

    def cos2(self, i: int = 0, j: int = 1) -> Tensor:
        """The reference's penalty between endpoints ``i`` and ``j``: :func:`global_cos2` over conv weights."""
        return global_cos2([self.ends[i][_key(n)] for n in self.penalty_names],
                           [self.ends[j][_key(n)] for n in self.penalty_names])

    @torch.no_grad()
    def mean_cos2(self) -> float:
        """The penalty averaged over all pairs of endpoints (the reference's ``get_stats`` cossim)."""
        pairs = [(i, j) for i in range(self.points) for j in range(i + 1, self.points)]
        return float(sum(self.cos2(i, j) for i, j in pairs) / len(pairs))

    @torch.no_grad()
    def point_state_dict(self, coefficients: Sequence[float]) -> dict[str, Tensor]:
        """The network at a point as a plain state dict; buffers are the shared (training) statistics."""
        sd = {n: t.detach().clone() for n, t in self.net.state_dict().items()}
        sd.update({n: w.detach().clone() for n, w in self.weights_at(coefficients).items()})
        return sd

    def endpoint_state_dict(self, index: int) -> dict[str, Tensor]:
        """Endpoint ``index`` as a plain state dict (shared buffers: recompute BatchNorm before using it)."""
        return self.point_state_dict([1.0 if i == index else 0.0 for i in range(self.points)])


class SubspaceLine(Subspace):
    """A line between two networks; eval mode runs the point ``eval_alpha`` (0.5, the midpoint).

    Example:
        >>> line = SubspaceLine(nn.Linear(2, 2), nn.Linear(2, 2), eval_alpha=0.25)
        >>> line.eval_coefficients
        [0.75, 0.25]
    """

    def __init__(self, start: nn.Module, end: nn.Module, *, seed: int = 0, eval_alpha: float = 0.5):
        super().__init__([start, end], seed=seed)
        if not 0 <= eval_alpha <= 1:
            raise InvalidArgumentError(f"eval_alpha must be in [0, 1], got {eval_alpha}")
        self.eval_coefficients = [1.0 - eval_alpha, eval_alpha]


class SubspacePenalty(Callback):
    """Adds ``beta * cos^2`` of a pair of endpoints to each :class:`Subspace` member's loss (the reference: beta=1)."""

    def __init__(self, *, beta: float = 1.0):
        if beta < 0:
            raise InvalidArgumentError(f"subspace beta must be >= 0, got {beta}", option="beta")
        self.beta = beta

    def on_loss(self, state: TrainState, index: int, loss: Tensor) -> Tensor:
        model = state.models[index]
        if not isinstance(model, Subspace) or not self.beta:
            return loss
        return loss + self.beta * model.cos2(*model.penalty_pair())


def _inits_sha256(nets: Sequence[nn.Module]) -> str:
    h = hashlib.sha256()
    for net in nets:
        for name, t in sorted(net.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def full_pass_batches(splits: Splits, batch_size: int) -> int:
    """Batches of ``batch_size`` that cover the training split once (``update_bn`` over the train loader)."""
    return max(1, math.ceil(len(splits.train) / batch_size))


def train_subspace(recipe: Recipe, *, model: str | Mapping[str, Any], data: str | Splits, out_dir: str | os.PathLike,
                   points: int = 2, beta: float = 1.0, bn_batches: int | None = None,
                   device: str | torch.device = "cpu", progress: bool = True, callbacks: Sequence[Callback] = (),
                   limit: int | None = None, split_seed: int = 0, val_fraction: float = 0.1,
                   eval_batch_size: int = 256, force: bool = False) -> list[Path]:
    """Train a line (``points=2``) or simplex of networks in one run and write its endpoints as members.

    Each endpoint is written with BatchNorm statistics recomputed at that endpoint, and its recorded
    metrics are measured after that recomputation. ``papa-merge midpoint`` (:func:`merge.interpolate.midpoint`)
    makes the centre, ``papa-merge interpolate`` the accuracy along the line.

    Args:
        recipe: the run's recipe (endpoint i is initialised with ``seed + i * END_SEED_OFFSET``).
        model, data: as in :func:`merge.train.train_member` (from scratch: a subspace starts from n inits).
        out_dir: gets ``member-00.safetensors`` ... one per endpoint.
        points: endpoints (2: a line; 3 or more: a simplex).
        beta: weight of the cos^2 penalty.
        bn_batches: training batches (of ``eval_batch_size``) to recompute BatchNorm statistics on at
            each endpoint (default: a full pass over the training split).
        Others as in :func:`merge.train.train_member`.

    Returns:
        The endpoint paths; ``merge.soup(paths)`` has the centre's weights (recompute its BatchNorm).

    Raises:
        OutputExistsError: an endpoint exists and ``force`` is False.
        InvalidArgumentError: fewer than 2 points, or a negative ``beta``.
    """
    if points < 2:
        raise InvalidArgumentError(f"a subspace needs at least 2 endpoints, got {points}", option="members",
                                   choices=(2,))
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    splits = resolve_splits(data, limit=limit, split_seed=split_seed, val_fraction=val_fraction)
    spec = resolve_spec(model, splits)
    paths = [member_path(out_dir, i, arch=spec["arch"]) for i in range(points)]
    for p in paths:
        check_output_free(p, force=force)
    check_recipe_fits(recipe, splits)
    seeds = [recipe.seed + i * END_SEED_OFFSET for i in range(points)]
    nets = [build_member(spec, dataclasses.replace(recipe, seed=s), None, dev) for s in seeds]
    # The endpoints are trained as one subspace (every point on it is trained to be good), so they share a
    # start: one fingerprint of all their initialisations, the record soups use to tell them from strangers.
    start = {"kind": "population", "sha256": _inits_sha256(nets), "members": points, "method": "subspace"}
    sub = Subspace(nets, seed=recipe.seed).to(dev)
    state = fit([sub], [train_loader(splits, spec, recipe)], [recipe], num_classes=spec["num_classes"], device=dev,
                callbacks=[SubspacePenalty(beta=beta), *callbacks], progress=progress, desc=f"subspace {sub.kind}")
    # One evaluator for every point: the same recalibration batches as merge.interpolate and papa-merge eval.
    ev = CheckpointEvaluator(json.loads(json.dumps(spec)), splits, batch_size=eval_batch_size, device=dev)
    nb = bn_batches or full_pass_batches(splits, eval_batch_size)
    has_bn = bool(bn_layers(ev.model))
    cos2 = sub.mean_cos2()
    written = []
    for i, p in enumerate(paths):
        net = ev.model_with(sub.endpoint_state_dict(i), recompute_bn=nb if has_bn else 0)
        scores = evaluate_model(net, splits, spec, device=dev, batch_size=eval_batch_size)
        info = {"kind": sub.kind, "points": points, "endpoint": i, "beta": beta, "cos2": cos2, "seeds": seeds,
                "bn_recomputed": {"batches": nb, "batch_size": eval_batch_size, "split": "train",
                                  "seed": ev.bn_seed} if has_bn else None}
        record = train_record(recipe, state, method="subspace", pretrained=None, device=dev,
                               extra={"subspace": info, "start": start})
        written.append(save_member(net, p, spec, splits, record, scores, force=force))
    return written


@register_method("subspace", citation="Wortsman et al. 2021, Learning Neural Network Subspaces; code "
                 "apple/learning-subspaces",
                 summary="a line (2 members) or simplex (3+) of networks in one run; writes its endpoints",
                 params=[Param("beta", 1.0, low=0.0, help="weight of the cos^2 penalty between endpoints"),
                         Param("bn_batches", None, int, low=1,
                               help="training batches to recompute BatchNorm on at each endpoint (default: a full "
                                    "pass)"),
                         FINAL_PARAM])
def train_subspace_method(job: TrainJob, *, beta: float = 1.0, bn_batches: int | None = None,
                          final: bool = True) -> TrainResult:
    """The registry's entry: one subspace from scratch, its endpoints written as members 0 .. n-1.

    With ``final``, the run ends with the table of the endpoints, their ensemble and the subspace's centre
    (the midpoint of a line: the endpoints' average, BatchNorm recomputed as at each endpoint), written
    to ``midpoint.safetensors`` (a line) or ``centre.safetensors`` (a simplex).
    """
    if job.members < 2 or job.pretrained or job.init:
        raise InvalidArgumentError("a subspace is trained from scratch and writes its endpoints (2: a line, 3 or "
                                   "more: a simplex); ask for at least 2 members and no pretrained weights or init",
                                   option="members", choices=(2,))
    recipe = job.recipes[0] if job.recipes else dataclasses.replace(
        job.base or default_recipe(job.arch), seed=job.seed, data_seed=job.seed)
    paths = train_subspace(recipe, model=job.model, data=job.data, out_dir=job.out_dir, points=job.members, beta=beta,
                           bn_batches=bn_batches, device=job.device, progress=job.progress, callbacks=job.callbacks,
                           limit=job.limit, split_seed=job.split_seed, val_fraction=job.val_fraction,
                           eval_batch_size=job.eval_batch_size, force=job.force)
    for i, p in enumerate(paths):
        job.member_done(i, p)
    info = json.loads(read_safetensors_metadata(paths[0]).get(TRAIN_KEY, "{}")).get("subspace") or {}
    nb = (info.get("bn_recomputed") or {}).get("batches", 0)
    centre = "midpoint" if len(paths) == 2 else "centre"
    shape = "line" if len(paths) == 2 else "simplex"
    caption = (f"subspace: a {shape} of networks trained in one run (beta {beta:g}); its {len(paths)} endpoints "
               f"and its {centre}, each with BatchNorm recomputed there")
    return finish_run(TrainResult(paths), job, final=final, caption=caption, average=True, greedy=False,
                      names=[f"{p.stem} (endpoint {i})" for i, p in enumerate(paths)], members_label="endpoints",
                      average_name=f"{centre}.safetensors", average_label=f"{centre} ({centre}.safetensors)",
                      recompute_bn=nb)
