"""vitkern.navit: packing round-trips, no token crossing images, token dropping, fractional positions, pooling."""
import math

import pytest
import torch

import vitkern
from vitkern.navit import (AttentionPool, FractionalPosEmbed, drop_tokens, greedy_pack, masked_mean_pool,
                           pack_images, pad_sequences, to_input_order, unpack, unpatchify)
from vitkern.nn import Attention

P = 4
GRIDS = [(2, 3), (5, 1), (4, 4), (1, 1), (3, 3), (7, 2), (1, 6)]


def _images(grids=GRIDS, c=3):
    return [torch.randn(c, P * h, P * w) for h, w in grids]


@pytest.mark.parametrize("sort", [False, True])
def test_pack_round_trip_and_layout(sort):
    images = _images()
    images[1] = images[1].transpose(1, 2).contiguous().transpose(1, 2)  # a non-contiguous image packs too
    batch = pack_images(images, P, max_tokens=20, sort=sort)
    back = unpatchify(batch)
    assert all(torch.equal(a, b) for a, b in zip(images, back))
    assert sorted(batch.order.tolist()) == list(range(len(images)))
    lengths = batch.lengths
    assert lengths.tolist() == [GRIDS[i][0] * GRIDS[i][1] for i in batch.order.tolist()]
    # Every token's image id is its segment's image: no token crosses an image boundary.
    seg = torch.arange(len(images)).repeat_interleave(lengths)
    assert torch.equal(batch.image_ids, batch.order[seg])
    seq_tokens = batch.sequence_token_cu()
    assert int((seq_tokens[1:] - seq_tokens[:-1]).max()) <= 20
    assert batch.max_seqlen == int(lengths.max())
    # Positions enumerate each full grid exactly once.
    for pos, (h, w) in zip(unpack(batch.positions, batch), GRIDS):
        assert sorted(map(tuple, pos.tolist())) == [(y, x) for y in range(h) for x in range(w)]


def test_greedy_pack_is_first_fit():
    assert greedy_pack([6, 5, 16, 1, 9], 20) == [[0, 1, 3], [2], [4]]
    assert greedy_pack([6, 5, 16, 1, 9], 20, sort=True) == [[2, 3], [4, 0, 1]]


