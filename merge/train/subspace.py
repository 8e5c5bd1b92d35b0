"""Neural network subspaces (Wortsman et al., 2021): a line of networks trained in one run.

The line is ``w(a) = (1 - a) * w0 + a * w1`` between two independently initialised endpoints. Each
training batch samples ``a ~ U(0, 1)`` and trains the network at ``w(a)``, so the gradient reaches
both endpoints, weighted by ``1 - a`` and ``a``; a penalty ``beta * cos^2(w0, w1)`` (per layer, averaged)
keeps the endpoints from collapsing onto each other. The endpoints are written as two ordinary
members: their uniform soup is the midpoint (which, after recomputing BatchNorm statistics there,
is the model the paper reports), and soups with weights ``(1 - a, a)`` trace the accuracy along the
line. BatchNorm statistics are shared along the line during training, so recompute them at the point
you evaluate.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from merge.data import Splits
from merge.engine import resolve_device
from merge.errors import InvalidArgumentError
from merge.io.writer import check_output_free, write_state_dict
from merge.train.loop import Callback, TrainState, fit
from merge.train.members import (
    _build,
    _check_recipe_fits,
    _metadata,
    _resolve_spec,
    _resolve_splits,
    _train_record,
    evaluate_model,
    member_path,
    train_loader,
)
from merge.train.methods import TrainJob, TrainResult, register_method
from merge.train.recipe import Recipe, default_recipe

__all__ = ["SubspaceLine", "SubspacePenalty", "train_subspace", "END_SEED_OFFSET"]

# The second endpoint's initialisation seed is the recipe's seed plus this.
END_SEED_OFFSET = 1_000_003


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


class SubspaceLine(nn.Module):
    """A line of networks of one architecture; ``forward`` runs the network at a point ``a`` of the line.

    Args:
        start, end: two networks of the same architecture (independent initialisations); ``start``
            also provides the buffers (BatchNorm statistics), which the whole line shares.
        seed: seeds the per-batch draws of ``a`` during training.
        eval_alpha: the point used in eval mode (0.5, the midpoint).
    """

    def __init__(self, start: nn.Module, end: nn.Module, *, seed: int = 0, eval_alpha: float = 0.5):
        super().__init__()
        self.net = start
        self.names = [n for n, _ in start.named_parameters()]
        end_params = dict(end.named_parameters())
        self.ends = nn.ModuleList([
            nn.ParameterDict({_key(n): nn.Parameter(p.detach().clone()) for n, p in start.named_parameters()}),
            nn.ParameterDict({_key(n): nn.Parameter(end_params[n].detach().clone()) for n in self.names}),
        ])
        for p in self.net.parameters():
            p.requires_grad_(False)  # the endpoints are what trains; the wrapped net is only the shape
        self.generator = torch.Generator().manual_seed(seed)
        self.eval_alpha = eval_alpha
        self.alpha = eval_alpha

    def weights_at(self, alpha: float) -> dict[str, Tensor]:
        """The network's parameters at ``w(alpha)`` (differentiable in both endpoints)."""
        return {n: (1.0 - alpha) * self.ends[0][_key(n)] + alpha * self.ends[1][_key(n)] for n in self.names}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.alpha = float(torch.rand(1, generator=self.generator)) if self.training else self.eval_alpha
        return functional_call(self.net, self.weights_at(self.alpha), args, kwargs)

    def cos2(self) -> Tensor:
        """Mean over weight matrices and kernels of the squared cosine similarity between the two endpoints.

        Biases and norm scales are left out: both endpoints initialise them to the same constants
        (cos = 1 or undefined), which says nothing about how far apart the networks are.
        """
        terms = []
        for n in self.names:
            if self.ends[0][_key(n)].ndim < 2:
                continue
            a, b = self.ends[0][_key(n)].flatten(), self.ends[1][_key(n)].flatten()
            terms.append((a @ b) ** 2 / ((a @ a) * (b @ b) + 1e-12))
        return torch.stack(terms).mean()

    @torch.no_grad()
    def endpoint_state_dict(self, index: int) -> dict[str, Tensor]:
        """Endpoint ``index`` (0 or 1) as a plain state dict of the wrapped architecture (shared buffers)."""
        sd = {n: t.detach().clone() for n, t in self.net.state_dict().items()}
        for n in self.names:
            sd[n] = self.ends[index][_key(n)].detach().clone()
        return sd


