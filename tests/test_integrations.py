"""patch_timm and attn_implementation="vitkern" on real (randomly initialized, small) timm / transformers models:
outputs and gradients equal to the unpatched model, and vitkern really is what runs."""
import copy

import pytest
import torch
from torch import nn

import vitkern.backends

timm = pytest.importorskip("timm")
from vitkern.integrations.timm import patch_timm  # noqa: E402

# name -> (kwargs, image side). Small but the real architectures: timm's Attention (vit, deit, naflexvit) and
# the redirected classes (beit: relative-position bias as a float mask with a gradient; eva02: RoPE attention).
TIMM_MODELS = {
    "vit_tiny_patch16_224": (dict(img_size=32, patch_size=8, depth=2, qkv_bias=True), 32),
    "deit_tiny_patch16_224": (dict(img_size=32, patch_size=8, depth=2), 32),
    "naflexvit_base_patch16_gap": (dict(depth=2, embed_dim=64, num_heads=4), 32),
    "beit_base_patch16_224": (dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4), 32),
    "eva02_tiny_patch14_224": (dict(img_size=28, patch_size=7, depth=2), 28),
}


@pytest.fixture
def vitkern_calls(monkeypatch):
    """Counts the forward calls that reach a vitkern backend (backend selection is cached per call signature, so
    the backends' own entry points are what every call reaches: forward, and where a backend has them,
    forward_with_grad and varlen_forward)."""
    calls = []
    for name in vitkern.backends.known_backends():
        be = vitkern.backends.get(name)
        for entry in ("forward", "forward_with_grad", "varlen_forward"):
            original = getattr(be, entry)
            if original is None:
                continue

            def spy(*args, _name=name, _original=original, **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(be, entry, spy)
    return calls


def _randomize_head(model):
    # timm zero-inits some heads/biases; random values make the gradient comparison cover every parameter.
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.abs().max() == 0:
            nn.init.normal_(m.weight, std=0.05)


def _compare(ref, ours, x, atol=2e-5):
    out_ref, out = ref(x), ours(x)
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=1e-4)
    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    named_ref = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        r = named_ref[name]
        if r.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, r.grad, atol=atol * 5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_patch_timm_matches_unpatched(name, vitkern_calls):
    kwargs, side = TIMM_MODELS[name]
    ref = timm.create_model(name, pretrained=False, num_classes=7, **kwargs)
    _randomize_head(ref)
    ours = copy.deepcopy(ref)
    keys = list(ref.state_dict())
    count = patch_timm(ours)
    assert count == kwargs["depth"]
    assert list(ours.state_dict()) == keys
    ours.load_state_dict(ref.state_dict(), strict=True)  # a checkpoint of the unpatched model still loads
    x = torch.randn(2, 3, side, side)
    _compare(ref.eval(), ours.eval(), x)
    assert len(vitkern_calls) == count


def test_patch_timm_dropout_in_training_matches_reference_backend():
    kwargs, side = TIMM_MODELS["vit_tiny_patch16_224"]
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, attn_drop_rate=0.2, **kwargs)
    default, ref = copy.deepcopy(model), copy.deepcopy(model)
    patch_timm(default)
    patch_timm(ref, backend="reference")
    x = torch.randn(2, 3, side, side)
    torch.manual_seed(3)
    a = default.train()(x)
    torch.manual_seed(3)
    b = ref.train()(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - default.eval()(x)).abs().max() > 1e-3, "attention dropout had no effect in training"


def test_patch_timm_errors():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        patch_timm("vit")
    with pytest.raises(ValueError, match="no timm attention"):
        patch_timm(nn.Sequential(nn.Linear(3, 3)))
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    patch_timm(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_timm(model)


transformers = pytest.importorskip("transformers")
import vitkern.integrations.transformers  # noqa: E402,F401  (registers "vitkern")

VIT_KW = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
              patch_size=8, attention_probs_dropout_prob=0.25)


def _vit(impl):
    torch.manual_seed(11)
    return transformers.ViTModel(transformers.ViTConfig(**VIT_KW, attn_implementation=impl))


