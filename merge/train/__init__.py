"""Training the diverse members that merge well: recipes, the lockstep loop, callbacks, the method registry.

Laid out like :mod:`merge.ops`: :mod:`merge.train.registry` defines the job, the result and the registry
(and imports no method); each method is a module that registers itself when imported here
(``independent``, ``papa``/``papa-all``/``papa-2``, ``starsse``/``sse``, ``late-phase``, ``subspace``,
``hyper-ensemble``/``hyper-deep``); :mod:`merge.train.kit` is what every method uses (resolve a job,
build, record, save and resume members), :mod:`merge.train.members` the two loops that write members,
and :mod:`merge.train.report` the final model and its table.

A new method is one module with one registered function (options declared as
:class:`~merge.params.Param`) imported below; ``papa-merge train --method NAME`` derives its flags from
the declaration.

Example:
    >>> from merge.train import list_methods
    >>> "papa" in list_methods() and "independent" in list_methods()
    True
    >>> paths = train_members(3, model="small_cnn", data="digits", out_dir="ckpts/")  # doctest: +SKIP
"""

from merge.train.distributed import PopulationGroup, member_blocks, population_group
from merge.train.kit import Prepared, check_resumable, evaluate_model, member_path, prepare
from merge.train.loop import Callback, TrainState, fit, make_optimizer, make_scheduler, mix_batch, soft_cross_entropy
from merge.train.members import train_member, train_population
from merge.train.recipe import (
    DIVERSITY,
    PAPA_CHOICES,
    Recipe,
    default_recipe,
    default_search_space,
    diverse_recipes,
    papa_grid,
    sample_recipes,
)
from merge.train.registry import (
    TRAINING_METHODS,
    TrainingMethod,
    TrainJob,
    TrainResult,
    get_method,
    list_methods,
    methods_taking,
    register_method,
    run_method,
    train_members,
)
from merge.train.report import final_model, final_rows

# The methods, in --list-methods order of their modules; each registers itself on import.
from merge.train.independent import train_independent  # independent
from merge.train.papa import (  # papa, papa-all, papa-2
    PAPA,
    PopulationMix,
    draw_pairs,
    mix_matrix,
    mix_population,
    pull_to_average,
    repair_batches,
)
from merge.train.starsse import train_branches  # starsse, sse
from merge.train.late_phase import (  # late-phase
    LatePhaseNet,
    LatePhaseOptimizer,
    LatePhaseSchedule,
    late_phase_modules,
    late_phase_parameters,
    train_late_phase_member,
)
from merge.train.subspace import Subspace, SubspaceLine, SubspacePenalty, train_subspace  # subspace
from merge.train.hyper import train_hyper_deep, train_hyper_ensemble  # hyper-ensemble, hyper-deep

__all__ = [
    "Recipe",
    "sample_recipes",
    "diverse_recipes",
    "default_recipe",
    "default_search_space",
    "train_member",
    "train_members",
    "train_population",
    "train_independent",
    "evaluate_model",
    "member_path",
    "prepare",
    "Prepared",
    "check_resumable",
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
    "train_hyper_ensemble",
    "train_hyper_deep",
    "late_phase_parameters",
    "pull_to_average",
    "PopulationMix",
    "mix_population",
    "mix_matrix",
    "draw_pairs",
    "repair_batches",
    "final_model",
    "final_rows",
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
    "methods_taking",
    "run_method",
]
