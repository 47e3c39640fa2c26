"""NaViT's Patch n' Pack: variable-size images -> one packed token sequence whose images the kernels keep apart.

``pack_images`` assigns images greedily (first fit) to sequences of at most ``max_tokens`` tokens, patchifies
them, and returns a ``PackedBatch``: the tokens of all sequences back to back ([T, C·p·p], no padding), one
cu_seqlens segment per image (what ``varlen_attention`` / ``vitkern.nn.Attention`` take: tokens attend within
their image only), each token's image and (y, x) patch position. The per-image work is views; everything
per-token (positions, dropping) is vectorized.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..cu_seqlens import lengths_to_cu_seqlens
from ..errors import VitkernTypeError, VitkernValueError


@dataclass(frozen=True)
class PackedBatch:
    """A packed batch. T tokens, I images (in packed order), S sequences of at most ``max_tokens`` tokens.

    patches     [T, C·p·p]  patch pixels, flattened in (channel, row, column) order (Conv2d weight order)
    cu_seqlens  int32 [I+1] token boundaries of each image: the attention segments
    image_ids   int64 [T]   index of each token's image in the input list
    positions   int64 [T, 2] (y, x) of each token's patch in its image's patch grid
    grid_sizes  int64 [I, 2] (rows, columns) of each image's full patch grid (before any token dropping)
    order       int64 [I]   input index of each packed image (packed image i is input image order[i])
    sequence_cu int64 [S+1] image boundaries of each packed sequence (sequence s holds packed images
                            sequence_cu[s] .. sequence_cu[s+1]-1)
    max_seqlen  int         the longest image in tokens (a hint for the kernels)
    """
    patches: Tensor
    cu_seqlens: Tensor
    image_ids: Tensor
    positions: Tensor
    grid_sizes: Tensor
    order: Tensor
    sequence_cu: Tensor
    max_seqlen: int
    max_tokens: int
    patch_size: int
    channels: int

    @property
    def num_images(self) -> int:
        return self.order.numel()

    @property
    def num_sequences(self) -> int:
        return self.sequence_cu.numel() - 1

    @property
    def lengths(self) -> Tensor:
        """int64 [I] tokens per packed image."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).to(torch.int64)

    def fractional_positions(self) -> Tensor:
        """float32 [T, 2]: (y / rows, x / columns) of each token, in [0, 1) (NaViT's fractional coordinates)."""
        grid = self.grid_sizes.repeat_interleave(self.lengths, dim=0)
        return self.positions.to(torch.float32) / grid.to(torch.float32)

    def sequence_token_cu(self) -> Tensor:
        """int64 [S+1]: token boundaries of each packed sequence."""
        return self.cu_seqlens.to(torch.int64)[self.sequence_cu]


