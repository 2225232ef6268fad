"""longattn.common: the shared parts every longattn method is built from.

Modules: ``merge`` (LSE merge of attention partials), ``kernels`` (the local attention step and
its backends), ``comm`` (ring / all-to-all exchange with byte counters), ``layout`` (sequence
sharding), ``topology`` (hardware targets and an alpha-beta cost model), ``testing``
(persistent gloo worlds for pytest), ``bench`` (timing, result schema, plots), ``checks``
(argument validation shared by the public functions).
"""

from longattn.common.merge import merge_partials, merge_partials_, merge_stacked

__all__ = ["merge_partials", "merge_partials_", "merge_stacked"]
