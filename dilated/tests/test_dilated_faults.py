"""Fault injection: every check of ``dilated_attention`` with a group and of the modules
(``DilatedAttention``, ``MultiheadDilatedAttention``, ``LongNet``, ``LongNetLM``), with the bad
value on ONE rank of gloo worlds of 2, 3 and 4 ranks. Every rank must raise the same error (same
class, same message, naming the argument; a local error also names the bad rank) within the
timeout: none returns, none hangs. One test id per (entry point, check, world).

Not injected: a tensor on another device (this machine has no second device type); module
constructor arguments (checked locally, before any collective, the same on every rank).
"""

import pytest
import torch
import torch.distributed as dist

from longattn.common.testing import run_world
from longattn.dilated import (
    DilatedAttention,
    LongNet,
    LongNetLM,
    MultiheadDilatedAttention,
    dilated_attention,
)

pytestmark = pytest.mark.faults
WORLDS = (2, 3, 4)
SEG, RATES = [4, 12], [1, 2]
L = 6  # local length


def _t(l=L, h=2, d=4, b=1, dtype=torch.float64):
    return torch.randn(b, l, h, d, dtype=dtype, generator=torch.Generator().manual_seed(l + h))


def _qkv(bad, q=None, k=None, v=None):
    """Good (q, k, v), with this rank's replacements when it is the bad one."""
    good = [_t(), _t(), _t()]
    if not bad:
        return good
    return [good[i] if x is None else x for i, x in enumerate((q, k, v))]


# name -> (this rank's call arguments: f(bad) -> (q, k, v, kwargs), exception, text of the
# message). Local checks first, then values that are valid on each rank but differ.
FUNCTION = {
    "segment_lengths not a sequence": (
        lambda bad: (*_qkv(bad), dict(segment_lengths=4 if bad else SEG)),
        TypeError, "segment_lengths must be a sequence"),
    "segment_lengths not positive": (
        lambda bad: (*_qkv(bad), dict(segment_lengths=[4, 0] if bad else SEG)),
        ValueError, "segment_lengths must hold positive ints"),
    "dilation_rates not ints": (
        lambda bad: (*_qkv(bad), dict(dilation_rates=[1, 2.0] if bad else RATES)),
        ValueError, "dilation_rates must hold positive ints"),
    "schedule lengths differ": (
        lambda bad: (*_qkv(bad), dict(dilation_rates=[1] if bad else RATES)),
        ValueError, "must be non-empty and of equal length"),
    "q not a tensor": (
        lambda bad: (*_qkv(bad, q=[[1.0]]), {}), TypeError, "q must be a torch.Tensor"),
    "q not 4-D": (
        lambda bad: (*_qkv(bad, q=_t()[0]), {}), ValueError, "q must be [batch, seq, heads"),
    "k dtype": (
        lambda bad: (*_qkv(bad, k=_t(dtype=torch.float32)), {}), TypeError, "dtypes differ"),
    "kv heads": (
        lambda bad: (*_qkv(bad, k=_t(h=3), v=_t(h=3)), {}), ValueError,
        "must be a positive multiple of k/v heads"),
    "v length": (
        lambda bad: (*_qkv(bad, v=_t(l=5)), {}), ValueError, "must agree except head_dim"),
    "k head_dim": (
        lambda bad: (*_qkv(bad, k=_t(d=3), v=_t(d=3)), {}), ValueError, "head_dim of q"),
    "k batch": (
        lambda bad: (*_qkv(bad, k=_t(b=2), v=_t(b=2)), {}), ValueError, "batch of q"),
    "q length": (
        lambda bad: (*_qkv(bad, q=_t(l=7)), {}), ValueError, "q length 7 != k/v length 6"),
    "empty sequence": (
        lambda bad: (*_qkv(bad, _t(l=0), _t(l=0), _t(l=0)), {}), ValueError, "non-empty"),
    "causal not a bool": (
        lambda bad: (*_qkv(bad), dict(causal="yes" if bad else True)),
        TypeError, "causal must be a bool"),
    "softmax_scale not a number": (
        lambda bad: (*_qkv(bad), dict(softmax_scale="0.5" if bad else None)),
        TypeError, "softmax_scale must be a float"),
    "softmax_scale NaN": (
        lambda bad: (*_qkv(bad), dict(softmax_scale=float("nan") if bad else None)),
        ValueError, "softmax_scale must be finite"),
    "config": (
        lambda bad: (*_qkv(bad), dict(config="fast" if bad else None)),
        TypeError, "config must be a longattn.dilated.FusedConfig"),
    "backend unknown": (
        lambda bad: (*_qkv(bad), dict(backend="no_such_kernel" if bad else "auto")),
        ValueError, "no_such_kernel"),
    # valid on every rank, different across ranks: the message names the argument
    "local length differs": (
        lambda bad: (*_qkv(bad, _t(l=7), _t(l=7), _t(l=7)), {}),
        ValueError, "q.shape must be the same on every rank"),
    "dtype differs": (
        lambda bad: (*_qkv(bad, *(_t(dtype=torch.float32) for _ in range(3))), {}),
        ValueError, "dtype must be the same on every rank"),
    "causal differs": (
        lambda bad: (*_qkv(bad), dict(causal=not bad)),
        ValueError, "causal must be the same on every rank"),
    "softmax_scale differs": (
        lambda bad: (*_qkv(bad), dict(softmax_scale=0.25 if bad else None)),
        ValueError, "softmax_scale must be the same on every rank"),
    "segment_lengths differ": (
        lambda bad: (*_qkv(bad), dict(segment_lengths=[4, 24] if bad else SEG)),
        ValueError, "segment_lengths must be the same on every rank"),
    "dilation_rates differ": (
        lambda bad: (*_qkv(bad), dict(dilation_rates=[1, 3] if bad else RATES)),
        ValueError, "dilation_rates must be the same on every rank"),
    "needs grad differs": (
        lambda bad: (*_qkv(bad, q=_t().requires_grad_()), {}),
        ValueError, "needs grad must be the same on every rank"),
}

