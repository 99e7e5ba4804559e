"""Random affine views of image batches (rotation, scale, shift), on any device.

The draws are passed in (``u``, uniform in ``[0, 1)``), so a caller can make them per dataset index
with its own generator: the same view of a sample whatever the number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["INTERPOLATIONS", "PARTS", "affine_theta", "random_affine", "warp"]

#: At ``strength`` 1: rotation up to 15 degrees either way, scale 0.85 to 1.15, shift up to 7.5 %
#: of the width and of the height either way.
MAX_ROTATION_DEG = 15.0
MAX_SCALE = 0.15
MAX_SHIFT = 0.15  # in grid_sample's normalised coordinates (the image spans [-1, 1])
#: The components of the map, in the order of the columns of ``u`` (shift covers the last two).
PARTS = ("rotation", "scale", "shift")


def affine_theta(u: Tensor, strength: float | Sequence[float], size: tuple[int, int] = (1, 1),
                 parts: tuple[str, ...] = PARTS) -> Tensor:
    """``(B, 2, 3)`` sampling matrices from ``u`` ``(B, 4)`` (uniform draws in ``[0, 1)``).

    Columns of ``u``: rotation, scale, horizontal and vertical shift, each mapped to
    ``strength * max * (2u - 1)``. The matrix maps an output location (normalised coordinates) to
    the input location it samples, as :func:`torch.nn.functional.affine_grid` expects: the content
    is rotated by the angle, magnified by the scale factor and moved by minus the shift (a
    fraction of the width and of the height). ``size`` is the images' ``(height, width)``:
    normalised coordinates stretch the shorter side, so the rotation's off-diagonal terms carry
    the aspect ratio to stay a rigid rotation in pixels. ``parts`` names the components drawn
    (of :data:`PARTS`); the others stay at the identity (their columns of ``u`` are not read).
    ``strength`` is one number for every component or three, in the order of :data:`PARTS`.
    """
    if u.ndim != 2 or u.shape[1] != 4:
        raise ValueError(f"u must have shape (B, 4), got {tuple(u.shape)}")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown affine parts {unknown}; choose from {list(PARTS)}")
    aspect = float(size[0]) / float(size[1])  # H / W
    keep = torch.tensor([p in parts for p in ("rotation", "scale", "shift", "shift")], dtype=torch.float32, device=u.device)
    per_part = (strength,) * len(PARTS) if isinstance(strength, (int, float)) else tuple(strength)
    if len(per_part) != len(PARTS):
        raise ValueError(f"strength must be a number or {len(PARTS)} numbers ({', '.join(PARTS)}), got {strength!r}")
    per = torch.tensor([*per_part, per_part[-1]], dtype=torch.float32, device=u.device)  # the shift for x and y
    v = (2.0 * u.float() - 1.0) * (per * keep)
    angle = v[:, 0] * math.radians(MAX_ROTATION_DEG)
    scale = 1.0 + v[:, 1] * MAX_SCALE
    tx, ty = v[:, 2] * MAX_SHIFT, v[:, 3] * MAX_SHIFT
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos, -sin * aspect, tx], 1), torch.stack([sin / aspect, cos, ty], 1)], 1)


#: The resampling modes of :func:`warp`.
INTERPOLATIONS = ("bilinear", "nearest")


def warp(images: Tensor, theta: Tensor, mode: str = "bilinear") -> Tensor:
    """Resample ``images`` ``(B, C, H, W)`` by ``theta`` ``(B, 2, 3)``: bilinear, zeros outside.

    ``mode: nearest`` copies the nearest input pixel instead: no sub-pixel averaging, so fine
    texture keeps its contrast (bilinear sampling halfway between pixels averages a one-pixel
    stripe pattern to flat). Computed in float32 with autocast off (grid sampling is sensitive to
    rounding); returned in the input's dtype.
    """
    if mode not in INTERPOLATIONS:
        raise ValueError(f"mode must be one of {list(INTERPOLATIONS)}, got {mode!r}")
    with torch.autocast(device_type=images.device.type, enabled=False):
        x = images.float()
        grid = F.affine_grid(theta.float().to(x.device), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.to(images.dtype)


def random_affine(images: Tensor, u: Tensor, strength: float | Sequence[float], parts: tuple[str, ...] = PARTS,
                  mode: str = "bilinear") -> Tensor:
    """``images`` under the random affine maps of :func:`affine_theta` (``strength`` 0: unchanged),
    resampled by :func:`warp` in ``mode``."""
    if (strength == 0) if isinstance(strength, (int, float)) else not any(strength):
        return images
    return warp(images, affine_theta(u, strength, tuple(images.shape[-2:]), parts), mode)
