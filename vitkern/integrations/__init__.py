"""One-line integrations: ``patch_timm(model)`` and ``attn_implementation="vitkern"`` for transformers.

The submodules import timm / transformers lazily; importing this package needs neither.
"""
