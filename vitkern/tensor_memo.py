"""Values computed from a tensor's contents, remembered while the tensor lives and is not modified in place.

A tensor is known by identity (a weak reference, so the memo never keeps it alive) and its version counter
(bumped by every in-place write, shared by its views), so a remembered value is never stale. The eager path
uses it for what repeats with the same tensor: the cu_seqlens value checks (every layer of a model passes the
same cu_seqlens), the Triton backend's varlen program maps and mask tile summaries (forward and backward, every
layer). Not used while a CUDA graph is captured: tensors made then are filled only when the graph replays.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor


class TensorMemo:
    """memo.get(t, key) / memo.put(t, key, value): a dict per live, unmodified tensor."""

    def __init__(self):
        self._entries: dict = {}     # id(t) -> (weakref to t, t's version when the entry was made, {key: value})

    def _entry(self, t: Tensor):
        e = self._entries.get(id(t))
        if e is None or e[0]() is not t or e[1] != t._version:
            return None
        return e

    def get(self, t: Tensor, key):
        e = self._entry(t)
        return None if e is None else e[2].get(key)

    def put(self, t: Tensor, key, value) -> None:
        e = self._entry(t)
        if e is None:
            i, entries = id(t), self._entries
            e = (weakref.ref(t, lambda _, i=i: entries.pop(i, None)), t._version, {})
            entries[i] = e
        e[2][key] = value

    def clear(self) -> None:
        self._entries.clear()


def memo_allowed(t: Tensor) -> bool:
    """False while torch.compile traces or a CUDA graph is being captured (see the module doc)."""
    if torch.compiler.is_compiling() or type(t) is not Tensor:
        return False
    return t.device.type != "cuda" or not torch.cuda.is_current_stream_capturing()
