"""Bytes of the collectives in a compiled XLA program (for exact communication tests).

``collective_bytes(text)`` sums, per collective kind, the bytes of the result of each
collective instruction in the HLO text (``compiled.as_text()``): an all-reduce's payload, a
collective-permute's message. Per device, since shard_map programs are SPMD.
"""

from __future__ import annotations

import re
from collections import defaultdict

_ITEM = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
         "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_KINDS = ("all-reduce", "collective-permute", "all-gather", "reduce-scatter", "all-to-all")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_INSTR = re.compile(r"=\s*(\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+(" + "|".join(_KINDS) +
                    r")(-start)?\(")


def _bytes(shape_text):
    total = 0
    for dt, dims in _SHAPE.findall(shape_text):
        if dt not in _ITEM:
            continue
        n = 1
        for x in filter(None, dims.split(",")):
            n *= int(x)
        total += n * _ITEM[dt]
    return total


def collective_bytes(hlo_text: str) -> dict:
    """``{kind: [bytes of each instruction]}`` for the collectives in ``hlo_text``."""
    out = defaultdict(list)
    for line in hlo_text.splitlines():
        m = _INSTR.search(line)
        if m:
            shape, kind, start = m.group(1), m.group(2), m.group(3)
            nb = _bytes(shape)
            if start and shape.startswith("("):  # async start: (operands, results, ...)
                nb //= 2
            out[kind].append(nb)
    return dict(out)