def _check_images(images, patch_size: int, max_tokens: int) -> list[tuple[int, int]]:
    if not isinstance(images, (list, tuple)):
        raise VitkernTypeError(f"images: expected a list of [C, H, W] tensors, got {type(images).__name__}")
    if len(images) == 0:
        raise VitkernValueError("images: expected at least one image, got an empty list")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise VitkernValueError(f"patch_size: expected a positive int, got {patch_size!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise VitkernValueError(f"max_tokens: expected a positive int, got {max_tokens!r}")
    first = images[0]
    grids = []
    for i, img in enumerate(images):
        if not isinstance(img, Tensor):
            raise VitkernTypeError(f"images[{i}]: expected a torch.Tensor, got {type(img).__name__}")
        if img.dim() != 3:
            raise VitkernValueError(f"images[{i}]: expected a [C, H, W] tensor, got shape {tuple(img.shape)}")
        if img.shape[0] != first.shape[0]:
            raise VitkernValueError(f"images[{i}]: expected {first.shape[0]} channels (as images[0]), got {img.shape[0]}")
        if img.dtype != first.dtype or img.device != first.device:
            raise VitkernValueError(f"images[{i}]: expected dtype {first.dtype} on {first.device} (as images[0]), got "
                                    f"{img.dtype} on {img.device}")
        h, w = img.shape[1], img.shape[2]
        if h % patch_size or w % patch_size or h == 0 or w == 0:
            raise VitkernValueError(f"images[{i}]: expected height and width divisible by patch_size={patch_size}, got "
                                    f"{h}x{w}")
        grids.append((h // patch_size, w // patch_size))
    return grids


def greedy_pack(lengths: Sequence[int], max_tokens: int, sort: bool = False) -> list[list[int]]:
    """First-fit packing: lists of indices into ``lengths``, each list summing to at most ``max_tokens``.

    With ``sort`` the longest items are placed first (first-fit decreasing: fewer sequences, order changes).
    Raises ValueError naming the first item longer than the budget.
    """
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise VitkernValueError(f"images[{i}]: {n} tokens does not fit the token budget max_tokens={max_tokens}")
    items = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else range(len(lengths))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in items:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return bins


def _patchify_into(images: Sequence[Tensor], order: list[int], lengths: list[int], p: int) -> Tensor:
    """[T, C·p·p] patches of images[order[0]], images[order[1]], ... written straight into one buffer (one copy
    per pixel, where patchify-then-cat would make two)."""
    c = images[0].shape[0]
    out = images[0].new_empty(sum(lengths), c * p * p)
    start = 0
    for i, n in zip(order, lengths):
        _, h, w = images[i].shape
        out[start:start + n].view(h // p, w // p, c, p, p).copy_(
            images[i].reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4))
        start += n
    return out


def _grid_positions(grid_sizes: Tensor, lengths: Tensor) -> Tensor:
    """int64 [T, 2] (y, x) of every token of full (undropped) grids, packed back to back."""
    starts = torch.cumsum(lengths, 0) - lengths
    local = torch.arange(int(lengths.sum()), device=lengths.device) - starts.repeat_interleave(lengths)
    cols = grid_sizes[:, 1].repeat_interleave(lengths)
    return torch.stack((local // cols, local % cols), dim=1)


def pack_images(images: Sequence[Tensor], patch_size: int, max_tokens: int, *, drop_rate=None,
                sort: bool = False, generator: Optional[torch.Generator] = None) -> PackedBatch:
    """Greedily pack images of any size into sequences of at most ``max_tokens`` patches.

    images: list of [C, H, W] (same C, dtype, device; H and W multiples of ``patch_size``).
    drop_rate: None, a float in [0, 1), a per-image sequence/tensor [N] of rates, or a (low, high) tuple to
    sample a rate per image uniformly; dropped tokens free room in the budget (NaViT's token dropping). Each
    image keeps at least one token. Returns a PackedBatch (see its docstring for shapes).
    """
    from .token_drop import keep_counts, select_kept  # local: token_drop imports this module

    grids = _check_images(images, patch_size, max_tokens)
    device = images[0].device
    full = torch.tensor([h * w for h, w in grids], dtype=torch.int64)
    kept = full if drop_rate is None else keep_counts(full, drop_rate, generator)
    bins = greedy_pack(kept.tolist(), max_tokens, sort=sort)
    order = torch.tensor([i for b in bins for i in b], dtype=torch.int64)
    sequence_cu = lengths_to_cu_seqlens([len(b) for b in bins], dtype=torch.int64)
    grid_sizes = torch.tensor(grids, dtype=torch.int64)[order]
    full_packed = full[order]
    patches = _patchify_into(images, order.tolist(), full_packed.tolist(), patch_size)
    positions = _grid_positions(grid_sizes, full_packed)
    image_ids = order.repeat_interleave(full_packed)
    lengths = full_packed
    if drop_rate is not None:
        keep = select_kept(full_packed, kept[order], generator)
        patches, positions, image_ids, lengths = patches[keep], positions[keep], image_ids[keep], kept[order]
    return PackedBatch(patches=patches, cu_seqlens=lengths_to_cu_seqlens(lengths, device=device),
                       image_ids=image_ids.to(device), positions=positions.to(device),
                       grid_sizes=grid_sizes.to(device), order=order.to(device), sequence_cu=sequence_cu.to(device),
                       max_seqlen=int(lengths.max()), max_tokens=max_tokens, patch_size=patch_size,
                       channels=images[0].shape[0])


def unpack(x: Tensor, batch: PackedBatch) -> list[Tensor]:
    """Per-token outputs x [T, ...] -> list of [n_i, ...], one per input image, in input order."""
    if x.shape[0] != batch.image_ids.numel():
        raise VitkernValueError(f"x: expected {batch.image_ids.numel()} tokens in dim 0 (the batch's), got {x.shape[0]}")
    parts = torch.split(x, batch.lengths.tolist(), dim=0)
    out: list[Optional[Tensor]] = [None] * batch.num_images
    for packed_index, input_index in enumerate(batch.order.tolist()):
        out[input_index] = parts[packed_index]
    return out


def to_input_order(per_image: Tensor, batch: PackedBatch) -> Tensor:
    """Per-image outputs in packed order [I, ...] (e.g. pooled features) -> the same in input order."""
    if per_image.shape[0] != batch.num_images:
        raise VitkernValueError(f"per_image: expected {batch.num_images} rows (one per image), got {per_image.shape[0]}")
    out = torch.empty_like(per_image)
    out[batch.order] = per_image
    return out


def unpatchify(batch: PackedBatch, patches: Optional[Tensor] = None) -> list[Tensor]:
    """Inverse of the patchify in pack_images: list of [C, H, W] images in input order. Dropped patches are 0.

    patches: [T, C·p·p] (defaults to batch.patches).
    """
    patches = batch.patches if patches is None else patches
    p, c = batch.patch_size, batch.channels
    images = []
    for part, (rows, cols), pos in zip(unpack(patches, batch), batch.grid_sizes[batch.order.argsort()].tolist(),
                                       unpack(batch.positions, batch)):
        grid = part.new_zeros(rows, cols, c * p * p)
        grid[pos[:, 0], pos[:, 1]] = part
        images.append(grid.reshape(rows, cols, c, p, p).permute(2, 0, 3, 1, 4).reshape(c, rows * p, cols * p))
    return images


def pad_sequences(x: Tensor, batch: PackedBatch) -> tuple[Tensor, Tensor]:
    """Packed per-token values x [T, ...] -> padded [S, max_tokens, ...] and bool valid [S, max_tokens] (padding
    at the end of each sequence only), for code that wants fixed-shape sequences."""
    cu = batch.sequence_token_cu()
    counts = cu[1:] - cu[:-1]
    seq = torch.arange(batch.num_sequences, device=x.device).repeat_interleave(counts)
    slot = torch.arange(x.shape[0], device=x.device) - cu[:-1].repeat_interleave(counts)
    out = x.new_zeros(batch.num_sequences, batch.max_tokens, *x.shape[1:])
    out[seq, slot] = x
    valid = torch.zeros(batch.num_sequences, batch.max_tokens, dtype=torch.bool, device=x.device)
    valid[seq, slot] = True
    return out, valid


def with_patches(batch: PackedBatch, patches: Tensor) -> PackedBatch:
    """The same layout carrying other per-token values (e.g. embeddings) [T, ...] in ``patches``."""
    return replace(batch, patches=patches)
