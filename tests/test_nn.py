"""vitkern.nn.Attention: timm's module contract (state dict, forward, masks, dropout) and the packed layout."""
import copy

import pytest
import torch
from torch import nn

import vitkern
from vitkern.nn import Attention

timm_layers = pytest.importorskip("timm.layers")

CONFIGS = {
    "plain": dict(dim=48, num_heads=4),
    "bias_qknorm": dict(dim=48, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm),
    "scalenorm_gated": dict(dim=48, num_heads=3, scale_norm=True, gated=True, qkv_bias=True,
                            norm_layer=nn.LayerNorm),
    "head_dim_80_dim_out": dict(dim=64, num_heads=2, attn_head_dim=80, dim_out=40),
    "head_dim_96": dict(dim=32, num_heads=2, attn_head_dim=96, proj_bias=False),
}


def _randomize(module):
    """Random non-zero weights at unit activation scale (norm weights near 1, so LayerNorms do something)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=0.1)
        elif isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight, mean=1.0, std=0.1)
            nn.init.normal_(m.bias, std=0.1)


def _pair(cfg):
    """A timm Attention and a vitkern Attention with the same (random, non-zero) weights."""
    ref = timm_layers.Attention(**cfg)
    _randomize(ref)
    ours = Attention(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_keys_and_attributes_match_timm(name):
    ref, ours = _pair(CONFIGS[name])
    assert list(ref.state_dict()) == list(ours.state_dict())
    for attr in ("num_heads", "head_dim", "attn_dim", "scale"):
        assert getattr(ref, attr) == getattr(ours, attr)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("n", [1, 7, 197])
def test_forward_backward_match_float64_timm(name, n):
    """fp32 vitkern against the same timm module run in float64: outputs and every parameter's gradient."""
    ref, ours = _pair(CONFIGS[name])
    ref = ref.double()
    x = torch.randn(2, n, CONFIGS[name]["dim"])
    x64 = x.double().requires_grad_()
    x32 = x.clone().requires_grad_()
    gout = torch.randn(2, n, ours.proj.out_features)
    out_ref, out = ref(x64), ours(x32)
    torch.testing.assert_close(out, out_ref.float(), atol=2e-5, rtol=1e-4)
    out_ref.backward(gout.double())
    out.backward(gout)
    torch.testing.assert_close(x32.grad, x64.grad.float(), atol=2e-5, rtol=1e-4)
    g_ref, g = _grads(ref), _grads(ours)
    for key in g_ref:
        torch.testing.assert_close(g[key], g_ref[key].float(), atol=5e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_masks_match_timm(kind):
    ref, ours = _pair(CONFIGS["bias_qknorm"])
    ref = ref.double()
    x = torch.randn(3, 19, 48)
    kwargs = {}
    if kind == "bool":
        mask = torch.rand(3, 1, 19, 19) > 0.4
        mask[..., 0] = True  # keep every row non-empty: torch gives NaN on empty rows, vitkern 0
        kwargs["attn_mask"] = mask
    elif kind == "float":
        kwargs["attn_mask"] = torch.randn(3, 4, 19, 19)
    else:
        kwargs["is_causal"] = True
    ref_kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in kwargs.items()}
    torch.testing.assert_close(ours(x, **kwargs), ref(x.double(), **ref_kwargs).float(), atol=2e-5, rtol=1e-4)


