"""Float32 regions inside mixed precision.

With ``--trainer.precision bf16-mixed`` (or ``16-mixed`` on a GPU) Lightning runs the training,
validation, test and predict steps under ``torch.autocast``, which casts matrix products to
bfloat16/float16 *even when their inputs are float32*. The networks profit from that; the
clustering arithmetic does not: squared distances computed as ``|x|^2 - 2 x.c + |c|^2`` lose all
their precision to cancellation in 8 mantissa bits, pooled statistics and k-means drift. Every
such computation in clusterlight (k-means, the kNN graph and agglomeration, distances to centres,
mixture posteriors, statistics pooling, triplet distances) runs inside :func:`no_autocast` or a
function decorated with :func:`float32_math`, and casts its inputs with ``.float()``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["float32_math", "no_autocast"]

F = TypeVar("F", bound=Callable[..., Any])


def _device_types(values: Any) -> set[str]:
    types: set[str] = set()
    for v in values:
        if isinstance(v, Tensor):
            types.add(v.device.type)
        elif isinstance(v, (list, tuple)):
            types |= {t.device.type for t in v if isinstance(t, Tensor)}
    return types


@contextlib.contextmanager
def no_autocast(*tensors: Any) -> Iterator[None]:
    """Switch autocast off for the device types of ``tensors`` (CPU when none is given).

    Inside, float32 inputs give float32 results; cast bfloat16/float16 inputs with ``.float()``.
    """
    types = _device_types(tensors) or {"cpu"}
    with contextlib.ExitStack() as stack:
        for device_type in sorted(types):
            try:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            except (RuntimeError, ValueError):  # a device type without autocast: nothing to switch off
                pass
        yield


def float32_math(fn: F) -> F:
    """Decorator: run ``fn`` with autocast off for the device types of its tensor arguments."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with no_autocast(*args, *kwargs.values()):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
