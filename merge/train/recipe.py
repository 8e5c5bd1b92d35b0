"""Recipes: the hyperparameters of one member, and the ways to make a population of them diverse.

Diversity is what makes an ensemble (and, kept in one basin, a soup) better than its members:

- ``seed``: different initialisation and data order (deep ensembles);
- ``order``: same initialisation, different data order (the cheapest diversity; members stay close,
  which suits soups from one initialisation);
- ``augment``: each member gets its own combination of PAPA's regularisations (Jolicoeur-Martineau
  et al., 2023): mixup in {0, .5, 1} x label smoothing in {0, .05, .1} x CutMix in {0, .5, 1} x random
  erasing in {0, .15, .35}, the full grid of 81 shuffled with a seed and dealt out in order, as the
  reference code does (:func:`papa_grid`), so no two of up to 81 members share one;
- ``hparams``: random search over learning rate, weight decay, label smoothing... stratified across
  seeds (hyperparameter ensembles, Wenzel et al., 2020).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from merge.errors import InvalidArgumentError, UnknownNameError

__all__ = ["Recipe", "sample_recipes", "diverse_recipes", "default_search_space", "default_recipe",
           "DIVERSITY", "PAPA_CHOICES", "papa_grid"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
DIVERSITY = ("seed", "order", "augment", "hparams")
# The per-member regularisation choices of PAPA (Jolicoeur-Martineau et al., 2023, section 4).
PAPA_CHOICES: dict[str, list[float]] = {"mixup": [0.0, 0.5, 1.0], "label_smoothing": [0.0, 0.05, 0.1],
                                        "cutmix": [0.0, 0.5, 1.0], "random_erasing": [0.0, 0.15, 0.35]}


@dataclass(frozen=True)
class Recipe:
    """How one member is trained.

    Attributes:
        seed: initialises the network (and the mixup/CutMix draws).
        data_seed: the data order and augmentation draws.
        lr: peak learning rate (after ``warmup_epochs``).
        weight_decay: decoupled for AdamW, L2 for SGD; applied to weights, not to biases and norms.
        label_smoothing: mass spread uniformly over the classes.
        mixup, cutmix: Beta(alpha, alpha) concentrations; 0 turns each off. When both are on, each batch
            uses one of them, chosen with probability 1/2 (as timm does).
        random_erasing: probability of erasing one rectangle per image.
        crop, flip: random crop (pad 1/8, crop back) and horizontal flip.
        epochs, batch_size: the training length and batch.
        optimizer: ``sgd`` (momentum 0.9, Nesterov) or ``adamw``.
        momentum: SGD momentum.
        schedule: ``cosine`` (to zero) or ``constant`` after the warmup.
        warmup_epochs: linear warmup from zero (a float; 0 = none).
        grad_clip: clip the gradient norm to this (0 = off).
    """

    seed: int = 0
    data_seed: int = 0
    lr: float = 0.05
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    random_erasing: float = 0.0
    crop: bool = False
    flip: bool = False
    epochs: float = 1.0
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UnknownNameError("optimizer", self.optimizer, OPTIMIZERS)
        if self.schedule not in SCHEDULES:
            raise UnknownNameError("schedule", self.schedule, SCHEDULES)
        for name in ("lr", "epochs"):
            if not getattr(self, name) > 0:
                raise InvalidArgumentError(f"recipe {name} must be positive, got {getattr(self, name)}")
        if self.batch_size <= 0:
            raise InvalidArgumentError(f"recipe batch_size must be positive, got {self.batch_size}")
        for name in ("weight_decay", "mixup", "cutmix", "warmup_epochs", "grad_clip"):
            if getattr(self, name) < 0:
                raise InvalidArgumentError(f"recipe {name} must be >= 0, got {getattr(self, name)}")
        for name in ("label_smoothing", "random_erasing"):
            if not 0 <= getattr(self, name) < 1:
                raise InvalidArgumentError(f"recipe {name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def augment(self) -> dict[str, Any]:
        """The per-image augmentations, as :func:`merge.models.make_loader` takes them."""
        return {"crop": self.crop, "flip": self.flip, "random_erasing": self.random_erasing}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """The recipe in ``d``, ignoring keys that are not recipe fields (steps, method, ...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def default_recipe(arch: str, *, pretrained: bool = False, **overrides: Any) -> Recipe:
    """A sensible starting recipe for an architecture.

    From scratch: SGD lr 0.05, weight decay 5e-4. Fine-tuning a pretrained image model: SGD lr 0.01.
    A Hugging Face text model: AdamW lr 5e-5, weight decay 0.01, a 10% warmup (BERT-style).
    """
    if arch.startswith("hf:"):
        base = Recipe(lr=5e-5, weight_decay=0.01, optimizer="adamw", warmup_epochs=0.1, batch_size=32)
    elif pretrained:
        base = Recipe(lr=0.01, weight_decay=1e-4)
    else:
        base = Recipe()
    return dataclasses.replace(base, **overrides)


def default_search_space(base: Recipe) -> dict[str, Any]:
    """The hyperparameter-ensembles search space around ``base``.

    Each knob is drawn on the scale it acts on: learning rate log-uniform in [base/3, 3*base], weight
    decay log-uniform in [base/10, 10*base] (1e-5..1e-3 if base has none), label smoothing
    log-uniform in [1e-5, 0.2], the reference's range (google/uncertainty-baselines,
    hyperdeepensemble_configs/cifar10_rand_search_sweep.py: ``LS_RANGE``). Wenzel et al. search L2
    (per layer group, over four decades) and label smoothing; we search one weight decay over two
    decades around the recipe's, and the learning rate, the next most effective knob for fine-tuning.
    Dropout, where the model has it, is drawn by :mod:`merge.train.hyper` (it is a property of the
    network, not of the recipe).
    """
    wd = base.weight_decay or 1e-4
    return {"lr": ("log", base.lr / 3, base.lr * 3), "weight_decay": ("log", wd / 10, wd * 10),
            "label_smoothing": ("log", 1e-5, 0.2)}


def _draw(spec: Any, rng: np.random.Generator, name: str) -> Any:
    """One value from a search-space entry: a list of choices, ("log", lo, hi) or ("uniform", lo, hi)."""
    if isinstance(spec, tuple) and len(spec) == 3 and spec[0] in ("log", "uniform"):
        kind, lo, hi = spec
        if not lo <= hi or (kind == "log" and lo <= 0):
            raise InvalidArgumentError(f"search space {name}: bad range {spec}")
        if kind == "log":
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        return float(rng.uniform(lo, hi))
    if isinstance(spec, (list, tuple)) and spec:
        v = spec[int(rng.integers(len(spec)))]
        return v.item() if hasattr(v, "item") else v
    raise InvalidArgumentError(f"search space {name}: expected a non-empty list of choices or "
                               f"('log'|'uniform', low, high), got {spec!r}")


def sample_recipes(k: int, *, search_space: Mapping[str, Any] | None = None, seeds: Sequence[int] | None = None,
                   stratified: bool = True, seed: int = 0, base: Recipe | None = None) -> list[Recipe]:
    """Random hyperparameter search, stratified across random seeds (hyperparameter ensembles).

    Wenzel et al. (2020) draw hyperparameters at random and train each configuration with a random
    seed; stratifying makes every seed appear equally often (``k / len(seeds)`` configurations each,
    up to one), so weight diversity and hyperparameter diversity are both present in any subset the
    greedy selection keeps.

    Args:
        k: number of recipes.
        search_space: recipe field -> a list of choices, ``("log", lo, hi)`` or ``("uniform", lo, hi)``
            (default :func:`default_search_space` around ``base``).
        seeds: the training seeds to spread across (default ``range(k)``: every member its own seed).
        stratified: assign seeds round-robin in a shuffled order (True), or draw each independently.
        seed: the search's own random seed.
        base: the recipe whose other fields the samples keep.

    Returns:
        ``k`` recipes; ``seed`` and ``data_seed`` set from the assigned training seed.

    Raises:
        InvalidArgumentError: ``k`` < 1, no seeds, or a malformed search-space entry.
        UnknownNameError: a search-space key that is not a :class:`Recipe` field.

    Example:
        >>> rs = sample_recipes(4, seeds=[0, 1], search_space={"lr": ("log", 0.01, 0.1)})
        >>> sorted(r.seed for r in rs)
        [0, 0, 1, 1]
    """
    if k < 1:
        raise InvalidArgumentError(f"need at least one recipe, got k={k}")
    base = base or Recipe()
    space = dict(search_space if search_space is not None else default_search_space(base))
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"seed", "data_seed"}
    for name in space:
        if name not in fields:
            raise UnknownNameError("recipe field", name, sorted(fields))
    seeds = list(range(k)) if seeds is None else [int(s) for s in seeds]
    if not seeds:
        raise InvalidArgumentError("seeds is empty; pass at least one training seed")
    rng = np.random.default_rng(seed)
    if stratified:
        reps = -(-k // len(seeds))
        assigned = [s for _ in range(reps) for s in seeds][:k]
        assigned = [assigned[i] for i in rng.permutation(k)]
    else:
        assigned = [seeds[int(rng.integers(len(seeds)))] for _ in range(k)]
    out = []
    for s in assigned:
        values = {name: _draw(space[name], rng, name) for name in sorted(space)}
        out.append(dataclasses.replace(base, seed=s, data_seed=s, **values))
    return out


def papa_grid(k: int, *, seed: int = 0, choices: Mapping[str, Sequence[float]] | None = None) -> list[dict[str, float]]:
    """``k`` regularisation combinations dealt from PAPA's shuffled grid: distinct while ``k`` <= the grid's size.

    As the reference code (SamsungSAILMontreal/PAPA, main.py) does: build every combination of the
    choices (mixup x label smoothing x CutMix x random erasing, 3 x 3 x 3 x 3 = 81), shuffle the list
    once with a seed, and give member i combination ``i % len(grid)``. Drawing each member's values
    independently instead would let two members share a combination (at K = 10 with 81 combinations,
    a 44% chance).

    Args:
        k: number of members.
        seed: seeds the shuffle (the reference seeds Python's ``random.shuffle`` with its run seed).
        choices: recipe field -> its values (default :data:`PAPA_CHOICES`); the grid is their product,
            in the order given.

    Returns:
        ``k`` dicts of recipe field -> value, member 0 first.

    Raises:
        InvalidArgumentError: ``k`` < 1, an empty list of values.
        UnknownNameError: a key that is not a :class:`Recipe` field.

    Example:
        >>> combos = papa_grid(81, seed=0)
        >>> len({tuple(sorted(c.items())) for c in combos})
        81
    """
    if k < 1:
        raise InvalidArgumentError(f"need at least one member, got {k}")
    choices = dict(PAPA_CHOICES if choices is None else choices)
    fields = {f.name for f in dataclasses.fields(Recipe)}
    for name, values in choices.items():
        if name not in fields:
            raise UnknownNameError("recipe field", name, sorted(fields))
        if len(values) == 0:
            raise InvalidArgumentError(f"papa_grid: {name} has no values; give at least one")
    names = list(choices)
    grid = [dict(zip(names, (float(v) for v in combo))) for combo in itertools.product(*(choices[n] for n in names))]
    order = np.random.default_rng([seed, 7]).permutation(len(grid))
    return [dict(grid[order[i % len(grid)]]) for i in range(k)]


def diverse_recipes(k: int, *, diversity: str = "seed", base: Recipe | None = None, seed: int = 0,
                    search_space: Mapping[str, Any] | None = None) -> list[Recipe]:
    """``k`` recipes that differ in the way ``diversity`` names.

    Args:
        k: number of members.
        diversity: ``seed`` (init + data order), ``order`` (data order only), ``augment`` (a distinct
            combination of PAPA's regularisations per member, :func:`papa_grid`, plus init and data
            order) or ``hparams`` (:func:`sample_recipes`).
        base: the recipe the members start from.
        seed: member i uses training seed ``seed + i``; also seeds the random draws.
        search_space: for ``hparams``.

    Returns:
        ``k`` recipes, member 0 first.

    Raises:
        UnknownNameError: unknown ``diversity`` (lists the valid ones).
    """
    base = base or Recipe()
    if k < 1:
        raise InvalidArgumentError(f"need at least one member, got {k}")
    if diversity == "seed":
        return [dataclasses.replace(base, seed=seed + i, data_seed=seed + i) for i in range(k)]
    if diversity == "order":
        return [dataclasses.replace(base, seed=seed, data_seed=seed + i) for i in range(k)]
    if diversity == "augment":
        return [dataclasses.replace(base, seed=seed + i, data_seed=seed + i, **combo)
                for i, combo in enumerate(papa_grid(k, seed=seed))]
    if diversity == "hparams":
        return sample_recipes(k, search_space=search_space, seeds=[seed + i for i in range(k)], seed=seed, base=base)
    raise UnknownNameError("diversity", diversity, DIVERSITY)
