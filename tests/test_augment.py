"""Random affine views (clusterlight.nn.augment) against scipy.ndimage and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from clusterlight.nn.augment import affine_theta, random_affine, warp


def _scipy_warp(image: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """The same resampling by scipy: pixel (row r, column c) of the output reads the input at the
    location that ``theta`` gives for the pixel centre's normalised coordinates (align_corners=False:
    ``x = (2c + 1) / W - 1``, back to pixels by ``c = ((x + 1) W - 1) / 2``)."""
    h, w = image.shape

    def source(r: float, c: float) -> np.ndarray:
        x, y = (2 * c + 1) / w - 1, (2 * r + 1) / h - 1
        xs, ys = theta @ np.array([x, y, 1.0])
        return np.array([((ys + 1) * h - 1) / 2, ((xs + 1) * w - 1) / 2])

    offset = source(0, 0)
    matrix = np.stack([source(1, 0) - offset, source(0, 1) - offset], 1)  # columns: d/dr, d/dc
    return ndimage.affine_transform(image, matrix, offset=offset, order=1, mode="grid-constant", cval=0.0)


def test_warp_matches_scipy_affine_transform_on_random_images() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 12, 16, generator=gen, dtype=torch.float64).float()
    theta = affine_theta(torch.rand(6, 4, generator=gen), strength=2.0)
    out = warp(images, theta)
    for i in range(6):
        ref = _scipy_warp(images[i, 0].double().numpy(), theta[i].double().numpy())
        np.testing.assert_allclose(out[i, 0].numpy(), ref, atol=1e-5)


def test_theta_is_the_hand_computed_rotation_scale_and_shift() -> None:
    # u = 1 in the rotation column at strength 1: +15 degrees, nothing else
    theta = affine_theta(torch.tensor([[1.0, 0.5, 0.5, 0.5]]), 1.0)[0]
    c, s = math.cos(math.radians(15)), math.sin(math.radians(15))
    torch.testing.assert_close(theta, torch.tensor([[c, -s, 0.0], [s, c, 0.0]]))
    # u = 0 in the scale column: scale 0.85 (sampling matrix 1 / 0.85); u = 0.75 shifts: 0.075 * strength 2
    theta = affine_theta(torch.tensor([[0.5, 0.0, 0.75, 0.25]]), 2.0)[0]
    torch.testing.assert_close(theta, torch.tensor([[1 / 0.7, 0.0, 0.15], [0.0, 1 / 0.7, -0.15]]))
    with pytest.raises(ValueError, match=r"shape \(B, 4\)"):
        affine_theta(torch.zeros(3, 3), 1.0)


def test_integer_pixel_shift_moves_the_content_and_fills_zeros() -> None:
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    # a horizontal shift of 2 pixels: 4 / W in normalised coordinates = 0.15 * 2 * (2u - 1)
    u = torch.tensor([[0.5, 0.5, (0.25 / 0.3 + 1) / 2, 0.5]]).repeat(2, 1)
    out = random_affine(images, u, 2.0)
    expected = torch.zeros_like(images)
    expected[..., :14] = images[..., 2:]  # the sample for column c is input column c + 2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_strength_zero_and_centred_draws_leave_images_unchanged() -> None:
    images = torch.rand(3, 2, 10, 10, generator=torch.Generator().manual_seed(2))
    assert random_affine(images, torch.rand(3, 4), 0.0) is images
    torch.testing.assert_close(random_affine(images, torch.full((3, 4), 0.5), 3.0), images, atol=1e-6, rtol=0)


def test_warp_keeps_dtype_under_bf16_autocast() -> None:
    images = torch.rand(2, 1, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = warp(images, affine_theta(torch.rand(2, 4), 1.0))
    assert out.dtype == torch.bfloat16 and out.shape == images.shape
