"""MultiheadDilatedAttention, positions (rotary / xPos), MAGNETO init, LongNet and LongNetLM."""

import math

import numpy as np
import pytest
import torch

from longattn.common.testing import rel_error
from longattn.dilated import (
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    LongNet,
    LongNetLM,
    MultiheadDilatedAttention,
    apply_rotary,
    apply_xpos,
)
from longattn.dilated.model import magneto_gammas
from longattn.dilated.position import check_xpos_range, xpos_positions, xpos_scale
from longattn.reference.dilated import dilated_attention as ref_dilated

SEG, RATES = [4, 8, 16], [1, 2, 4]


def _np(t):
    return t.detach().double().numpy()


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


@pytest.mark.parametrize("pos_emb", [None, "rotary", "xpos"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_multihead_matches_composition_with_oracle(pos_emb, kv_heads):
    torch.manual_seed(0)
    m = MultiheadDilatedAttention(32, 4, SEG, RATES, num_kv_heads=kv_heads, pos_emb=pos_emb,
                                  dtype=torch.float64)
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    y, w = m(x, x, x, is_causal=True)
    assert w is None and y.shape == x.shape
    # by hand: projections, positions, oracle, sub-LN, out_proj
    q = (x @ m.q_proj.weight.T + m.q_proj.bias).view(2, 29, 4, 8)
    k = (x @ m.k_proj.weight.T + m.k_proj.bias).view(2, 29, kv_heads, 8)
    v = (x @ m.v_proj.weight.T + m.v_proj.bias).view(2, 29, kv_heads, 8)
    if pos_emb == "rotary":
        q, k = apply_rotary(q, k, torch.arange(29))
    elif pos_emb == "xpos":
        q, k = apply_xpos(q, k, torch.arange(29))  # raw positions: exact relative encoding
    o, _ = ref_dilated(_np(q), _np(k), _np(v), SEG, RATES, causal=True)
    o = _layer_norm(o.reshape(2, 29, 32), _np(m.norm.weight), _np(m.norm.bias), m.norm.eps)
    want = o @ _np(m.out_proj.weight).T + _np(m.out_proj.bias)
    assert rel_error(y, want) <= 1e-10


@pytest.mark.parametrize("kind", ["rotary", "xpos"])
def test_positions_are_relative(kind):
    torch.manual_seed(1)
    q = torch.randn(1, 10, 2, 8, dtype=torch.float64)
    k = torch.randn(1, 10, 2, 8, dtype=torch.float64)
    fn = apply_rotary if kind == "rotary" else apply_xpos
    scores = []
    for shift in (0, 37, -300):
        qq, kk = fn(q, k, torch.arange(10) + shift)
        scores.append(torch.einsum("bqhd,bkhd->bhqk", qq, kk))
    assert rel_error(scores[1], scores[0]) <= 1e-12
    assert rel_error(scores[2], scores[0]) <= 1e-12


def test_xpos_decays_with_distance():
    x = torch.randn(1, 6, 1, 8, dtype=torch.float64)
    qq, kk = apply_xpos(x, x, torch.zeros(6, dtype=torch.int64))  # position 0: identity
    assert torch.equal(qq, x) and torch.equal(kk, x)
    # the score of a pair at distance d carries zeta^(d/scale_base) < 1, shrinking with d
    sc = xpos_scale(torch.tensor([0, 8, 16]), 8, scale_base=8.0, dtype=torch.float64)
    assert torch.all(sc[1] < sc[0]) and torch.all(sc[2] < sc[1]) and torch.all(sc[0] == 1)


def test_xpos_positions_mod_largest_segment_change_nothing():
    """xPos with positions mod w_max (centered) gives the same layer output as raw positions,
    because every segment of every branch lies inside one w_max block."""
    torch.manual_seed(2)
    m = MultiheadDilatedAttention(16, 2, SEG, RATES, pos_emb="xpos", dtype=torch.float64)
    x = torch.randn(1, 45, 16, dtype=torch.float64)
    y, _ = m(x, x, x, is_causal=True)
    m.pos_emb = None
    q = m.q_proj(x).view(1, 45, 2, 8)
    k = m.k_proj(x).view(1, 45, 2, 8)
    v = m.v_proj(x).view(1, 45, 2, 8)
    q, k = apply_xpos(q, k, torch.arange(45))
    o = m.attention(q, k, v, is_causal=True).reshape(1, 45, 16)
    want = m.out_proj(m.norm(o))
    assert rel_error(y, want) <= 1e-12
    p = xpos_positions(0, 45, SEG)
    assert p.abs().max() <= 8 and torch.equal(p[16:32], p[:16])
    # 4 does not divide 6: the block is their least common multiple, 12
    assert torch.equal(xpos_positions(3, 5, [4, 6]), torch.arange(3, 8) - 6)
    assert torch.equal(xpos_positions(0, 30, [4, 6]), torch.arange(30) % 12 - 6)


def test_xpos_block_is_the_segments_lcm():
    """Segments that do not divide the largest one ([3, 8]): positions mod lcm = 24 give the
    layer output of raw positions (every segment lies inside one 24-token block); at 40,000
    tokens in float32 raw positions overflowed xPos's factors (NaN rows), these stay finite."""
    seg, rates = [3, 8], [1, 2]
    torch.manual_seed(4)
    m = MultiheadDilatedAttention(16, 2, seg, rates, pos_emb="xpos", dtype=torch.float64)
    x = torch.randn(1, 53, 16, dtype=torch.float64)
    y, _ = m(x, x, x, is_causal=True)
    m.pos_emb = None
    q, k, v = (p(x).view(1, 53, 2, 8) for p in (m.q_proj, m.k_proj, m.v_proj))
    q, k = apply_xpos(q, k, torch.arange(53))
    want = m.out_proj(m.norm(m.attention(q, k, v, is_causal=True).reshape(1, 53, 16)))
    assert rel_error(y, want) <= 1e-12
    assert xpos_positions(0, 40000, seg).abs().max() == 12
    m32 = MultiheadDilatedAttention(16, 2, seg, rates, pos_emb="xpos")
    with torch.no_grad():
        y32, _ = m32(*[torch.randn(1, 40000, 16)] * 3, is_causal=True)
    assert torch.isfinite(y32).all()


def test_xpos_out_of_range_raises():
    """Where even the lcm block leaves no small positions (coprime segments, lcm > 2^16), xPos
    raises naming the fix instead of returning non-finite rows; float64 has the range."""
    seg = [257, 263]  # lcm 67,591
    check_xpos_range(seg, 30000, 512.0, torch.float64)
    check_xpos_range(seg, 30000, 512.0, torch.float32)
    with pytest.raises(ValueError, match="pos_emb='xpos' at positions up to 39999"):
        check_xpos_range(seg, 40000, 512.0, torch.float32)
    check_xpos_range([2048], 1 << 20, 512.0, torch.float16)  # LongNet's first: e^2.5
    with pytest.raises(ValueError, match="beyond torch.float16"):
        check_xpos_range([8192], 8192, 512.0, torch.float16)  # e^10.0 > e^6.5
    m = MultiheadDilatedAttention(8, 1, seg, [1, 1], pos_emb="xpos")
    with pytest.raises(ValueError, match="pos_emb='xpos'"):
        m(*[torch.randn(1, 40000, 8)] * 3)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="xpos_scale_base"):
            MultiheadDilatedAttention(8, 1, seg, [1, 1], pos_emb="xpos", xpos_scale_base=bad)


def test_magneto_init():
    torch.manual_seed(3)
    gamma = 2.5
    m = MultiheadDilatedAttention(512, 8, SEG, RATES, gamma_init=gamma)
    xav = math.sqrt(2.0 / (512 + 512))
    assert m.q_proj.weight.std().item() == pytest.approx(xav, rel=0.03)
    assert m.v_proj.weight.std().item() == pytest.approx(gamma * xav, rel=0.03)
    assert m.out_proj.weight.std().item() == pytest.approx(gamma * xav, rel=0.03)
    assert torch.all(m.q_proj.bias == 0) and torch.all(m.out_proj.bias == 0)
    enc, dec = magneto_gammas(12, 12)
    assert enc == pytest.approx(math.sqrt(math.log(36) * math.log(24) / 3))
    assert dec == pytest.approx(math.sqrt(math.log(36)))
    assert magneto_gammas(0, 12)[1] == pytest.approx(math.sqrt(math.log(24)))
    net = LongNet(d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=3,
                  dim_feedforward=128, segment_lengths=SEG, dilation_rates=RATES)
    g_dec = magneto_gammas(2, 3)[1]
    w = net.decoder_layers[0].ffn.linear2.weight
    assert w.std().item() == pytest.approx(g_dec * math.sqrt(2 / (128 + 64)), rel=0.08)


def test_seed_argument_names():
    """The keyword arguments of dilated-attention-pytorch's classes are accepted."""
    m = MultiheadDilatedAttention(embed_dim=32, num_heads=4, dilation_rates=[1, 2],
                                  segment_lengths=[4, 8], dropout=0.0, bias=True,
                                  layer_norm=True, layer_norm_eps=1e-5, gamma_init=1.0,
                                  device="cpu", dtype=torch.float32)
    x = torch.randn(1, 16, 32)
    y, _ = m(x, x, x, is_causal=False)
    assert y.shape == x.shape
    DilatedTransformerEncoderLayer(d_model=32, nhead=4, segment_lengths=[4], dilation_rates=[1],
                                   dim_feedforward=64, dropout=0.1, activation="gelu",
                                   layer_norm_eps=1e-5, gamma_init=1.0, device=None, dtype=None)
    DilatedTransformerDecoderLayer(d_model=32, nhead=4, segment_lengths=[4], dilation_rates=[1])
    net = LongNet(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                  dim_feedforward=64, segment_lengths=[4, 8], dilation_rates=[1, 2], dropout=0.0,
                  activation="relu", layer_norm_eps=1e-5, device=None, dtype=None)
    assert net(torch.randn(2, 12, 32), is_causal=True).shape == (2, 12, 32)
    lm = LongNetLM(num_tokens=50, d_model=32, nhead=4, num_encoder_layers=1,
                   num_decoder_layers=1, dim_feedforward=64, segment_lengths=[4, 8],
                   dilation_rates=[1, 2], dropout=0.0, activation="relu", layer_norm_eps=1e-5)
    assert lm(torch.randint(0, 50, (2, 12)), is_causal=True).shape == (2, 12, 50)


def test_lm_is_causal_and_residual():
    torch.manual_seed(4)
    lm = LongNetLM(40, d_model=32, nhead=4, num_decoder_layers=2, dim_feedforward=64,
                   segment_lengths=SEG, dilation_rates=RATES, dtype=torch.float64)
    x = torch.randint(0, 40, (2, 37))
    y = lm(x)
    x2 = x.clone()
    x2[:, 20:] = torch.randint(0, 40, (2, 17))
    y2 = lm(x2)
    assert rel_error(y2[:, :20], y[:, :20]) <= 1e-13
    assert rel_error(y2[:, 20:], y[:, 20:]) > 1e-3
    assert not any("multihead_attn" in n for n, _ in lm.named_parameters())  # decoder-only
    # residual stream: a zeroed attention / FFN leaves the embedding through
    layer = lm.long_net.decoder_layers[0]
    h = torch.randn(1, 8, 32, dtype=torch.float64)
    for p in layer.parameters():
        torch.nn.init.zeros_(p)
    assert torch.equal(layer(h), h)


def test_lm_gradients_flow_and_fp64_gradcheck():
    torch.manual_seed(5)
    m = MultiheadDilatedAttention(8, 2, [2, 4], [1, 2], pos_emb="rotary", num_kv_heads=1,
                                  dtype=torch.float64)
    x = torch.randn(1, 7, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t, t, t, is_causal=True)[0], (x,))


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="embed_dim"):
        MultiheadDilatedAttention(30, 4, SEG, RATES)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadDilatedAttention(32, 4, SEG, RATES, num_kv_heads=3)
    with pytest.raises(ValueError, match="pos_emb"):
        MultiheadDilatedAttention(32, 4, SEG, RATES, pos_emb="alibi")
    with pytest.raises(ValueError, match="dilation_rates"):
        MultiheadDilatedAttention(32, 4, SEG, [1, 2])
    with pytest.raises(ValueError, match="activation"):
        LongNet(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=0,
                segment_lengths=SEG, dilation_rates=RATES, activation="swishy")
    with pytest.raises(ValueError, match="at least one"):
        LongNet(num_encoder_layers=0, num_decoder_layers=0)
    with pytest.raises(ValueError, match="num_tokens"):
        LongNetLM(0)
    layer = DilatedTransformerDecoderLayer(32, 4, SEG, RATES)
    with pytest.raises(ValueError, match="memory"):
        layer(torch.randn(1, 8, 32))


