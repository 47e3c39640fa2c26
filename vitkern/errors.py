"""The exceptions vitkern raises for bad arguments.

torch's SDPA raises RuntimeError for bad input; Python code conventionally raises ValueError/TypeError. Each
vitkern class is both, so ``except RuntimeError`` written around torch's SDPA and ``except ValueError`` written
for vitkern catch the same errors. A failure inside a kernel stays a plain RuntimeError.
"""


class VitkernValueError(ValueError, RuntimeError):
    """A bad argument value (shape, size, device, range); also a RuntimeError, as torch's SDPA raises."""


class VitkernTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype; also a RuntimeError, as torch's SDPA raises."""
