"""Process groups and the agreement protocol: the one home of both for every longattn method.

    resolve_group(group) -> Group          # ProcessGroup | 1-D DeviceMesh | LOCAL | None
    agree(op, group, check, vary=())       # local checks, one all-gather, same error everywhere

**What ``group=None`` means, in every package.** Without an initialised ``torch.distributed``, or
in a world of one rank, it is this process alone. In an initialised world of more than one rank
it is an error (``ValueError`` naming ``group``): longattn never picks the default process group
for the user, because a call on a shard of a longer sequence that silently ran on one rank, or a
plain data-parallel layer that silently became sequence-parallel, would both return a wrong
answer without a word. Pass ``group=torch.distributed.group.WORLD`` (or any ``ProcessGroup``, or a
1-D ``DeviceMesh``) to shard over ranks, and :data:`LOCAL` to run on this process alone.

**The agreement protocol.** A distributed entry point runs its local argument checks inside
:func:`agree`, which then makes one small all-gather of a fixed-size int64 row per rank: an
error flag and message, and the values every rank must share (shapes, dtype, device type,
scale, flags, backend, ...). If any rank's checks failed, every rank raises the same error (the
lowest failing rank's message, with the rank named); if a shared value differs, every rank
raises a ``ValueError`` naming the argument and the ranks. Only then does the caller make its
first real collective, so a bad call never hangs or desyncs a world.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class _Local:
    """Sentinel type of :data:`LOCAL`."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self):
        return "longattn.common.dist.LOCAL"

    def __reduce__(self):  # pickles to the same sentinel (gloo test workers)
        return (_Local, ())


LOCAL = _Local()
"""``group=LOCAL``: run on this process alone, whatever the torch.distributed world is."""


@dataclass(frozen=True)
class Group:
    """A resolved group: the ``ProcessGroup`` (None for one process), its size, this process's
    rank in it, and the device its collectives need (the current CUDA device under NCCL, else the
    CPU)."""

    pg: Any
    size: int
    rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def global_rank(self, group_rank: int) -> int:
        """The default-group rank of ``group_rank`` (the peer argument of p2p ops)."""
        if self.pg is None:
            return group_rank
        return dist.get_global_rank(self.pg, group_rank)


_ONE = Group(pg=None, size=1, rank=0, device=torch.device("cpu"))


def collective_device(pg) -> torch.device:
    """Where tensors of ``pg``'s collectives must live: the current CUDA device under NCCL,
    else the CPU (gloo, and gloo's half of a ``"cpu:gloo,cuda:nccl"`` group)."""
    if dist.get_backend(pg) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_group(group, *, name: str = "group") -> Group:
    """Resolve ``group`` (a ``ProcessGroup``, a 1-D ``DeviceMesh``, :data:`LOCAL` or ``None``)
    to a :class:`Group`. See the module docstring for the rule of ``None``. An already resolved
    :class:`Group` is returned as it is (so helpers can take either)."""
    if isinstance(group, Group):
        return group
    if group is LOCAL:
        return _ONE
    if group is None:
        if not _initialised() or dist.get_world_size() == 1:
            return _ONE
        raise ValueError(
            f"{name}=None is ambiguous in a torch.distributed world of {dist.get_world_size()} "
            f"ranks: pass {name}=torch.distributed.group.WORLD (or a ProcessGroup, or a 1-D "
            f"DeviceMesh) to shard over ranks, or {name}=longattn.common.dist.LOCAL to run on "
            "this process alone")
    if _is_mesh(group):
        if group.ndim != 1:
            raise ValueError(f"{name} must be a 1-D DeviceMesh, got a {group.ndim}-D mesh with "
                             f"dims {group.mesh_dim_names}: pass one dimension, e.g. mesh['cp']")
        group = group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup, a 1-D DeviceMesh, "
                        f"longattn.common.dist.LOCAL or None, got {type(group).__name__}")
    if not _initialised():
        raise ValueError(f"{name} was given but torch.distributed is not initialised")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process is not a member of {name}")
    return Group(pg=group, size=dist.get_world_size(group), rank=rank,
                 device=collective_device(group))


def _is_mesh(x) -> bool:
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # torch without DeviceMesh
        return False
    return isinstance(x, DeviceMesh)