class SubspacePenalty(Callback):
    """Adds ``beta * cos^2(w0, w1)`` to each :class:`SubspaceLine` member's loss (Wortsman et al. use beta=1)."""

    def __init__(self, *, beta: float = 1.0):
        if beta < 0:
            raise InvalidArgumentError(f"subspace beta must be >= 0, got {beta}")
        self.beta = beta

    def on_loss(self, state: TrainState, index: int, loss: Tensor) -> Tensor:
        model = state.models[index]
        return loss + self.beta * model.cos2() if isinstance(model, SubspaceLine) and self.beta else loss


def train_subspace(recipe: Recipe, *, model: str | Mapping[str, Any], data: str | Splits, out_dir: str | os.PathLike,
                   beta: float = 1.0, device: str | torch.device = "cpu", progress: bool = True,
                   callbacks: Sequence[Callback] = (), limit: int | None = None, split_seed: int = 0,
                   val_fraction: float = 0.1, eval_batch_size: int = 256, force: bool = False) -> list[Path]:
    """Train a line of networks in one run and write its two endpoints as members.

    Args:
        recipe: the run's recipe (``seed`` initialises endpoint 0, ``seed + END_SEED_OFFSET`` endpoint 1).
        model, data: as in :func:`merge.train.train_member` (from scratch: subspaces start from two inits).
        out_dir: gets ``member-00.safetensors`` (a=0) and ``member-01.safetensors`` (a=1).
        beta: weight of the cos^2 penalty between the endpoints.
        Others as in :func:`merge.train.train_member`.

    Returns:
        The two endpoint paths; ``merge.soup(paths)`` is the midpoint.

    Raises:
        OutputExistsError: an endpoint exists and ``force`` is False.
        As :func:`merge.train.train_member` otherwise.
    """
    out_dir = Path(out_dir)
    paths = [member_path(out_dir, 0), member_path(out_dir, 1)]
    for p in paths:
        check_output_free(p, force=force)
    dev = resolve_device(device)
    splits = _resolve_splits(data, limit=limit, split_seed=split_seed, val_fraction=val_fraction)
    spec = _resolve_spec(model, splits)
    _check_recipe_fits(recipe, splits)
    # Two independent initialisations; the second seed is derived so the run stays one recipe.
    start = _build(spec, recipe, None, dev)
    end = _build(spec, dataclasses.replace(recipe, seed=recipe.seed + END_SEED_OFFSET), None, dev)
    line = SubspaceLine(start, end, seed=recipe.seed).to(dev)
    loader = train_loader(splits, spec, recipe)
    state = fit([line], [loader], [recipe], num_classes=spec["num_classes"], device=dev,
                callbacks=[SubspacePenalty(beta=beta), *callbacks], progress=progress, desc="subspace line")
    written = []
    for i, p in enumerate(paths):
        net = line.net
        net.load_state_dict(line.endpoint_state_dict(i))
        scores = evaluate_model(net, splits, spec, device=dev, batch_size=eval_batch_size)
        record = _train_record(recipe, state, method="subspace-line", pretrained=None, device=dev,
                               extra={"endpoint": float(i), "beta": beta, "cos2": float(line.cos2().detach()),
                                      "end_seed": recipe.seed + END_SEED_OFFSET})
        written.append(write_state_dict(net.state_dict(), p, metadata=_metadata(spec, splits, record, scores),
                                        force=force))
    return written


@register_method("subspace", citation="Wortsman et al. 2021, Learning Neural Network Subspaces; code "
                 "apple/learning-subspaces", summary="a line of networks in one run; writes its 2 endpoints",
                 options=("beta",))
def train_subspace_method(job: TrainJob, *, beta: float = 1.0) -> TrainResult:
    """The registry's entry: one line from scratch, its endpoints written as members 0 and 1."""
    if job.members != 2 or job.pretrained or job.init:
        raise InvalidArgumentError("a subspace line is trained from scratch and writes its 2 endpoints; "
                                   "ask for 2 members and no pretrained weights or init", option="members", choices=(2,))
    recipe = job.recipes[0] if job.recipes else dataclasses.replace(
        job.base or default_recipe(job.arch), seed=job.seed, data_seed=job.seed)
    paths = train_subspace(recipe, model=job.model, data=job.data, out_dir=job.out_dir, beta=beta, device=job.device,
                           progress=job.progress, callbacks=job.callbacks, limit=job.limit, split_seed=job.split_seed,
                           val_fraction=job.val_fraction, eval_batch_size=job.eval_batch_size, force=job.force)
    return TrainResult(paths)