def test_hf_vit_from_config_matches_eager(vitkern_calls):
    ref, ours = _vit("eager").eval(), _vit("vitkern").eval()
    assert ours.config._attn_implementation == "vitkern"
    x = torch.randn(2, 3, 32, 32)
    out_ref, out = ref(pixel_values=x).last_hidden_state, ours(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    named_ref = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, named_ref[name].grad, atol=1e-4, rtol=1e-3, msg=name)
    assert len(vitkern_calls) == VIT_KW["num_hidden_layers"]  # one vitkern call per layer's forward


def test_hf_set_attn_implementation_and_from_pretrained(tmp_path, vitkern_calls):
    ref = _vit("eager").eval()
    x = torch.randn(2, 3, 32, 32)
    expected = ref(pixel_values=x).last_hidden_state
    ref.save_pretrained(tmp_path)
    loaded = transformers.ViTModel.from_pretrained(tmp_path, attn_implementation="vitkern").eval()
    torch.testing.assert_close(loaded(pixel_values=x).last_hidden_state, expected, atol=2e-5, rtol=1e-4)
    assert len(vitkern_calls) == VIT_KW["num_hidden_layers"]
    ref.set_attn_implementation("vitkern")
    torch.testing.assert_close(ref(pixel_values=x).last_hidden_state, expected, atol=2e-5, rtol=1e-4)
    assert len(vitkern_calls) == 2 * VIT_KW["num_hidden_layers"]


def test_hf_dropout_only_in_training():
    ours = _vit("vitkern")
    x = torch.randn(2, 3, 32, 32)
    a = ours.eval()(pixel_values=x).last_hidden_state
    b = ours.eval()(pixel_values=x).last_hidden_state
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    c = ours.train()(pixel_values=x).last_hidden_state
    assert (c - a).abs().max() > 1e-3, "attention dropout had no effect in training"


def test_hf_padding_mask_matches_eager(vitkern_calls):
    """A text encoder with a padding mask exercises the mask slot (transformers builds bool masks for vitkern)."""
    kw = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
              max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(5)
    ref = transformers.BertModel(transformers.BertConfig(**kw, attn_implementation="eager")).eval()
    ours = transformers.BertModel(transformers.BertConfig(**kw, attn_implementation="vitkern")).eval()
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 50, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[0, 9:] = 0
    mask[2, 4:] = 0
    out_ref = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    out = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-4)
    assert len(vitkern_calls) == 1


def test_hf_output_attentions_is_refused():
    ours = _vit("vitkern").eval()
    with pytest.raises(ValueError, match="output_attentions"):
        ours(pixel_values=torch.randn(1, 3, 32, 32), output_attentions=True)


def _eager(query, key, value, mask, scaling):
    scores = query @ key.transpose(-1, -2) * scaling
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ value).transpose(1, 2)


def test_hf_attention_function_masks_and_gqa():
    """The registered function directly: float additive and bool masks, a mask longer than the keys, GQA."""
    from vitkern.integrations.transformers import vitkern_attention_forward
    module = nn.Module()
    module.is_causal = False
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 8)
    k_rep, v_rep = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    additive = torch.randn(2, 1, 9, 13)
    out, weights = vitkern_attention_forward(module, q, k, v, additive, scaling=0.3)
    assert weights is None and out.shape == (2, 9, 4, 8)
    torch.testing.assert_close(out, _eager(q, k_rep, v_rep, additive[..., :11], 0.3), atol=1e-5, rtol=1e-5)
    keep = torch.rand(2, 1, 9, 11) > 0.3
    keep[..., 0] = True
    out, _ = vitkern_attention_forward(module, q, k, v, keep, scaling=0.3)
    bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(out, _eager(q, k_rep, v_rep, bias, 0.3), atol=1e-5, rtol=1e-5)


def test_hf_head_mask_in_mask_slot_of_transformers_4(monkeypatch):
    """transformers 4.x ViT passed head_mask (a factor on each head's probabilities) in the mask slot."""
    import vitkern.integrations.transformers as hf
    monkeypatch.setattr(hf, "_TRANSFORMERS_MAJOR", 4)
    module = type("ViTSelfAttention", (nn.Module,), {"is_causal": False})()
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    head_mask = torch.tensor([1.0, 0.0, 0.5]).reshape(1, 3, 1, 1)
    out, _ = hf.vitkern_attention_forward(module, q, k, v, head_mask, scaling=8 ** -0.5)
    probs = (q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1) * head_mask
    torch.testing.assert_close(out, (probs @ v).transpose(1, 2), atol=1e-5, rtol=1e-5)