def test_packed_attention_never_crosses_images():
    """Attention over the packed batch equals attention over each image alone."""
    images = _images()
    batch = pack_images(images, P, max_tokens=24)
    attn = Attention(P * P * 3, num_heads=4, qkv_bias=True)
    x = batch.patches
    out = attn(x, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    for i, (part, tokens) in enumerate(zip(unpack(out, batch), unpack(x, batch))):
        torch.testing.assert_close(part, attn(tokens[None])[0], atol=1e-5, rtol=1e-5, msg=f"image {i}")


def test_pad_sequences():
    batch = pack_images(_images(), P, max_tokens=20)
    padded, valid = pad_sequences(batch.patches, batch)
    assert padded.shape == (batch.num_sequences, 20, batch.patches.shape[1])
    assert torch.equal(padded[valid], batch.patches)
    assert padded[~valid].abs().sum() == 0


def test_token_dropping_fixed_rate():
    images = _images()
    batch = pack_images(images, P, max_tokens=20, drop_rate=0.5, generator=torch.Generator().manual_seed(0))
    full = torch.tensor([GRIDS[i][0] * GRIDS[i][1] for i in batch.order.tolist()])
    expected = torch.round(full * 0.5).clamp(min=1).to(torch.int64)
    assert torch.equal(batch.lengths, expected)
    # The kept patches are the image's pixels at their positions, the dropped ones are zero.
    for img, back, pos in zip(images, unpatchify(batch), unpack(batch.positions, batch)):
        assert len(set(map(tuple, pos.tolist()))) == pos.shape[0]
        keep = torch.zeros(img.shape[1] // P, img.shape[2] // P, dtype=torch.bool)
        keep[pos[:, 0], pos[:, 1]] = True
        pix = keep.repeat_interleave(P, 0).repeat_interleave(P, 1)
        assert torch.equal(back[:, pix], img[:, pix]) and back[:, ~pix].abs().sum() == 0


def test_token_dropping_frees_budget_and_is_reproducible():
    images = _images([(4, 4)] * 6)
    dense = pack_images(images, P, max_tokens=32)
    dropped = pack_images(images, P, max_tokens=32, drop_rate=0.5, generator=torch.Generator().manual_seed(1))
    assert dense.num_sequences == 3 and dropped.num_sequences == 2
    again = pack_images(images, P, max_tokens=32, drop_rate=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dropped.positions, again.positions)


def test_token_dropping_per_image_and_sampled_rates():
    images = _images()
    batch = pack_images(images, P, max_tokens=64)
    rates = torch.tensor([0.0, 0.2, 0.5, 0.9, 0.3, 0.75, 0.5])
    per = drop_tokens(batch, rates)
    full = torch.tensor([h * w for h, w in GRIDS])
    want = torch.round(full * (1 - rates.double())).clamp(min=1).to(torch.int64)
    got = torch.empty_like(want)
    got[per.order] = per.lengths
    assert torch.equal(got, want)
    sampled = drop_tokens(batch, (0.2, 0.6), generator=torch.Generator().manual_seed(2))
    ratio = sampled.lengths.double() / batch.lengths.double()
    big = batch.lengths >= 8  # rounding dominates on tiny images
    assert bool(((ratio[big] >= 0.4 - 0.07) & (ratio[big] <= 0.8 + 0.07)).all())
    assert bool((sampled.lengths >= 1).all())


@pytest.mark.parametrize("images, kwargs, match", [
    ([], {}, "images: expected at least one image"),
    ([torch.randn(3, 8, 8), torch.randn(1, 8, 8)], {}, r"images\[1\]: expected 3 channels"),
    ([torch.randn(3, 8, 6)], {}, r"images\[0\]: expected height and width divisible by patch_size=4"),
    ([torch.randn(3, 8, 8), torch.randn(3, 8, 8), torch.randn(3, 40, 40)], {},
     r"images\[2\]: 100 tokens does not fit the token budget max_tokens=20"),
    ([torch.randn(8, 8)], {}, r"images\[0\]: expected a \[C, H, W\] tensor"),
    ([torch.randn(3, 8, 8)], {"drop_rate": 1.0}, r"drop_rate: expected rates in \[0, 1\)"),
    ([torch.randn(3, 8, 8)], {"drop_rate": (0.5, 0.2)}, "drop_rate: expected \\(low, high\\)"),
])
def test_bad_input_errors(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack_images(images, P, max_tokens=20, **kwargs)


def test_fractional_positions_and_embeddings():
    batch = pack_images(_images([(2, 4), (4, 8)]), P, max_tokens=64)
    frac = batch.fractional_positions()
    assert frac.min() >= 0 and frac.max() < 1
    first, second = unpack(frac, batch)
    # Same fractional place in a 2x4 and a 4x8 grid -> the same embedding (resolution independent).
    for kind in ("learned", "sincos"):
        emb = FractionalPosEmbed(16, kind=kind, num_buckets=8)
        e1, e2 = unpack(emb(frac), batch)
        torch.testing.assert_close(e1[1 * 4 + 3], e2[2 * 8 + 6])  # (1/2, 3/4) in both
        assert not torch.allclose(e1[0], e1[1])


def test_sincos_embedding_values():
    emb = FractionalPosEmbed(4, kind="sincos", num_buckets=10)
    frac = torch.tensor([[0.25, 0.5]])
    y, x = 0.25 * 10, 0.5 * 10
    freqs = [1.0, 1.0 / 100.0]  # 10000^(-k/2) for dim 4
    want = [math.sin(y * f) + math.sin(x * f) for f in freqs] + [math.cos(y * f) + math.cos(x * f) for f in freqs]
    torch.testing.assert_close(emb(frac)[0], torch.tensor(want), atol=1e-6, rtol=1e-6)


def test_masked_mean_pool():
    lengths = [3, 0, 7, 1]
    cu = vitkern.lengths_to_cu_seqlens(lengths)
    x = torch.randn(11, 5, dtype=torch.float64)
    pooled = masked_mean_pool(x, cu)
    parts = torch.split(x, lengths)
    for i, part in enumerate(parts):
        want = part.mean(0) if part.shape[0] else torch.zeros(5, dtype=torch.float64)
        torch.testing.assert_close(pooled[i], want)


def test_attention_pool_matches_per_image_softmax_in_float64():
    torch.manual_seed(0)
    pool = AttentionPool(16, num_heads=2)
    lengths = [5, 1, 9]
    cu = vitkern.lengths_to_cu_seqlens(lengths)
    x = torch.randn(15, 16, requires_grad=True)
    out = pool(x, cu)
    out.sum().backward()
    pool64 = AttentionPool(16, num_heads=2).double()
    pool64.load_state_dict({k: v.double() for k, v in pool.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    q = pool64.q(pool64.query).reshape(2, 8)
    k, v = pool64.kv(x64).reshape(15, 2, 2, 8).unbind(1)
    rows = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        w = torch.softmax(torch.einsum("hd,nhd->hn", q, k[a:b]) / math.sqrt(8), dim=-1)
        rows.append(torch.einsum("hn,nhd->hd", w, v[a:b]).reshape(16))
    want = pool64.proj(torch.stack(rows))
    want.sum().backward()
    torch.testing.assert_close(out, want.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad, x64.grad.float(), atol=1e-5, rtol=1e-4)


def test_to_input_order():
    batch = pack_images(_images(), P, max_tokens=20, sort=True)
    pooled = masked_mean_pool(batch.patches, batch.cu_seqlens)
    ordered = to_input_order(pooled, batch)
    for i, tokens in enumerate(unpack(batch.patches, batch)):
        torch.testing.assert_close(ordered[i], tokens.mean(0))
