"""The example models: forward and backward on the default backend equal the same model in float64 on the
reference backend; NaViT's packing keeps images apart; PiT without positions is a set model; train.py runs."""
import copy
import os
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

from blocks import set_backend  # noqa: E402
from cct import CCT  # noqa: E402
from navit import NaViT  # noqa: E402
from pit import PiT  # noqa: E402
from vit import ViT  # noqa: E402

SMALL = dict(dim=32, depth=2, num_heads=2)
IMAGE_MODELS = {
    "vit": lambda: ViT(img_size=8, patch_size=2, **SMALL),
    "pit_sincos": lambda: PiT(img_size=8, pos_embed="sincos", **SMALL),
    "pit_learned": lambda: PiT(img_size=7, pos_embed="learned", **SMALL),
    "cct": lambda: CCT(img_size=8, **SMALL),
}


def _randomize(model):
    # The ViT init (std 0.02) makes attention nearly uniform; wider weights make the check discriminating.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _check_against_float64_reference(model, forward):
    ref = set_backend(copy.deepcopy(model).double(), "reference")
    out = forward(model, torch.float32)
    out_ref = forward(ref, torch.float64)
    torch.testing.assert_close(out, out_ref.float(), atol=5e-5, rtol=1e-4)
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g.double())
    named_ref = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, named_ref[name].grad.float(), atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("name", sorted(IMAGE_MODELS))
def test_image_model_matches_float64_reference(name):
    model = _randomize(IMAGE_MODELS[name]())
    side = 7 if name == "pit_learned" else 8
    x = torch.randn(3, 1, side, side)
    _check_against_float64_reference(model, lambda m, dt: m(x.to(dt)))


@pytest.mark.parametrize("pool, pos", [("mean", "learned"), ("attn", "sincos")])
def test_navit_matches_float64_reference(pool, pos):
    model = _randomize(NaViT(patch_size=4, max_tokens=24, pool=pool, pos_embed=pos, **SMALL)).eval()
    images = [torch.randn(1, 4 * h, 4 * w) for h, w in [(2, 3), (4, 4), (1, 1), (3, 5), (2, 2)]]
    _check_against_float64_reference(model, lambda m, dt: m([im.to(dt) for im in images]))


def test_navit_batch_equals_each_image_alone():
    model = _randomize(NaViT(patch_size=4, max_tokens=32, pool="attn", **SMALL)).eval()
    images = [torch.randn(1, 4 * h, 4 * w) for h, w in [(3, 2), (4, 4), (1, 1), (2, 5)]]
    together = model(images)
    for i, im in enumerate(images):
        torch.testing.assert_close(together[i], model([im])[0], atol=1e-5, rtol=1e-5, msg=f"image {i}")


def test_navit_token_drop_only_in_training():
    model = NaViT(patch_size=4, max_tokens=64, token_drop=0.5, **SMALL)
    images = [torch.randn(1, 16, 16) for _ in range(3)]
    assert model.train().pack(images).patches.shape[0] == 3 * 8
    assert model.eval().pack(images).patches.shape[0] == 3 * 16


def test_pit_without_positions_is_a_set_model():
    model = _randomize(PiT(img_size=8, pos_embed="none", **SMALL)).eval()
    x = torch.randn(2, 1, 8, 8)
    perm = torch.randperm(64)
    shuffled = x.flatten(2)[..., perm].reshape_as(x)
    torch.testing.assert_close(model(x), model(shuffled), atol=1e-5, rtol=1e-5)


def test_train_script_runs(tmp_path):
    import train
    result = train.train("cct", epochs=1, batch_size=32, out_dir=str(tmp_path), progress=False, limit=128)
    assert 0.0 <= result["test_accuracy"] <= 1.0 and len(result["losses"]) == 4
    assert os.path.getsize(result["plot"]) > 1000