# ---------------------------------------------------------------------------------------------
# The agreement protocol
# ---------------------------------------------------------------------------------------------

_MAX_VALUES = 64
_MSG_WORDS = 64  # 512 bytes of error message
_TYPE_WORDS = 4  # a 4-bit type code per value, 16 to a word
_HEAD = 3 + _TYPE_WORDS  # status, number of values, digest of the field names, type codes
_ROW = _HEAD + _MAX_VALUES + _MSG_WORDS
_TYPES = {0: "None", 1: "bool", 2: "int", 3: "float", 4: "str/dtype/device"}
# 3: a check failed with any other exception (a defect of the check, not of the argument):
# every rank raises a RuntimeError carrying its type and message rather than one rank leaving
# the agreement and the others waiting in its all-gather
_ERRORS = {1: ValueError, 2: TypeError, 3: RuntimeError}
_I64 = (-(2**63), 2**63 - 1)


def _hash(s: str) -> int:
    return zlib.crc32(s.encode()) & 0x7FFFFFFF


def _encode(op: str, fields: Mapping[str, Any]):
    """Flatten ``fields`` to named int64 words with a type code each (tuples expand to
    ``name.len`` then ``name[i]``); raises ``ValueError`` / ``TypeError`` naming the field for a
    value that cannot be encoded."""
    names, words, shown, types = [], [], [], []

    def add(name, x):
        if x is None:
            w, t = 0, 0
        elif isinstance(x, bool):
            w, t = int(x), 1
        elif isinstance(x, int):
            if not _I64[0] < x <= _I64[1]:
                raise ValueError(f"{op}: {name} = {x} is out of range (it must fit in a signed "
                                 "64-bit integer)")
            w, t = x, 2
        elif isinstance(x, float):
            w, t = struct.unpack("<q", struct.pack("<d", x))[0], 3
        elif isinstance(x, (str, torch.dtype, torch.device)):
            w, t = _hash(str(x)), 4
        else:
            raise TypeError(f"{op}: cannot agree on {name} of type {type(x).__name__}")
        names.append(name)
        words.append(w)
        shown.append(x)
        types.append(t)

    # a row holds _MAX_VALUES words: where the tuples expanded value by value would not fit,
    # the longest become one word each (their text), agreed whole rather than element-wise
    seqs = {n: x for n, x in fields.items() if isinstance(x, (tuple, list, torch.Size))}
    total = len(fields) + sum(len(x) for x in seqs.values())
    whole = set()
    for name in sorted(seqs, key=lambda n: -len(seqs[n])):
        if total <= _MAX_VALUES:
            break
        whole.add(name)
        total -= len(seqs[name])
    for name, x in fields.items():
        if name in whole:
            add(name, ",".join(map(str, x)))
        elif isinstance(x, (tuple, list, torch.Size)):
            add(f"{name}.len", len(x))
            for i, xi in enumerate(x):
                add(f"{name}[{i}]", xi)
        else:
            add(name, x)
    if len(words) > _MAX_VALUES:
        raise ValueError(f"{op}: at most {_MAX_VALUES} values can be agreed, got {len(words)}")
    return names, words, shown, types


