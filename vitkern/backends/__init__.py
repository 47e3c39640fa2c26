"""Backend registry and selection.

``backend=None`` walks the device's priority list and takes the first backend that is available and accepts
the input; ``reference`` accepts everything, so automatic selection never fails where some backend could serve.
"""
from __future__ import annotations

import os
from typing import Optional

from .base import Backend
from .reference import ReferenceBackend
from ..errors import VitkernValueError

_REGISTRY: dict[str, Backend] = {}
# Availability is decided once, at registration: it cannot change within a process, and asking again while
# torch.compile traces a call would put a non-tensor query into the graph.
_AVAILABLE: dict[str, bool] = {}
# Fastest first. Triton serves CPU tensors only under TRITON_INTERPRET=1, and only when named explicitly.
_PRIORITY = {"cuda": ["triton", "reference"], "cpu": ["cpu", "reference"]}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend
    _AVAILABLE[backend.name] = bool(backend.available())


def known_backends() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Backend:
    be = _REGISTRY.get(name) if type(name) is str else None
    if be is None:
        raise VitkernValueError(f"backend: expected one of {sorted(_REGISTRY)} or None, got {name!r}")
    return be


def available_backends() -> list[str]:
    """Names of the backends this install can run (on some device)."""
    return [name for name in _REGISTRY if _AVAILABLE[name]]


def select(name: Optional[str], q, k, v, mask, cu_seqlens_q, dropout_p) -> str:
    """Name of the backend that will run this (canonical-layout) call; raises ValueError if ``name`` can't."""
    if name is not None:
        be = get(name)
        if not _AVAILABLE[name]:
            raise VitkernValueError(f"backend={name!r}: {be.unavailable_reason()}")
        why = be.unsupported_reason(q, k, v, mask, cu_seqlens_q, dropout_p)
        if why is not None:
            raise VitkernValueError(f"backend={name!r} can't take this input: {why}")
        return name
    for cand in _PRIORITY.get(q.device.type, ["reference"]):
        be = _REGISTRY.get(cand)
        if be is not None and _AVAILABLE[cand] and be.unsupported_reason(q, k, v, mask, cu_seqlens_q,
                                                                        dropout_p) is None:
            return cand
    return "reference"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


register(ReferenceBackend())


def _register_optional() -> None:
    # Imported here, not at the top, so a missing extension or Triton never breaks `import vitkern`.
    from . import cpu as _cpu  # noqa: F401  (registers itself)
    from . import triton_backend as _triton  # noqa: F401  (imports Triton only when it runs)


_register_optional()