def test_default_backend_equals_reference_backend():
    ours = _pair(CONFIGS["bias_qknorm"])[1]
    ref = copy.deepcopy(ours)
    ref.backend = "reference"
    x = torch.randn(2, 33, 48)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_packed_equals_each_segment_alone():
    """Packed tokens attend only within their segment: each segment's output and gradient equal the module run
    on that segment alone (lengths include 1, a zero-length segment, and a non-tile-multiple 37)."""
    ours = _pair(CONFIGS["bias_qknorm"])[1]
    lengths = [5, 1, 0, 37, 7]
    cu = vitkern.lengths_to_cu_seqlens(lengths)
    x = torch.randn(sum(lengths), 48, requires_grad=True)
    gout = torch.randn(sum(lengths), 48)
    out = ours(x, cu_seqlens=cu, max_seqlen=max(lengths))
    out.backward(gout)
    grad_packed = x.grad.clone()
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == b:
            continue
        xs = x.detach()[a:b].clone().requires_grad_()
        alone = ours(xs[None])[0]
        alone.backward(gout[a:b])
        torch.testing.assert_close(out[a:b], alone, atol=1e-5, rtol=1e-5, msg=f"segment {s}")
        torch.testing.assert_close(grad_packed[a:b], xs.grad, atol=1e-5, rtol=1e-5, msg=f"segment {s}")


def test_dropout_only_in_training_and_same_on_every_backend():
    ours = _pair(dict(dim=32, num_heads=2, attn_drop=0.3))[1]
    ref = copy.deepcopy(ours)
    ref.backend = "reference"
    x = torch.randn(2, 23, 32)
    eval_out = ours.eval()(x)
    no_drop = copy.deepcopy(ours)
    no_drop.attn_drop.p = 0.0
    torch.testing.assert_close(eval_out, no_drop(x))
    ours.train(), ref.train()
    torch.manual_seed(7)
    train_out = ours(x)
    torch.manual_seed(7)
    train_ref = ref(x)
    assert (train_out - eval_out).abs().max() > 1e-2, "attn_drop.p had no effect in training"
    torch.testing.assert_close(train_out, train_ref, atol=1e-5, rtol=1e-5)


def test_from_timm_shares_the_parameters():
    ref, _ = _pair(CONFIGS["scalenorm_gated"])
    ours = Attention.from_timm(ref)
    assert all(a is b for a, b in zip(ref.parameters(), ours.parameters()))
    x = torch.randn(2, 9, 48)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    m = Attention(32, 4)
    with pytest.raises(ValueError, match=r"x: expected \[B, N, C\]"):
        m(torch.randn(5, 32))
    with pytest.raises(ValueError, match="packed"):
        m(torch.randn(2, 5, 32), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="x: expected 32 channels"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="attn_mask: must be None with cu_seqlens"):
        m(torch.randn(5, 32), attn_mask=torch.ones(5, 5, dtype=torch.bool), cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        m([1.0])
    with pytest.raises(ValueError, match="dim: expected a multiple of num_heads=5"):
        Attention(32, 5)
    with pytest.raises(ValueError, match="norm_layer"):
        Attention(32, 4, qk_norm=True)
    with pytest.raises(ValueError, match="backend"):
        Attention(32, 4, backend="nope")(torch.randn(1, 3, 32))


def test_torch_baseline_backend_matches_vitkern():
    """backend='torch' (the benchmarks' baseline) computes the same thing, padded and packed."""
    ours = _pair(CONFIGS["plain"])[1]
    base = copy.deepcopy(ours)
    base.backend = "torch"
    x = torch.randn(2, 11, 48)
    torch.testing.assert_close(ours(x), base(x), atol=1e-5, rtol=1e-5)
    cu = vitkern.lengths_to_cu_seqlens([4, 9, 2])
    xp = torch.randn(15, 48)
    torch.testing.assert_close(ours(xp, cu_seqlens=cu), base(xp, cu_seqlens=cu), atol=1e-5, rtol=1e-5)


def test_packed_dropout_same_on_every_backend():
    ours = _pair(dict(dim=32, num_heads=2, attn_drop=0.25))[1].train()
    ref = copy.deepcopy(ours)
    ref.backend = "reference"
    cu = vitkern.lengths_to_cu_seqlens([6, 1, 17])
    x = torch.randn(24, 32)
    torch.manual_seed(4)
    a = ours(x, cu_seqlens=cu)
    torch.manual_seed(4)
    b = ref(x, cu_seqlens=cu)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - ours.eval()(x, cu_seqlens=cu)).abs().max() > 1e-2
