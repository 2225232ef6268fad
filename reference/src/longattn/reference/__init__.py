"""longattn.reference: the float64 numpy oracle every longattn method is checked against.

Dense, obviously correct and slow. Imports numpy only, never another longattn package.
Tensors are BSHD numpy arrays: q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]``; ``lse`` is
``[B, Hq, Sq]`` (natural log, ``-inf`` for a row that sees no key).
"""

from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _version

try:
    __version__ = _version("longattn-reference")
except _NotInstalled:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

from longattn.reference.attention import attention, attention_backward
from longattn.reference.masks import (
    and_masks,
    causal_mask,
    document_mask,
    or_masks,
    random_mask,
    sink_mask,
    window_mask,
)
from longattn.reference.tree import tree_combine

__all__ = [
    "attention",
    "attention_backward",
    "and_masks",
    "causal_mask",
    "document_mask",
    "or_masks",
    "random_mask",
    "sink_mask",
    "window_mask",
    "tree_combine",
]

try:  # algorithm references added by the paper issues; absent until they land
    from longattn.reference.dilated import dilated_attention  # noqa: F401

    __all__.append("dilated_attention")
except ImportError:  # pragma: no cover
    pass
try:
    from longattn.reference.hyper import hyper_attention  # noqa: F401

    __all__.append("hyper_attention")
except ImportError:  # pragma: no cover
    pass