def _mha(**kw):
    return MultiheadDilatedAttention(32, 4, SEG, RATES, **kw)


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, x: m(x[0], x[0], x[0]), ValueError, r"query must be \[batch, seq, embed_dim=32\]"),
    (lambda m, x: m(x, x[0], x), ValueError, r"key must be \[batch, seq, embed_dim=32\]"),
    (lambda m, x: m(x, x, x[..., :16]), ValueError, "value must be .*embed_dim=32.*16"),
    (lambda m, x: m(x.double(), x.double(), x.double()), TypeError,
     "query dtype torch.float64 must be the module's parameter dtype torch.float32"),
    (lambda m, x: m(x, x.half(), x), TypeError, "key dtype torch.float16"),
    (lambda m, x: m(x, x[:, :8], x[:, :8]), ValueError, r"key \[batch, seq\] \(2, 8\)"),
    (lambda m, x: m(x, x, x[:1]), ValueError, r"value \[batch, seq\] \(1, 12\)"),
    (lambda m, x: m(x.tolist(), x, x), TypeError, "query must be a torch.Tensor"),
    (lambda m, x: m(x, x, x, is_causal="yes"), TypeError, "is_causal must be a bool"),
])
def test_multihead_bad_inputs_name_the_argument(call, exc, match):
    m, x = _mha(), torch.randn(2, 12, 32)
    with pytest.raises(exc, match=match):
        call(m, x)


