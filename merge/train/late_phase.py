"""Late-phase weights (von Oswald et al., 2021), trained as the reference code trains them.

Reference: seijin-kobayashi/late-phase-weights (``nets/hyper_layers.py``, ``utils/optim_utils.py``,
``utils/train_test.py``, config ``experiment/etc/cifar10_bn.json``). Until epoch T0 the network trains
as usual. At T0 a few layers, the BatchNorm layers and the classifier head, are *released* into K
copies (the specialists), each a full copy of the layer (parameters and BatchNorm running statistics)
taken from the trained layer. From then on, minibatch t trains specialist ``t mod K``:

1. the forward pass uses the shared weights and specialist k's copies (and updates only copy k's
   BatchNorm statistics);
2. specialist k's parameters step at once with specialist k's own optimizer (its own momentum or
   Adam moments: one optimizer per copy, ``OptimizerSet.specific_p_step``);
3. the shared weights' gradient accumulates over the K minibatches of a cycle (``shared_p_zero_grad``
   only when the cycle starts) and they step once per cycle, on the summed gradient
   (``shared_p_step`` when ``curr_vs == num_vs - 1``).

In eval mode the reference averages the K copies' outputs layer by layer
(``set_average_specialists(True)``). For a linear head and for a BatchNorm layer in eval mode that
average is exactly one layer of the same kind, so :mod:`merge.collapse` folds the K copies into the
original architecture; :class:`LatePhaseNet` in eval mode runs that collapsed network.

Deliberate differences from the reference, each a choice:

- The cycle runs on from T0 to the end of training; the reference restarts it at every epoch (its
  ``curr_vs = 0`` in ``hyper_train``), so with a number of batches per epoch that is not a multiple of K
  its first copies get more minibatches and the partial last cycle's shared gradient is discarded.
  Here only the very last partial cycle's shared gradient is never applied (as in the reference).
- Each copy's optimizer steps only on the minibatches that trained that copy. The reference's
  ``specific_p_step(specialist_idx)`` tests ``if specialist_idx:``, so for specialist 0 it steps every
  copy's optimizer (with zero gradients, on the PyTorch of its time: momentum and weight decay move
  the other copies); we take that as a bug.
- Learning rates follow this package's per-step schedule (cosine by default) for the shared weights
  and the copies alike; the reference uses the same per-epoch ``annealing`` schedule for both.
- Weight decay follows :func:`merge.train.make_optimizer` (not on biases and norm scales); the
  reference decays the specialists' BatchNorm parameters too.
- Models without BatchNorm (the MiniLM text model) get late-phase copies of their head only.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from merge.collapse import LATE_PHASE_PREFIX, collapse_state_dict, copy_name
from merge.data import Splits
from merge.engine import resolve_device
from merge.errors import InvalidArgumentError
from merge.io.writer import check_output_free, write_state_dict
from merge.models import load_weights
from merge.params import Param
from merge.train.kit import (
    build_member,
    check_recipe_fits,
    check_resumable,
    evaluate_model,
    load_init,
    member_metadata,
    member_path,
    prepare,
    resolve_spec,
    resolve_splits,
    save_member,
    train_loader,
    train_record,
)
from merge.train.loop import Callback, TrainState, fit, make_optimizer
from merge.train.recipe import Recipe
from merge.train.registry import TrainJob, TrainResult, register_method
from merge.train.report import FINAL_PARAM, finish_run

__all__ = ["late_phase_modules", "late_phase_parameters", "LatePhaseNet", "LatePhaseOptimizer", "LatePhaseSchedule",
           "train_late_phase_member", "late_phase_path", "DEFAULT_COPIES", "DEFAULT_START_FRACTION"]

# The reference's BatchNorm configuration (cifar10_bn.json): 10 specialists, released at epoch 120 of 200.
DEFAULT_COPIES = 10
DEFAULT_START_FRACTION = 0.6
LAYOUT = LATE_PHASE_PREFIX + "{copy}.{module}.{tensor}"


def _head(model: nn.Module) -> nn.Linear | None:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Linear):
        return head
    for attr in ("head", "classifier", "fc"):
        h = getattr(model, attr, None)
        if isinstance(h, nn.Linear):
            return h
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def late_phase_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The layers that get K copies: every affine BatchNorm layer that tracks statistics, and the linear head.

    These are the reference's late-phase BatchNorm variant (``hard_sharing`` of everything but
    ``head`` and ``batchnorm``). Both kinds collapse exactly (:mod:`merge.collapse`).

    Returns:
        ``{module name: module}`` in the model's module order.
    """
    head = _head(model)
    chosen = {}
    for name, m in model.named_modules():
        if not name:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats:
            chosen[name] = m
        elif m is head:
            chosen[name] = m
    return chosen


