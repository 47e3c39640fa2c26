"""The cu_seqlens helpers."""
import pytest
import torch

import vitkern


def test_lengths_to_cu_seqlens():
    cu = vitkern.lengths_to_cu_seqlens([3, 0, 5, 1])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8, 9]
    assert vitkern.lengths_to_cu_seqlens(torch.tensor([], dtype=torch.int64)).tolist() == [0]
    assert vitkern.lengths_to_cu_seqlens([2], dtype=torch.int64).dtype == torch.int64


def test_segment_ids_to_cu_seqlens():
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 5, 5])
    assert vitkern.segment_ids_to_cu_seqlens(ids).tolist() == [0, 3, 5, 6, 8]
    assert vitkern.segment_ids_to_cu_seqlens(torch.tensor([], dtype=torch.int64)).tolist() == [0]


def test_segment_ids_match_block_diagonal_mask():
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    cu = vitkern.segment_ids_to_cu_seqlens(ids)
    q, k, v = (torch.randn(8, 2, 16) for _ in range(3))
    packed = vitkern.varlen_attention(q, k, v, cu)
    mask = ids[:, None] == ids[None, :]
    dense = vitkern.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask)
    assert (packed - dense.transpose(0, 1)).abs().max() < 1e-5


@pytest.mark.parametrize("bad,words", [
    ([[1, 2]], ["lengths", "1-D", "2-D"]),
    ([1.5], ["lengths", "integer", "float"]),
    ([3, -1], ["lengths", ">= 0", "-1"]),
])
def test_lengths_bad_input(bad, words):
    with pytest.raises(ValueError) as info:
        vitkern.lengths_to_cu_seqlens(bad)
    for w in words:
        assert w in str(info.value)


def test_segment_ids_bad_input():
    with pytest.raises(ValueError, match="segment_ids.*contiguous run"):
        vitkern.segment_ids_to_cu_seqlens(torch.tensor([0, 0, 1, 0]))
    with pytest.raises(ValueError, match="segment_ids.*1-D"):
        vitkern.segment_ids_to_cu_seqlens(torch.zeros(2, 2, dtype=torch.long))