def _pack_types(types) -> list[int]:
    out = [0] * _TYPE_WORDS
    for i, t in enumerate(types):
        out[i // 16] |= t << (4 * (i % 16))
    return out


def _type_at(row, j) -> int:
    return (row[3 + j // 16] >> (4 * (j % 16))) & 0xF


def _digest(names) -> int:
    """Digest of the base field names in order (a tuple's length may differ between ranks: that
    is then reported as that field differing, not as a different call)."""
    bases = []
    for n in names:
        b = _base(n)
        if not bases or bases[-1] != b:
            bases.append(b)
    return _hash("\0".join(bases))


def _message_words(msg: str) -> list[int]:
    raw = msg.encode()[: 8 * _MSG_WORDS].ljust(8 * _MSG_WORDS, b"\0")
    return list(struct.unpack(f"<{_MSG_WORDS}q", raw))


def _message(words) -> str:
    raw = struct.pack(f"<{_MSG_WORDS}q", *words)
    return raw.rstrip(b"\0").decode(errors="replace")


def _decode(word: int, code: int) -> Any:
    """The value of a word of type ``code`` (hashed values and None decode to None)."""
    if code == 3:
        return struct.unpack("<d", struct.pack("<q", word))[0]
    if code == 1:
        return bool(word)
    if code == 2:
        return word
    return None


def agree(op: str, group: Group, check: Callable[[], tuple[Any, Mapping[str, Any]]], *,
          vary: Sequence[str] = ()) -> tuple[Any, dict[str, list]]:
    """Run ``check()`` on every rank of ``group`` and agree on its verdict before any collective.

    ``check()`` does this rank's local checks (raising ``ValueError`` / ``TypeError`` naming the
    argument) and returns ``(result, fields)``: ``fields`` maps names to values every rank must
    share (ints, bools, floats, strings, dtypes, devices, None, or tuples of these), except the
    names in ``vary`` (scalars), which may differ and come back per rank. Returns
    ``(result, views)`` with ``views[name]`` the list of every rank's value of each ``vary``
    field.

    Every rank raises the same error if any rank's checks failed or a shared value differs: a
    check's ``ValueError`` / ``TypeError`` as such, any other exception of a check (a defect of
    the check) as a ``RuntimeError`` naming its type, so no rank leaves the agreement alone.
    """
    status, result, err = 0, None, None
    names, words, shown, types = [], [], [], []
    try:
        result, fields = check()
        names, words, shown, types = _encode(op, fields)
    except Exception as e:  # noqa: BLE001 - any failure of a check must reach every rank
        err = e
        status = 2 if isinstance(e, TypeError) else 1 if isinstance(e, ValueError) else 3
    if not group.distributed:
        if err is not None:
            raise err
        return result, {n: [x] for n, x in zip(names, shown) if _base(n) in vary}
    row = [status, len(words), _digest(names)] + _pack_types(types)
    row += words + [0] * (_MAX_VALUES - len(words))
    text = "" if err is None else str(err) if status < 3 else f"{type(err).__name__}: {err}"
    row += _message_words(text)
    mine = torch.tensor(row, dtype=torch.int64, device=group.device)
    every = [torch.empty_like(mine) for _ in range(group.size)]
    dist.all_gather(every, mine, group=group.pg)
    rows = [t.tolist() for t in every]
    bad = [r for r, rw in enumerate(rows) if rw[0]]
    if bad:
        first = rows[bad[0]]
        cls = _ERRORS[first[0]]
        msg = _message(first[_HEAD + _MAX_VALUES:])
        raise cls(f"{msg} [{op}: bad argument on rank(s) {bad} of {group.size}; raised on every "
                  "rank]") from err
    if any(rw[2] != rows[0][2] for rw in rows):
        raise ValueError(f"{op}: the ranks of the group made different calls (the arguments "
                         "they must share do not line up); every rank must call the same "
                         "function with the same kind of arguments")
    views = {}
    for j, name in enumerate(names):  # the first difference, in field order, is reported
        codes = [_type_at(rw, j) for rw in rows]
        col = [rw[_HEAD + j] for rw in rows]
        if _base(name) in vary and len(set(codes)) == 1:
            views.setdefault(name, [_decode(w, codes[0]) for w in col])
            continue
        if len(set(codes)) > 1:
            raise ValueError(f"{op}: {_base(name)} must be the same on every rank, got values "
                             f"of type {[_TYPES.get(c, '?') for c in codes]} (rank order)")
        differ = [r for r, w in enumerate(col) if w != col[0]]
        if differ:
            vals = [_decode(w, codes[0]) for w in col]
            per = (f"per rank {vals}" if codes[0] in (1, 2, 3)
                   else f"rank(s) {differ} differ from rank 0")
            raise ValueError(f"{op}: {_base(name)} must be the same on every rank, got {per}")
    if any(rw[1] != rows[0][1] for rw in rows):  # cannot happen when every field agreed
        raise ValueError(f"{op}: the ranks of the group agreed on different numbers of values")
    return result, views


def agreement_nbytes() -> int:
    """Bytes one rank sends in :func:`agree`'s all-gather (for exact communication counts)."""
    return _ROW * 8


def _base(name: str) -> str:
    """``q.shape[2]`` -> ``q.shape``; ``window_size.len`` -> ``window_size``."""
    return name.split("[")[0].removesuffix(".len")
