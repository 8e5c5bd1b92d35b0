"""Training the diverse members that merge well: recipes, the lockstep loop, callbacks, PAPA.

Example:
    >>> from merge.train import train_members
    >>> paths = train_members(3, model="small_cnn", data="digits", out_dir="ckpts/")  # doctest: +SKIP
"""

from merge.train.late_phase import (
    LatePhaseNet,
    LatePhaseOptimizer,
    LatePhaseSchedule,
    late_phase_modules,
    late_phase_parameters,
    train_late_phase_member,
)
from merge.train.loop import Callback, TrainState, fit, make_optimizer, make_scheduler, mix_batch, soft_cross_entropy
from merge.train.methods import (
    TRAINING_METHODS,
    TrainingMethod,
    TrainJob,
    TrainResult,
    get_method,
    list_methods,
    register_method,
    run_method,
)
from merge.train.members import (
    evaluate_model,
    member_path,
    train_member,
    train_members,
    train_population,
)
from merge.train.distributed import PopulationGroup, member_blocks, population_group
from merge.train.papa import (
    PAPA,
    PopulationMix,
    draw_pairs,
    final_model,
    mix_matrix,
    mix_population,
    pull_to_average,
    repair_batches,
)
from merge.train.starsse import train_branches
from merge.train.subspace import Subspace, SubspaceLine, SubspacePenalty, train_subspace
from merge.train.recipe import (
    DIVERSITY,
    PAPA_CHOICES,
    Recipe,
    papa_grid,
    default_recipe,
    default_search_space,
    diverse_recipes,
    sample_recipes,
)

__all__ = [
    "Recipe",
    "sample_recipes",
    "diverse_recipes",
    "default_recipe",
    "default_search_space",
    "train_member",
    "train_members",
    "train_population",
    "evaluate_model",
    "member_path",
    "fit",
    "TrainState",
    "Callback",
    "PAPA",
    "LatePhaseNet",
    "LatePhaseOptimizer",
    "LatePhaseSchedule",
    "late_phase_modules",
    "train_late_phase_member",
    "train_branches",
    "Subspace",
    "SubspaceLine",
    "SubspacePenalty",
    "train_subspace",
    "late_phase_parameters",
    "pull_to_average",
    "PopulationMix",
    "mix_population",
    "mix_matrix",
    "draw_pairs",
    "repair_batches",
    "final_model",
    "papa_grid",
    "PopulationGroup",
    "member_blocks",
    "population_group",
    "make_optimizer",
    "make_scheduler",
    "mix_batch",
    "soft_cross_entropy",
    "DIVERSITY",
    "PAPA_CHOICES",
    "TrainJob",
    "TrainResult",
    "TrainingMethod",
    "TRAINING_METHODS",
    "register_method",
    "get_method",
    "list_methods",
    "run_method",
]