# the names a cross-rank error must not use for another argument
_OTHER_FIELDS = ("schedule", "hash")


def _function_call(name, bad, group):
    q, k, v, kw = FUNCTION[name][0](bad)
    kw = dict(dict(segment_lengths=SEG, dilation_rates=RATES, causal=True), **kw)
    return dilated_attention(q, k, v, group=group, **kw)


def _x(l=L, d=8, dtype=torch.float64):
    return torch.randn(1, l, d, dtype=dtype, generator=torch.Generator().manual_seed(l))


def _mha(group):
    return MultiheadDilatedAttention(8, 2, SEG, RATES, dtype=torch.float64, group=group)


def _longnet(group):
    return LongNet(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                   dim_feedforward=8, segment_lengths=SEG, dilation_rates=RATES,
                   dtype=torch.float64, group=group)


def _lm(group):
    return LongNetLM(10, d_model=8, nhead=2, num_decoder_layers=1, dim_feedforward=8,
                     segment_lengths=SEG, dilation_rates=RATES, dtype=torch.float64,
                     group=group)


def _ids(l=L):
    return torch.arange(l).unsqueeze(0)


def _da(bad, group, q=None, k=None, v=None, is_causal=True):
    return DilatedAttention(SEG, RATES, group=group)(*_qkv(bad, q, k, v), is_causal=is_causal)


