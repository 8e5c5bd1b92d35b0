"""PAPA: population parameter averaging (Jolicoeur-Martineau et al., "PopulAtion Parameter Averaging
(PAPA)", TMLR 2024; code SamsungSAILMontreal/PAPA, main.py and recombine/).

A population of members trains in lockstep, each with its own initialisation, data order and
regularisation, and is kept close to its own average so that the average works as one model:

- ``papa`` (the paper's PAPA, first called PAPA-gradual; :class:`PAPA`): every ``every`` optimizer
  steps each member is pulled toward the population's average, ``w_i <- a_t * w_i + (1 - a_t) * mean(w)``,
  floating buffers (BatchNorm statistics) included, counters (``num_batches_tracked``) left alone. With
  ``lr_scaling="linear"`` (the reference's default) the pull shrinks with the learning rate,
  ``1 - a_t = (1 - alpha) * lr_t / lr_0``, so a cosine schedule does not collapse the population onto its
  average at the end. ``alpha`` is 0.99 from scratch and 0.9995 fine-tuning (``every=10``).
- ``papa-all`` (:class:`PopulationMix`, ``mode="all"``): every ``every`` epochs every member is replaced
  by the average; ``papa-2`` (``mode="pairs"``): every member is replaced by the 50/50 average of a
  randomly drawn pair. Each mix is followed by REPAIR (:mod:`merge.repair`: BatchNorm statistics reset
  on a few training batches, or REPAIR proper for convolutional networks without BatchNorm). Mixes
  happen at the end of epochs ``0, E, 2E, ...`` (epoch 0 as the reference's ``mix_from_start``) and never
  at the end of the last epoch.
- The final model (:func:`merge.train.report.final_model`): the population's average with BatchNorm statistics
  recomputed (``papa.safetensors``) and the greedy soup of the members, reported beside the members and their
  prediction ensemble on val and test.

Deliberate differences from the reference code, each a decision:

- The pull is ``torch._foreach_lerp_`` toward one float32 running mean (timm's EMA does the same), not a
  state-dict rebuild; integer buffers are not averaged (the reference averages and truncates
  ``num_batches_tracked``).
- REPAIR after a mix (:mod:`merge.repair`): convolutions that feed a BatchNorm are left as mixed and only
  the BatchNorm is reset (REPAIR of such a convolution is undone by the reset); convolutions that feed no
  BatchNorm are REPAIRed in the same pass. The reset batches are the same unaugmented training batches for
  every member (the reference forwards each member's own mixup-transformed
  batches), so PAPA-all leaves every member identical.
- PAPA-2 draws its K pairs uniformly among all K(K-1)/2 pairs, as the reference's comment says ("select
  n_pop random pairs"); its code indexes ``randperm(n_pop)`` into the lexicographic list of pairs, so it only
  ever draws among the first K of them (for K = 5: (0,1) (0,2) (0,3) (0,4) (1,2)).
- The final report's ensemble averages the members' probabilities (the project's ensemble everywhere);
  the reference averages logits.
- Populations scale out with ``torchrun`` and an all-reduce (:mod:`merge.train.distributed`); the
  reference gathers every network on GPU 0 at each mix and cannot distribute the gradual pull.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from merge.bn import recompute_bn
from merge.errors import InvalidArgumentError, WeakPullWarning
from merge.models import make_loader
from merge.models.loaders import to_device
from merge.params import Param
from merge.repair import ChannelStats, channel_stats, repair, repair_targets, statistics_fix
from merge.train.distributed import PopulationGroup, population_group, rank_device
from merge.train.kit import member_path, prepare
from merge.train.loop import Callback, TrainState
from merge.train.members import train_population
from merge.train.registry import TrainJob, TrainResult, register_method
from merge.train.report import final_model, warn_weak_members

__all__ = ["PAPA", "PopulationMix", "pull_to_average", "mix_population", "draw_pairs", "mix_matrix",
           "repair_batches", "train_papa", "train_papa_all", "train_papa_2", "PAPA_CITATION",
           "LR_SCALING", "WEAK_PULL", "WeakPullWarning"]

PAPA_CITATION = ("Jolicoeur-Martineau et al., 2024. PopulAtion Parameter Averaging (PAPA). TMLR; code "
                 "SamsungSAILMontreal/PAPA")
LR_SCALING = ("linear", "none")


def _floating(model: nn.Module, buffers: bool = True) -> list[Tensor]:
    """The tensors a pull or a mix averages: floating parameters, then floating buffers, in module order."""
    out = [p.data for p in model.parameters() if p.is_floating_point()]
    if buffers:
        out += [b for b in model.buffers() if b.is_floating_point()]
    return out


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # float32 at least, float64 stays float64


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgumentError(f"PAPA alpha must be in [0, 1], got {alpha}", option="alpha")


@torch.no_grad()
def pull_to_average(models: Sequence[nn.Module], alpha: float, *, buffers: bool = True,
                    group: PopulationGroup | None = None) -> None:
    """``w_i <- alpha * w_i + (1 - alpha) * mean(w)`` for every floating parameter (and buffer) of every member.

    The mean is accumulated in float32 (float64 tensors in float64) and, across processes, is one
    all-reduce of the local sums; each member then moves toward it with ``torch._foreach_lerp_``.
    ``alpha=0`` replaces every member by the average; ``alpha=1`` leaves every member as it was, bit for bit.

    Args:
        models: this process's members (all of the population in a single process).
        alpha: the share of each member kept.
        buffers: average floating buffers (BatchNorm statistics) too, as the paper does.
        group: the population across processes (default: ``models`` are the whole population).

    Raises:
        InvalidArgumentError: ``alpha`` outside [0, 1].

    Example:
        >>> a, b = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        >>> _ = a.weight.data.fill_(0.0), b.weight.data.fill_(1.0)
        >>> pull_to_average([a, b], 0.9)
        >>> round(a.weight.item(), 4), round(b.weight.item(), 4)
        (0.05, 0.95)
    """
    _check_alpha(alpha)
    group = group or PopulationGroup(len(models))
    members = [_floating(m, buffers) for m in models]
    means = [t.to(_acc_dtype(t), copy=True) for t in members[0]]
    for other in members[1:]:
        torch._foreach_add_(means, [t.to(m.dtype) for t, m in zip(other, means)])
    group.all_reduce_sum_(means)
    torch._foreach_div_(means, float(group.size))
    weight = 1.0 - alpha
    same = [j for j, (t, m) in enumerate(zip(members[0], means)) if t.dtype == m.dtype]
    other_idx = [j for j in range(len(means)) if j not in set(same)]
    for ts in members:
        if same:
            torch._foreach_lerp_([ts[j] for j in same], [means[j] for j in same], weight)
        for j in other_idx:  # bf16/fp16 members: lerp in float32, cast back once
            ts[j].copy_(ts[j].to(means[j].dtype).lerp_(means[j], weight))


class PAPA(Callback):
    """PAPA (gradual): pull every member toward the population average every ``every`` optimizer steps.

    As the reference loop does, the pull follows the optimizer and scheduler step of the steps whose
    index within the epoch is a multiple of ``every`` (0, 10, 20, ... of every epoch), and with
    ``lr_scaling="linear"`` uses ``1 - a_t = (1 - alpha) * lr_t / lr_0``, where ``lr_t`` is the learning
    rate the schedule has just set (member 0's) and ``lr_0`` the recipe's peak learning rate.

    Args:
        every: optimizer steps between pulls (the paper's 10).
        alpha: how much of each member is kept at full learning rate (0.99 from scratch, 0.9995 fine-tuning).
        lr_scaling: ``linear`` (the reference's default) or ``none`` (a constant ``alpha``).
        buffers: average floating buffers (BatchNorm statistics) too, as the paper does.
        group: the population across processes (default: this process holds all of it).

    Attributes:
        pulls: pulls made in the last run.
        history: ``(step, a_t)`` of every pull of the last run.

    Example:
        >>> from merge.train import train_population, diverse_recipes
        >>> train_population(diverse_recipes(4, diversity="augment"), model="small_cnn", data="digits",
        ...                  out_dir="papa/", callbacks=[PAPA(every=10, alpha=0.99)])  # doctest: +SKIP
    """

    def __init__(self, *, every: int = 10, alpha: float = 0.99, lr_scaling: str = "linear", buffers: bool = True,
                 group: PopulationGroup | None = None):
        if every < 1:
            raise InvalidArgumentError(f"PAPA every must be >= 1 step, got {every}", option="every")
        _check_alpha(alpha)
        if lr_scaling not in LR_SCALING:
            raise InvalidArgumentError(f"PAPA lr_scaling must be one of {', '.join(LR_SCALING)}, got {lr_scaling!r}",
                                       option="lr_scaling", choices=LR_SCALING)
        self.every, self.alpha, self.lr_scaling, self.buffers, self.group = every, alpha, lr_scaling, buffers, group
        self.pulls = 0
        self.history: list[tuple[int, float]] = []

    def alpha_at(self, state: TrainState) -> float:
        """The ``a_t`` of a pull made now."""
        if self.lr_scaling == "none":
            return self.alpha
        ratio = state.schedulers[0].get_last_lr()[0] / state.recipes[0].lr
        return 1.0 - (1.0 - self.alpha) * ratio

    def on_train_begin(self, state: TrainState) -> None:
        self.pulls, self.history = 0, []
        self._group = self.group or PopulationGroup(len(state.models))
        if len(self._group.indices) != len(state.models):
            raise InvalidArgumentError(f"PAPA: this process trains {len(state.models)} members but its group says "
                                       f"{len(self._group.indices)}")

    def on_step_end(self, state: TrainState) -> None:
        in_epoch = state.step - 1 - state.epoch * state.steps_per_epoch
        if self._group.size > 1 and in_epoch % self.every == 0:
            a_t = self.alpha_at(state)
            pull_to_average(state.models, a_t, buffers=self.buffers, group=self._group)
            self.pulls += 1
            self.history.append((state.step, a_t))

    def summary(self) -> dict[str, Any]:
        """What the last run did, as recorded in each member's ``papa_merge.train`` under ``papa``.

        ``pull_shrink`` is how much the pulls alone shrank each member's distance to the average over
        the run (the product of the a_t): near 1, the pull did no work in this budget; the paper's 300
        CIFAR epochs (every 10, alpha 0.99) take it to about e^-100.
        """
        return {"every": self.every, "alpha": self.alpha, "lr_scaling": self.lr_scaling, "buffers": self.buffers,
                "pulls": self.pulls, "pull_shrink": math.prod(a for _, a in self.history),
                "alpha_last": self.history[-1][1] if self.history else None}

    def on_train_end(self, state: TrainState) -> None:
        state.log["papa"] = self.summary()


# ------------------------------------------------------------------------------------------------------
# PAPA-all and PAPA-2: replace members by averages every few epochs, then REPAIR.

# A population from its own initialisations whose pulls shrank members' distance to the average by less than this
# (the product of the a_t) was not held together: its average likely fails (benchmarks/results/bench_papa.md).
WEAK_PULL = 0.05


MIX_MODES = ("all", "pairs")


def draw_pairs(k: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """PAPA-2's pairs: member i becomes the average of pair i; K distinct pairs among all K(K-1)/2.

    With two members there is one pair, and both members become its average (as in the reference).

    Example:
        >>> draw_pairs(2, np.random.default_rng(0))
        [(0, 1), (0, 1)]
    """
    if k < 2:
        raise InvalidArgumentError(f"PAPA-2 averages pairs of members; need at least 2, got {k}", option="members")
    if k == 2:
        return [(0, 1), (0, 1)]
    pairs = list(itertools.combinations(range(k), 2))
    return [pairs[int(j)] for j in rng.choice(len(pairs), size=k, replace=False)]


def mix_matrix(mode: str, k: int, *, pairs: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """``W`` (float64 ``[K, K]``): after a mix, member i is ``sum_j W[i, j] * member_j``.

    ``all``: every row uniform (PAPA-all). ``pairs``: row i is 1/2 at the two members of ``pairs[i]`` (PAPA-2).
    """
    if mode == "all":
        return torch.full((k, k), 1.0 / k, dtype=torch.float64)
    if mode == "pairs":
        if pairs is None or len(pairs) != k:
            got = None if pairs is None else len(pairs)
            raise InvalidArgumentError(f"PAPA-2 needs one pair per member ({k}), got {got}")
        w = torch.zeros(k, k, dtype=torch.float64)
        for i, (a, b) in enumerate(pairs):
            w[i, a] += 0.5
            w[i, b] += 0.5
        return w
    raise InvalidArgumentError(f"mix mode must be one of {', '.join(MIX_MODES)}, got {mode!r}", option="mode",
                               choices=MIX_MODES)


def _flat(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _unflat_into(tensors: Sequence[Tensor], flat: Tensor) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def _gather_stats(local: Sequence[ChannelStats], group: PopulationGroup) -> list[ChannelStats]:
    """Every member's REPAIR statistics, from each process's own members."""
    template = local[0]
    rows = torch.stack([torch.cat([torch.cat([m, s]) for m, s in st]) for st in local])
    every = group.all_gather_rows(rows) if group.distributed else rows
    out = []
    for row in every:
        st, offset = [], 0
        for m, _s in template:
            n = m.numel()
            st.append((row[offset:offset + n], row[offset + n:offset + 2 * n]))
            offset += 2 * n
        out.append(st)
    return out


@torch.no_grad()
def mix_population(models: Sequence[nn.Module], weights: Tensor, *, batches: Sequence[Any] = (),
                   device: str | torch.device = "cpu", group: PopulationGroup | None = None,
                   buffers: bool = True) -> str:
    """Replace each member by a weighted average of the population, then give it its statistics back (REPAIR).

    Args:
        models: this process's members.
        weights: ``[K, K]``: member i becomes ``sum_j weights[i, j] * member_j`` (:func:`mix_matrix`).
        batches: a few training batches for the statistics fix (:func:`repair_batches`; the reference uses 5).
            Without batches, no fix is made (BatchNorm statistics are then mixed like the weights).
        device: where the batches go.
        group: the population across processes (default: ``models`` are all of it).
        buffers: mix floating buffers too (before any reset).

    Returns:
        The fix applied after the mix (:func:`merge.repair.statistics_fix`): ``batchnorm``, ``repair``,
        ``none``, or ``skipped`` without batches.

    Raises:
        InvalidArgumentError: ``weights`` is not ``[K, K]``.
    """
    group = group or PopulationGroup(len(models))
    k = group.size
    if tuple(weights.shape) != (k, k):
        raise InvalidArgumentError(f"mix weights must be [{k}, {k}] for {k} members, got {tuple(weights.shape)}")
    kind = statistics_fix(models[0]) if batches else "skipped"
    # 1. REPAIR's goals come from the parents, so measure them before anything is overwritten.
    stats = None
    if kind == "repair":
        stats = _gather_stats([channel_stats(m, batches, device=device) for m in models], group)
    # 2. The mix: one flat vector per member; a uniform mix needs only the sum (an all-reduce across processes).
    tensors = [_floating(m, buffers) for m in models]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors[0]) else torch.float32
    local = torch.stack([_flat(ts, dtype) for ts in tensors])
    rows = weights[group.indices]
    if torch.all(weights == weights[0, 0]):
        total = local.sum(0)
        group.all_reduce_sum_([total])
        children = (total / k).expand(len(models), -1)
    else:
        everyone = group.all_gather_rows(local) if group.distributed else local
        children = rows.to(dtype=dtype, device=everyone.device) @ everyone
    for ts, child in zip(tensors, children):
        _unflat_into(ts, child)
    # 3. The statistics fix, member by member, on the same batches.
    for i, m in zip(group.indices, models):
        if kind == "batchnorm":
            recompute_bn(m, batches, device=device)
        elif kind == "repair":
            parents = [j for j in range(k) if weights[i, j] != 0]
            repair(m, repair_targets([stats[j] for j in parents], [float(weights[i, j]) for j in parents]), batches,
                   device=device)
    return kind


class PopulationMix(Callback):
    """PAPA-all (``mode="all"``) and PAPA-2 (``mode="pairs"``): mix the population every ``every`` epochs.

    At the end of epoch ``e`` (0-based) the population is mixed when ``e % every == 0``, except at
    ``e = 0`` without ``mix_from_start``, and never at the end of the last epoch (the reference:
    ``epoch % every_k_epochs == 0 and (epoch > 0 or mix_from_start)``, no mix when
    ``epoch == EPOCHS - 1``). Each mix is followed by REPAIR on ``batches`` (:func:`mix_population`).
    Members keep their optimizer state, data order and regularisation; only their weights change.

    Args:
        mode: ``all`` or ``pairs``.
        every: epochs between mixes (the reference's ``every_k_epochs``, 5 by default there).
        batches: training batches for REPAIR (:func:`repair_batches`).
        mix_from_start: also mix at the end of epoch 0 (the reference's default).
        seed: seeds PAPA-2's pair draws (the same on every process).
        group: the population across processes.

    Attributes:
        mixes: ``{"epoch", "fix", "pairs"}`` of every mix of the last run.
    """

    def __init__(self, *, mode: str, every: int = 5, batches: Sequence[Any] = (), mix_from_start: bool = True,
                 seed: int = 0, group: PopulationGroup | None = None):
        if mode not in MIX_MODES:
            raise InvalidArgumentError(f"mix mode must be one of {', '.join(MIX_MODES)}, got {mode!r}",
                                       option="mode", choices=MIX_MODES)
        if every < 1:
            raise InvalidArgumentError(f"mix_every must be >= 1 epoch, got {every}", option="mix_every")
        self.mode, self.every, self.batches = mode, every, list(batches)
        self.mix_from_start, self.seed, self.group = mix_from_start, seed, group
        self.mixes: list[dict[str, Any]] = []

    def due(self, state: TrainState) -> bool:
        """Whether the epoch that just ended is followed by a mix."""
        if state.step >= state.total_steps or state.stop:
            return False  # the last epoch is never mixed
        return state.epoch % self.every == 0 and (state.epoch > 0 or self.mix_from_start)

    def on_train_begin(self, state: TrainState) -> None:
        self.mixes = []
        self._group = self.group or PopulationGroup(len(state.models))

    def on_epoch_end(self, state: TrainState) -> None:
        if self._group.size < 2 or not self.due(state):
            return
        pairs = None
        if self.mode == "pairs":
            pairs = draw_pairs(self._group.size, np.random.default_rng([self.seed, 2, len(self.mixes)]))
        weights = mix_matrix(self.mode, self._group.size, pairs=pairs)
        fix = mix_population(state.models, weights, batches=self.batches, device=state.device, group=self._group)
        self.mixes.append({"epoch": state.epoch, "fix": fix, "pairs": pairs})

    def summary(self) -> dict[str, Any]:
        """What the last run did, as recorded in each member's ``papa_merge.train`` under ``papa_mix``."""
        return {"mode": self.mode, "every": self.every, "mix_from_start": self.mix_from_start,
                "repair_batches": len(self.batches), "mixes": self.mixes}

    def on_train_end(self, state: TrainState) -> None:
        state.log["papa_mix"] = self.summary()


def repair_batches(splits: Any, spec: Mapping[str, Any], *, batch_size: int, num_batches: int = 5, seed: int = 0,
                   device: str | torch.device = "cpu") -> list[tuple[Any, Tensor]]:
    """``num_batches`` unaugmented training batches, drawn with ``seed``, on ``device``: REPAIR's data.

    The same batches serve every mix and every member (and every process), so a mix does not depend
    on which process holds which member.
    """
    if num_batches < 1:
        raise InvalidArgumentError(f"repair_batches must be a positive number of batches, got {num_batches}",
                                   option="repair_batches")
    train = splits.train
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(train), generator=g)[: num_batches * batch_size].tolist()
    subset = Subset(train, rows)
    subset.kind = getattr(train, "kind", None)  # make_loader reads the data kind from the dataset
    return [(to_device(x, device), y.to(device)) for x, y in make_loader(subset, spec, batch_size=batch_size)]


_repair_batches = repair_batches  # the methods' option of the same name shadows it


# ------------------------------------------------------------------------------------------------------
# The registry's entries: papa, papa-all, papa-2.


def _default_alpha(job: TrainJob) -> float:
    return 0.9995 if job.pretrained or job.arch.startswith("hf:") else 0.99


def _run_population(job: TrainJob, method: str, make_callbacks: Any, record: dict[str, Any], *, final: bool,
                    final_bn_batches: int) -> TrainResult:
    """Train the population (this process's block of it under ``torchrun``), then the final model on rank 0."""
    if job.init is not None:
        raise InvalidArgumentError(f"a {method} population starts from its members' own initialisations; drop init",
                                   option="init")
    # A missing GPU fails before the data is loaded; under torchrun each rank takes its own GPU.
    ready = prepare(job, device=rank_device(job.device))
    recipes, device, splits, spec = ready.recipes, ready.device, ready.splits, ready.spec
    started = time.perf_counter()
    with population_group(len(recipes), device=device) as group:
        ours = make_callbacks(group, splits, spec, recipes, device)
        callbacks = [*ours, *job.callbacks]
        mine = train_population([recipes[i] for i in group.indices], model=spec, data=splits, out_dir=job.out_dir,
                                method=method, callbacks=callbacks, pretrained=job.pretrained, device=device,
                                progress=job.progress and group.is_main, eval_batch_size=job.eval_batch_size,
                                force=job.force, indices=group.indices, population=len(recipes))
        trained = time.perf_counter() - started
        for i, p in zip(group.indices, mine):
            job.member_done(i, p)
        group.barrier()  # every member is on disk before rank 0 averages them
        paths = [member_path(job.out_dir, i, arch=spec["arch"]) for i in range(len(recipes))]
        outputs: dict[str, Path] = {}
        report: dict[str, Any] = {"method": method, "rank": group.rank, "world": group.world,
                                  "members": [str(p) for p in mine], "train_seconds": round(trained, 3),
                                  "training": [cb.summary() for cb in ours]}
        if group.is_main and final:
            outputs, final_report = final_model(paths, out_dir=job.out_dir, data=splits,
                                                recompute_bn=final_bn_batches, batch_size=job.eval_batch_size,
                                                device=device, recipe={"method": method, **record,
                                                                       "world": group.world})
            report.update(final_report)
            report["members"] = final_report["members"]
            report["caption"] = (f"{method}: {len(paths)} members trained together as one population, then their "
                                 f"average and greedy soup\nmetrics: {final_report['scoring']}")
        if group.is_main:
            warn_weak_members(paths, stacklevel=4)
        group.barrier()  # the other ranks return once the population's outputs exist
    return TrainResult(paths, outputs, report)


# The options every population method shares: its final model.
_FINAL_PARAMS = (
    Param("final", True, bool, help="write the population's average and greedy soup, and the final table"),
    Param("final_bn_batches", 20, int, low=1,
          help="training batches for the BatchNorm recalibration of the final soups"),
)


@register_method("papa", citation=PAPA_CITATION,
                 summary="a population pulled toward its average every k steps (PAPA, gradual), then its "
                         "average and greedy soup",
                 params=[Param("every", 10, int, low=1, help="optimizer steps between pulls"),
                         Param("alpha", None, float, low=0.0, high=1.0,
                               help="share of each member kept at a pull (default: 0.99 from scratch, 0.9995 "
                                    "from pretrained weights)"),
                         Param("lr_scaling", "linear", str, choices=LR_SCALING,
                               help="scale the pull with the learning rate, 1-a_t = (1-alpha) lr_t/lr_0 "
                                    "(linear), or keep alpha (none)"),
                         *_FINAL_PARAMS])
def train_papa(job: TrainJob, *, every: int = 10, alpha: float | None = None, lr_scaling: str = "linear",
               final: bool = True, final_bn_batches: int = 20) -> TrainResult:
    """A PAPA population: members trained together and pulled toward their average every ``every`` steps.

    Args:
        job: what to train (``members`` >= 2 for a population; under ``torchrun`` each process trains a
            block of them).
        every: optimizer steps between pulls (10).
        alpha: share of each member kept per pull at full learning rate (default 0.99 from scratch,
            0.9995 from pretrained weights, the paper's values).
        lr_scaling: ``linear`` (``1 - a_t = (1 - alpha) * lr_t / lr_0``, the reference's default) or ``none``.
        final: write ``papa.safetensors`` and ``greedy.safetensors`` and the report (:func:`final_model`).
        final_bn_batches: training batches for the final BatchNorm recalibration.

    Returns:
        :class:`TrainResult`: the members, ``outputs={"average", "greedy"}`` and the report (its
        ``table``) on rank 0.

    Example:
        >>> from merge.train import TrainJob, run_method
        >>> r = run_method("papa", TrainJob(model="small_cnn", data="mnist", out_dir="papa", members=4,
        ...                                 diversity="augment", limit=5000))  # doctest: +SKIP
        >>> print(r.report["table"])  # doctest: +SKIP
    """
    alpha = _default_alpha(job) if alpha is None else alpha
    _check_alpha(alpha)
    callback = PAPA(every=every, alpha=alpha, lr_scaling=lr_scaling)  # validates before any data is loaded

    def make(group: PopulationGroup, *_: Any) -> list[Callback]:
        callback.group = group
        return [callback]

    result = _run_population(job, "papa", make, {"every": every, "alpha": alpha, "lr_scaling": lr_scaling},
                             final=final, final_bn_batches=final_bn_batches)
    shrink = callback.summary()["pull_shrink"]
    # (A population found on disk was not trained by this call: its pulls are not this run's, so nothing to say.)
    if callback.pulls and shrink > WEAK_PULL and job.pretrained is None and job.init is None and callback.group.is_main:
        # The fix that applies to this run: pull every step first; already there, a smaller alpha or more steps.
        fix = ("for a short run, pull every step with a smaller alpha (every=1, alpha=0.95)"
               if every > 1 or alpha > 0.95 else f"pull harder (an alpha below {alpha:g}) or train for more steps")
        warnings.warn(f"PAPA's pulls shrank the members' distance to their average only to x{shrink:.2g} over this "
                      f"run ({callback.pulls} pulls, every {every} steps, alpha {alpha:g}); members from their own "
                      "initialisations need far more to average (the paper's 300 epochs reach about e^-100), so their "
                      f"average may fail: {fix}", WeakPullWarning, stacklevel=2)
    return result


def _mixing(mode: str, method: str):  # builds a registered function
    def run(job: TrainJob, *, mix_every: int = 5, mix_from_start: bool = True, repair_batches: int = 5,
            final: bool = True, final_bn_batches: int = 20) -> TrainResult:
        if job.members < 2:
            raise InvalidArgumentError(f"{method} mixes a population; ask for at least 2 members", option="members")
        PopulationMix(mode=mode, every=mix_every)  # validates before any data is loaded
        if repair_batches < 1:
            raise InvalidArgumentError(f"repair_batches must be >= 1, got {repair_batches}", option="repair_batches")

        def make(group: PopulationGroup, splits: Any, spec: Mapping[str, Any], recipes: Sequence[Any],
                 device: torch.device) -> list[Callback]:
            batches = _repair_batches(splits, spec, batch_size=recipes[0].batch_size, num_batches=repair_batches,
                                      seed=job.seed, device=device)
            return [PopulationMix(mode=mode, every=mix_every, batches=batches, mix_from_start=mix_from_start,
                                  seed=job.seed, group=group)]

        return _run_population(job, method, make, {"mix_every": mix_every, "mix_from_start": mix_from_start,
                                                   "repair_batches": repair_batches},
                               final=final, final_bn_batches=final_bn_batches)

    return run


_MIX_PARAMS = (
    Param("mix_every", 5, int, low=1, help="epochs between mixes (never after the last epoch)"),
    Param("mix_from_start", True, bool, help="also mix after the first epoch"),
    Param("repair_batches", 5, int, low=1, help="training batches for REPAIR (BatchNorm reset) after each mix"),
    *_FINAL_PARAMS,
)

train_papa_all = register_method(
    "papa-all", citation=PAPA_CITATION, params=_MIX_PARAMS,
    summary="every E epochs every member becomes the population average, then REPAIR (PAPA-all)",
)(_mixing("all", "papa-all"))
train_papa_all.__doc__ = """PAPA-all: every ``mix_every`` epochs every member is replaced by the average, then REPAIR.

Options: ``mix_every`` (epochs, 5), ``mix_from_start`` (also after epoch 0, True), ``repair_batches`` (5),
``final``, ``final_bn_batches`` as for ``papa``.
"""
train_papa_2 = register_method(
    "papa-2", citation=PAPA_CITATION, params=_MIX_PARAMS,
    summary="every E epochs every member becomes the average of a random pair, then REPAIR (PAPA-2)",
)(_mixing("pairs", "papa-2"))
train_papa_2.__doc__ = """PAPA-2: every ``mix_every`` epochs member i becomes the 50/50 average of a random pair,
then REPAIR.

Options as for ``papa-all``.
"""
