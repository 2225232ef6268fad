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

try:
    __version__ = _version("longattn-common")
except _NotInstalled:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

from longattn.common.merge import merge_partials, merge_partials_, merge_stacked

__all__ = ["merge_partials", "merge_partials_", "merge_stacked"]
