"""longattn.common: the shared parts every longattn method is built from.

Modules: ``kernels`` (the local attention step, its backends and their ``config=`` records;
``kernels.varlen`` for packed batches), ``merge`` (LSE merge of attention partials), ``dist``
(group resolution and the agreement protocol), ``comm`` (ring / all-to-all exchange with byte
counters), ``layout`` (local sequence slicing for contiguous / zigzag / striped layouts),
``dtypes`` (the accumulation-dtype rule), ``checks`` (argument validation naming the argument),
``topology`` (hardware targets and an alpha-beta cost model), ``testing`` (persistent gloo
worlds and the oracle harness for pytest), ``bench`` (timing, result schema, plots).
"""

from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _version

from longattn.common.merge import merge_partials, merge_partials_, merge_stacked


def version_of(distribution: str) -> str:
    """The installed version of ``distribution`` (``"0+unknown"`` for a source tree on
    ``sys.path`` without an install): every longattn package's ``__version__``."""
    try:
        return _version(distribution)
    except _NotInstalled:
        return "0+unknown"


__version__ = version_of("longattn-common")

__all__ = ["merge_partials", "merge_partials_", "merge_stacked", "version_of"]
