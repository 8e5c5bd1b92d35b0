"""Per-tensor merge operators and their registry.

An operator is a pure function of the members' tensors of one name (and of a base model's, for
the methods that take one): no I/O, no state. It is registered under a name that works the same in
the CLI (``--method``), in recipe files (``merge_method``), in Python and in the tests, which are
generated from this registry. See :mod:`merge.ops.registry` for the contract (typed parameters,
base policy, how the engine streams each operator) and the modules for the operators:

- :mod:`merge.ops.linear`: ``uniform``, ``weighted`` (alias ``linear``);
- :mod:`merge.ops.task`: ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``,
  ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``;
- :mod:`merge.ops.sphere`: ``slerp``, ``multislerp``, ``karcher``, ``model_stock``;
- :mod:`merge.ops.svd`: ``tsv``, ``iso_c``, ``iso_cts``;
- :mod:`merge.ops.mergekit_methods`: ``passthrough``, ``nuslerp``, ``sce``, ``ram``, ``ramplus_tl``,
  ``nearswap``, ``arcee_fusion``.

Example:
    >>> import torch
    >>> from merge.ops import get_operator
    >>> ties = get_operator("ties")
    >>> base = torch.zeros(4)
    >>> ties([torch.tensor([1., -2, 3, 0]), torch.tensor([1., 2, -1, 0])], base=base, density=1.0).tolist()
    [1.0, 2.0, 3.0, 0.0]
"""

from merge.ops.registry import (
    ALIASES,
    OPERATORS,
    REQUIRED,
    Combination,
    Operator,
    Param,
    Resolved,
    check_weights,
    get_operator,
    list_operators,
    normalised_weights,
    register,
    resolve_params,
)
from merge.ops import linear as _linear  # noqa: F401 - registers uniform, weighted
from merge.ops import task as _task  # noqa: F401 - registers the task-vector methods
from merge.ops import sphere as _sphere  # noqa: F401 - registers slerp, multislerp, karcher, model_stock
from merge.ops import mergekit_methods as _mergekit  # noqa: F401 - passthrough, nuslerp, sce, ram, nearswap, ...
from merge.ops import svd as _svd  # noqa: F401 - registers tsv, iso_c, iso_cts (the tensor path)
from merge.ops import data as _data  # noqa: F401 - registers regmean, fisher, adamerging (they need data)

__all__ = ["Operator", "Param", "Combination", "Resolved", "REQUIRED", "register", "get_operator", "list_operators",
           "OPERATORS", "ALIASES", "resolve_params", "check_weights", "normalised_weights"]