def late_phase_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of :func:`late_phase_modules`, by their names in ``model``."""
    out = {}
    for mname, m in late_phase_modules(model).items():
        for pname, p in m.named_parameters():
            out[f"{mname}.{pname}"] = p
    return out


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot hold dots


def _swap(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` inside ``root``; return the module that was there."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = parent._modules[leaf]
    parent._modules[leaf] = module
    return old


def _module_spec(m: nn.Module) -> dict[str, Any]:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return {"kind": "batchnorm", "eps": float(m.eps)}
    return {"kind": "linear"}


class LatePhaseNet(nn.Module):
    """A network whose BatchNorm layers and head have K copies after release (the reference's specialists).

    Before :meth:`release` it is the plain network. After it, in training mode the forward pass runs
    with copy :attr:`active` of every late-phase layer; in eval mode it runs the collapsed network
    (the layer-wise average of the K copies, which is what the reference evaluates). Use
    :meth:`specialist` to run one copy.

    Args:
        net: the network (its late-phase layers are the *tied* layers until release).
        copies: K, the number of specialists (>= 2).

    Raises:
        InvalidArgumentError: K < 2, or the network has neither BatchNorm layers nor a linear head.

    Example:
        >>> lpn = LatePhaseNet(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), copies=3)
        >>> sorted(lpn.names)
        ['1', '2']
    """

    def __init__(self, net: nn.Module, *, copies: int):
        super().__init__()
        if copies < 2:
            raise InvalidArgumentError(f"late-phase weights need at least 2 copies, got {copies}", option="copies")
        modules = late_phase_modules(net)
        if not modules:
            raise InvalidArgumentError(f"{type(net).__name__} has no BatchNorm layer and no linear head to give "
                                       "late-phase copies")
        self.net = net
        self.names = list(modules)
        self.k = copies
        self.specs = {n: _module_spec(m) for n, m in modules.items()}
        self.copies = nn.ModuleList(nn.ModuleDict({_key(n): copy.deepcopy(m) for n, m in modules.items()})
                                    for _ in range(copies))
        self.released = False
        self.active = 0
        self._use: int | None = None

    def tied(self, name: str) -> nn.Module:
        """The layer the network holds at ``name`` outside a forward pass (trained until release)."""
        return self.net.get_submodule(name)

    @torch.no_grad()
    def release(self) -> None:
        """Give every copy the tied layer's parameters and statistics (the reference's ``release``, noise 0)."""
        for copies in self.copies:
            for n in self.names:
                copies[_key(n)].load_state_dict(self.tied(n).state_dict())
        self.released = True

    def copy_modules(self, k: int) -> dict[str, nn.Module]:
        """Copy ``k`` of every late-phase layer, by name."""
        return {n: self.copies[k][_key(n)] for n in self.names}

    @contextlib.contextmanager
    def _installed(self, modules: Mapping[str, nn.Module]) -> Iterator[None]:
        saved = {n: _swap(self.net, n, m) for n, m in modules.items()}
        try:
            yield
        finally:
            for n, m in saved.items():
                _swap(self.net, n, m)

    @contextlib.contextmanager
    def specialist(self, k: int) -> Iterator[LatePhaseNet]:
        """Within the block, the forward pass runs copy ``k`` (in either mode).

        Raises:
            InvalidArgumentError: ``k`` is not a copy index or the copies are not released yet.
        """
        if not self.released or not 0 <= k < self.k:
            raise InvalidArgumentError(f"specialist {k}: the network has {self.k} copies"
                                       f"{'' if self.released else ', not yet released'}")
        self._use = k
        try:
            yield self
        finally:
            self._use = None

    def collapsed_modules(self) -> dict[str, nn.Module]:
        """Each late-phase layer collapsed from its K copies (:func:`merge.collapse.collapse_state_dict`)."""
        tensors = {copy_name(k, n, t): v for k in range(self.k) for n, m in self.copy_modules(k).items()
                   for t, v in m.state_dict().items()}
        plain = collapse_state_dict(tensors, {"copies": self.k, "modules": self.specs})
        out = {}
        for n in self.names:
            m = copy.deepcopy(self.copies[0][_key(n)])
            m.load_state_dict({t: plain[f"{n}.{t}"] for t in m.state_dict()})
            out[n] = m
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.released:
            return self.net(*args, **kwargs)
        if self._use is not None:
            modules = self.copy_modules(self._use)
        elif self.training:
            modules = self.copy_modules(self.active)
        else:
            modules = self.collapsed_modules()
        with self._installed(modules):
            return self.net(*args, **kwargs)

    def late_phase_state_dict(self) -> dict[str, Tensor]:
        """The checkpoint's tensors: shared ones under their plain names, copies as
        ``late_phase.{k}.{module}.{tensor}``."""
        prefixes = tuple(f"{n}." for n in self.names)
        out = {k: v for k, v in self.net.state_dict().items() if not k.startswith(prefixes)}
        for k in range(self.k):
            for n, m in self.copy_modules(k).items():
                for t, v in m.state_dict().items():
                    out[copy_name(k, n, t)] = v
        return out

    def info(self) -> dict[str, Any]:
        """What :func:`merge.collapse.collapse_state_dict` needs: copies, modules (kind, eps) and the layout."""
        return {"copies": self.k, "modules": dict(self.specs), "layout": LAYOUT}


class LatePhaseOptimizer(torch.optim.Optimizer):
    """The reference's ``OptimizerSet``: one optimizer for the shared weights, one per specialist copy.

    Before release everything (the tied late-phase layers included) steps every minibatch with the
    shared optimizer. After release, on each minibatch the active copy's own optimizer steps, and the
    shared optimizer steps once per cycle of K minibatches on the gradient summed over the cycle.
    ``param_groups`` is the list of all the inner optimizers' groups (the same dicts), so one learning
    rate scheduler drives them all.

    Args:
        model: the :class:`LatePhaseNet` (its :attr:`~LatePhaseNet.released` and
            :attr:`~LatePhaseNet.active` say which optimizers step).
        recipe: optimizer, learning rate and weight decay (:func:`merge.train.make_optimizer`), for each part.

    Attributes:
        shared: the shared weights' optimizer.
        specialists: the K copies' optimizers.
    """

    def __init__(self, model: LatePhaseNet, recipe: Recipe):
        self.model = model
        shared = [p for p in model.net.parameters() if p.requires_grad]
        self.shared = make_optimizer(nn.ParameterList(shared), recipe)
        self.specialists = [make_optimizer(c, recipe) for c in model.copies]
        groups = [*self.shared.param_groups, *(g for o in self.specialists for g in o.param_groups)]
        super().__init__(groups, {})
        # The scheduler must move the inner optimizers' learning rates: the groups are shared, not copied.
        assert all(a is b for a, b in zip(self.param_groups, groups))

    def _cycle_starts(self) -> bool:
        return self.model.active == 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self.model.released:
            self.shared.zero_grad(set_to_none=set_to_none)
            return
        for o in self.specialists:
            o.zero_grad(set_to_none=set_to_none)
        if self._cycle_starts():
            self.shared.zero_grad(set_to_none=set_to_none)  # 3. accumulate the shared gradient over one cycle

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # no closure: each part steps on its own gradient
        m = self.model
        if not m.released:
            self.shared.step()
            return
        self.specialists[m.active].step()  # 2. the active copy, with its own optimizer state
        if m.active == m.k - 1:
            self.shared.step()  # 3. once per cycle, on the summed gradient


class LatePhaseSchedule(Callback):
    """Releases the copies at ``start_epoch`` and sets which copy trains each minibatch (``(step - T0) mod K``).

    A run that ends before ``start_epoch`` releases at its end, so every copy equals the trained layer.
    """

    def __init__(self, *, start_epoch: float):
        if start_epoch < 0:
            raise InvalidArgumentError(f"the late phase starts at an epoch >= 0, got {start_epoch}",
                                       option="start_epoch")
        self.start_epoch = start_epoch

    def start_step(self, state: TrainState) -> int:
        return int(round(self.start_epoch * state.steps_per_epoch))

    def on_step_begin(self, state: TrainState) -> None:
        start = self.start_step(state)
        if state.step < start:
            return
        for m in state.models:
            if isinstance(m, LatePhaseNet):
                if not m.released:
                    m.release()
                m.active = (state.step - start) % m.k  # 1. this minibatch trains copy (t - T0) mod K

    def on_train_end(self, state: TrainState) -> None:
        for m in state.models:
            if isinstance(m, LatePhaseNet) and not m.released:
                m.release()
        state.log["late_phase_start_step"] = self.start_step(state)


def late_phase_path(out_dir: str | os.PathLike, index: int) -> Path:
    """Where member ``index``'s late-phase checkpoint (its K copies) is written:
    ``OUT/late-phase/member-NN.safetensors``."""
    return Path(out_dir) / "late-phase" / f"member-{index:02d}.safetensors"


def train_late_phase_member(recipe: Recipe, *, model: str | Mapping[str, Any], data: str | Splits,
                            out: str | os.PathLike, late_phase_out: str | os.PathLike,
                            copies: int = DEFAULT_COPIES, start_epoch: float | None = None,
                            pretrained: str | None = None, init: str | os.PathLike | None = None,
                            device: str | torch.device = "cpu", progress: bool = True,
                            callbacks: Sequence[Callback] = (), limit: int | None = None, split_seed: int = 0,
                            val_fraction: float = 0.1, eval_batch_size: int = 256, force: bool = False,
                            desc: str | None = None) -> tuple[Path, Path]:
    """Train one member with late-phase weights; write its late-phase checkpoint and its collapsed model.

    Args:
        recipe: the member's recipe (the shared weights and every copy use its optimizer and schedule).
        model, data, pretrained, init, device, progress, callbacks, limit, split_seed, val_fraction,
            eval_batch_size, force: as in :func:`merge.train.train_member`.
        out: the collapsed (plain) model, a member like any other (a ``.safetensors`` file, or the folder its
            library loads: :func:`merge.train.member_path`).
        late_phase_out: the late-phase checkpoint, with the K copies (``papa-merge collapse`` reads it).
        copies: K (the reference: 10).
        start_epoch: T0, when the copies are released (default 0.6 of the epochs, the reference's 120/200).
        desc: the progress bar's label.

    Returns:
        ``(out, late_phase_out)``.

    Raises:
        InvalidArgumentError: K < 2, T0 outside [0, epochs), or a model without BatchNorm or head.
        OutputExistsError: an output exists and ``force`` is False.

    Example:
        >>> train_late_phase_member(Recipe(epochs=2), model="small_cnn", data="digits", out="m.safetensors",
        ...                         late_phase_out="m.lpw.safetensors", copies=5)  # doctest: +SKIP
    """
    out, late_phase_out = Path(out), Path(late_phase_out)
    for p in (out, late_phase_out):
        check_output_free(p, force=force)
    if start_epoch is None:
        start_epoch = DEFAULT_START_FRACTION * recipe.epochs
    if not 0 <= start_epoch < recipe.epochs:
        raise InvalidArgumentError(f"the late phase must start within training: start_epoch {start_epoch} is not in "
                                   f"[0, {recipe.epochs})", option="start_epoch")
    dev = resolve_device(device)
    splits = resolve_splits(data, limit=limit, split_seed=split_seed, val_fraction=val_fraction)
    spec = resolve_spec(model, splits)
    check_recipe_fits(recipe, splits)
    net = build_member(spec, recipe, pretrained, dev)
    if init is not None:
        load_init(net, init)
    lpn = LatePhaseNet(net, copies=copies).to(dev)
    optimizer = LatePhaseOptimizer(lpn, recipe)
    state = fit([lpn], [train_loader(splits, spec, recipe)], [recipe], num_classes=spec["num_classes"], device=dev,
                callbacks=[LatePhaseSchedule(start_epoch=start_epoch), *callbacks], optimizers=[optimizer],
                progress=progress, desc=desc or out.stem)
    raw = lpn.late_phase_state_dict()
    info = {**lpn.info(), "start_epoch": start_epoch, "start_step": state.log.pop("late_phase_start_step")}
    # The member is the collapsed network: exactly the function the late-phase model computes in eval mode.
    load_weights(net, collapse_state_dict(raw, info), what="the collapsed late-phase weights")
    scores = evaluate_model(net, splits, spec, device=dev, batch_size=eval_batch_size)
    extra = {"init": None if init is None else str(init)}
    record = train_record(recipe, state, method="late-phase", pretrained=pretrained, device=dev,
                           extra={**extra, "late_phase": info})
    write_state_dict(raw, late_phase_out, metadata=member_metadata(spec, splits, record, scores), force=force)
    record = {**record, "late_phase": {**info, "collapsed": True, "checkpoint": str(late_phase_out)}}
    out = save_member(net, out, spec, splits, record, scores, force=force)
    return out, late_phase_out


@register_method("late-phase", citation="von Oswald et al. 2021, Neural networks with late-phase weights; code "
                 "seijin-kobayashi/late-phase-weights",
                 summary="K copies of the BatchNorm layers and head late in training, collapsed into each member",
                 params=[Param("copies", DEFAULT_COPIES, int, low=2,
                               help="K copies of the BatchNorm layers and head, one trained per minibatch"),
                         Param("start_epoch", None, float, low=0.0,
                               help="the epoch the copies are released, T0 (default: 0.6 x epochs)"),
                         FINAL_PARAM])
def train_late_phase(job: TrainJob, *, copies: int = DEFAULT_COPIES, start_epoch: float | None = None,
                     final: bool = True) -> TrainResult:
    """Each member trained alone with late-phase weights; members are the collapsed models.

    ``TrainResult.outputs`` maps ``late-phase-NN`` to each member's late-phase checkpoint
    (``OUT/late-phase/member-NN.safetensors``). Members already on disk with the same recipe are kept.
    With ``final``, the run ends with the table of the collapsed members, their ensemble and, when they
    share a start, their average and greedy soup (:func:`merge.train.report.finish_run`).
    """
    ready = prepare(job)
    recipes, splits, spec = ready.recipes, ready.splits, ready.spec
    paths, outputs = [], {}
    for i, r in enumerate(recipes):
        p, lp = member_path(job.out_dir, i, arch=spec["arch"]), late_phase_path(job.out_dir, i)
        if p.exists() and lp.exists() and not job.force:
            check_resumable(p, r, "late-phase", spec=spec, data_spec=splits.spec)
            job.member_done(i, p, kept=True)
        else:
            lp.parent.mkdir(parents=True, exist_ok=True)
            train_late_phase_member(r, model=spec, data=splits, out=p, late_phase_out=lp, copies=copies,
                                    start_epoch=start_epoch, pretrained=job.pretrained, init=job.init,
                                    device=job.device, progress=job.progress, callbacks=job.callbacks,
                                    eval_batch_size=job.eval_batch_size, force=job.force,
                                    desc=f"late-phase member {i + 1}/{len(recipes)}")
            job.member_done(i, p)
        paths.append(p)
        outputs[f"late-phase-{i:02d}"] = lp
    result = TrainResult(paths, outputs, {"copies": copies, "start_epoch": start_epoch})
    t0 = start_epoch if start_epoch is not None else DEFAULT_START_FRACTION * recipes[0].epochs
    caption = (f"late-phase: each member trained alone, with {copies} copies of its BatchNorm layers and head from "
               f"epoch {t0:g}, then collapsed into one model (the member's row)")
    return finish_run(result, job, final=final and len(paths) >= 2, caption=caption,
                      names=[f"{p.stem} (collapsed)" for p in paths], members_label="collapsed members",
                      average_label="uniform soup (average.safetensors)")