# name -> (f(bad, group) that makes this rank's call, exception, text of the message)
MODULES = {
    "DilatedAttention is_causal not a bool": (
        lambda bad, g: _da(bad, g, is_causal="yes" if bad else True),
        TypeError, "is_causal must be a bool"),
    "DilatedAttention is_causal differs": (
        lambda bad, g: _da(bad, g, is_causal=not bad),
        ValueError, "is_causal must be the same on every rank"),
    "DilatedAttention k dtype": (
        lambda bad, g: _da(bad, g, k=_t(dtype=torch.float32)), TypeError, "dtypes differ"),
    "DilatedAttention local length differs": (
        lambda bad, g: _da(bad, g, _t(l=7), _t(l=7), _t(l=7)),
        ValueError, "q.shape must be the same on every rank"),
    "MultiheadDilatedAttention query not a tensor": (
        lambda bad, g: _mha(g)(0.0 if bad else _x(), _x(), _x()),
        TypeError, "query must be a torch.Tensor"),
    "MultiheadDilatedAttention query features": (
        lambda bad, g: _mha(g)(_x(d=6) if bad else _x(), _x(), _x()),
        ValueError, "query must be [batch, seq, embed_dim=8]"),
    "MultiheadDilatedAttention key length": (
        lambda bad, g: _mha(g)(_x(), _x(l=5) if bad else _x(), _x()),
        ValueError, "key [batch, seq]"),
    "MultiheadDilatedAttention value dtype": (
        lambda bad, g: _mha(g)(_x(), _x(), _x(dtype=torch.float32) if bad else _x()),
        TypeError, "value dtype torch.float32 must be the module's parameter dtype"),
    "MultiheadDilatedAttention is_causal not a bool": (
        lambda bad, g: _mha(g)(_x(), _x(), _x(), is_causal=1 if bad else False),
        TypeError, "is_causal must be a bool"),
    "MultiheadDilatedAttention is_causal differs": (
        lambda bad, g: _mha(g)(_x(), _x(), _x(), is_causal=bad),
        ValueError, "is_causal must be the same on every rank"),
    "MultiheadDilatedAttention local length differs": (
        lambda bad, g: _mha(g)(*(_x(l=7 if bad else L) for _ in range(3))),
        ValueError, "query.shape must be the same on every rank"),
    "LongNet x not a tensor": (
        lambda bad, g: _longnet(g)(None if bad else _x()),
        TypeError, "x must be a torch.Tensor"),
    "LongNet x features": (
        lambda bad, g: _longnet(g)(_x(d=4) if bad else _x()),
        ValueError, "x must be [batch, seq, d_model=8]"),
    "LongNet x dtype": (
        lambda bad, g: _longnet(g)(_x(dtype=torch.float32) if bad else _x()),
        TypeError, "x dtype torch.float32 must be the module's parameter dtype"),
    "LongNet is_causal not a bool": (
        lambda bad, g: _longnet(g)(_x(), is_causal="no" if bad else True),
        TypeError, "is_causal must be a bool"),
    "LongNet is_causal differs": (
        lambda bad, g: _longnet(g)(_x(), is_causal=not bad),
        ValueError, "is_causal must be the same on every rank"),
    "LongNet local length differs": (
        lambda bad, g: _longnet(g)(_x(l=7 if bad else L)),
        ValueError, "x.shape must be the same on every rank"),
    "LongNetLM x not a tensor": (
        lambda bad, g: _lm(g)([1, 2] if bad else _ids()), TypeError, "x must be a torch.Tensor"),
    "LongNetLM x float": (
        lambda bad, g: _lm(g)(_ids().double() if bad else _ids()),
        TypeError, "x must hold integer token ids"),
    "LongNetLM x not 2-D": (
        lambda bad, g: _lm(g)(_ids()[0] if bad else _ids()),
        ValueError, "x must be [batch, seq] token ids"),
    "LongNetLM token id out of range": (
        lambda bad, g: _lm(g)(_ids() + 5 if bad else _ids()),  # ids 5..10
        ValueError, "outside [0, num_tokens = 10)"),
    "LongNetLM is_causal not a bool": (
        lambda bad, g: _lm(g)(_ids(), is_causal=None if bad else True),
        TypeError, "is_causal must be a bool"),
    "LongNetLM is_causal differs": (
        lambda bad, g: _lm(g)(_ids(), is_causal=not bad),
        ValueError, "is_causal must be the same on every rank"),
    "LongNetLM local length differs": (
        lambda bad, g: _lm(g)(_ids(l=7 if bad else L)),
        ValueError, "x.shape must be the same on every rank"),
}


def _bad_rank(name, world):
    """The one bad rank: spread over the ranks (first, middle, last) by the check's name."""
    return sum(map(ord, name)) % world


def _inject(rank, world, kind, name):
    """This rank's call with the bad value on rank ``_bad_rank``; ``(class, message)`` of what
    it raised, None if it returned. Then a good call, to show the world still works."""
    bad = rank == _bad_rank(name, world)
    group = dist.group.WORLD
    try:
        if kind == "function":
            _function_call(name, bad, group)
        else:
            MODULES[name][0](bad, group)
        res = None
    except (ValueError, TypeError) as e:
        res = (type(e).__name__, str(e))
    after = _function_call("causal differs", False, group)  # every rank good
    return res, tuple(after.shape)


def _check(res, world, name, exc, text):
    bad = _bad_rank(name, world)
    for rank, (r, after) in enumerate(res):
        assert r is not None, f"rank {rank} returned ({name})"
        assert r == res[0][0], f"rank {rank} raised {r}, rank 0 {res[0][0]}"
        assert after == (1, L, 2, 4)
    cls, msg = res[0][0]
    assert cls == exc.__name__ and text in msg, (name, cls, msg)
    if "must be the same on every rank" in text:
        assert not any(w in msg for w in _OTHER_FIELDS), msg
    else:  # a local error: the bad rank's message, naming it
        assert f"rank(s) [{bad}]" in msg, msg


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(FUNCTION))
def test_function_fault(name, world):
    _, exc, text = FUNCTION[name]
    _check(run_world(world, _inject, "function", name, timeout=60), world, name, exc, text)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_module_fault(name, world):
    _, exc, text = MODULES[name]
    _check(run_world(world, _inject, "module", name, timeout=60), world, name, exc, text)
