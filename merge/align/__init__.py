"""Permutation alignment of members trained from different initialisations (Git Re-Basin), then REPAIR.

:mod:`merge.align.permute` holds the algorithm on models and state dicts (traced permutation specs,
weight matching, activation matching); :mod:`merge.align.checkpoints` applies it to checkpoints: the
aligned members written to a folder (:func:`write_aligned`) or merged in memory (:func:`soup_aligned`).
"""

from merge.align.checkpoints import AlignedMembers, align_checkpoints, soup_aligned, write_aligned
from merge.align.permute import (
    ALIGN_CITATION,
    ALIGN_METHODS,
    AlignResult,
    PermutationSpec,
    activation_matching,
    align,
    apply_permutation,
    linear_assignment,
    permutation_spec,
    random_permutation,
    weight_matching,
)

__all__ = ["PermutationSpec", "AlignResult", "AlignedMembers", "permutation_spec", "apply_permutation",
           "random_permutation", "weight_matching", "activation_matching", "linear_assignment", "align",
           "align_checkpoints", "write_aligned", "soup_aligned", "ALIGN_METHODS", "ALIGN_CITATION"]