def test_multihead_accepts_other_dtypes_under_autocast():
    m, x = _mha(), torch.randn(2, 12, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = m(x.bfloat16(), x.bfloat16(), x.bfloat16(), is_causal=True)
    assert y.shape == (2, 12, 32)


def _lm(**kw):
    return LongNetLM(40, d_model=32, nhead=4, num_decoder_layers=1, dim_feedforward=64,
                     segment_lengths=SEG, dilation_rates=RATES, **kw)


@pytest.mark.parametrize("x, exc, match", [
    (torch.randint(0, 40, (12,)), ValueError, r"x must be \[batch, seq\] token ids"),
    (torch.randint(0, 40, (2, 12, 1)), ValueError, r"x must be \[batch, seq\] token ids"),
    (torch.rand(2, 12) * 40, TypeError, "x must hold integer token ids"),
    (torch.ones(2, 12, dtype=torch.bool), TypeError, "x must hold integer token ids"),
    (torch.full((2, 12), 40), ValueError, r"token ids in \[40, 40\], outside \[0, num_tokens"),
    (torch.full((2, 12), -1), ValueError, r"token ids in \[-1, -1\]"),
    ([[1, 2, 3]], TypeError, "x must be a torch.Tensor"),
])
def test_lm_bad_token_ids_name_x(x, exc, match):
    with pytest.raises(exc, match=match):
        _lm()(x)


def test_lm_and_longnet_bad_inputs():
    lm = _lm()
    assert lm(torch.randint(0, 40, (2, 12), dtype=torch.int32)).shape == (2, 12, 40)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        lm(torch.randint(0, 40, (2, 12)), is_causal=None)
    net = LongNet(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                  dim_feedforward=64, segment_lengths=SEG, dilation_rates=RATES)
    with pytest.raises(ValueError, match=r"x must be \[batch, seq, d_model=32\]"):
        net(torch.randn(12, 32))
    with pytest.raises(ValueError, match=r"x must be \[batch, seq, d_model=32\]"):
        net(torch.randn(2, 12, 16))
    with pytest.raises(TypeError, match="x dtype torch.float64 must be the module's"):
        net(torch.randn(2, 12, 32, dtype=torch.float64))
