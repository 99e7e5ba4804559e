"""Random affine views (clusterlight.nn.augment) against scipy.ndimage and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from clusterlight.nn.augment import affine_theta, random_affine, warp


def _pixel_map(theta: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The sampling map in pixels, ``(row, col) -> matrix @ (row, col) + offset``, derived from the
    normalised coordinates of the pixel centres (align_corners=False: ``x = (2c + 1) / W - 1``,
    back to pixels by ``c = ((x + 1) W - 1) / 2``)."""

    def source(r: float, c: float) -> np.ndarray:
        x, y = (2 * c + 1) / w - 1, (2 * r + 1) / h - 1
        xs, ys = theta @ np.array([x, y, 1.0])
        return np.array([((ys + 1) * h - 1) / 2, ((xs + 1) * w - 1) / 2])

    offset = source(0, 0)
    return np.stack([source(1, 0) - offset, source(0, 1) - offset], 1), offset  # columns: d/dr, d/dc


def _scipy_warp(image: np.ndarray, theta: np.ndarray, order: int = 1) -> np.ndarray:
    """The same resampling by scipy: pixel (row r, column c) of the output reads the input at the
    location that ``theta`` gives for the pixel centre's normalised coordinates (align_corners=False:
    ``x = (2c + 1) / W - 1``, back to pixels by ``c = ((x + 1) W - 1) / 2``)."""
    matrix, offset = _pixel_map(theta, *image.shape)
    return ndimage.affine_transform(image, matrix, offset=offset, order=order, mode="grid-constant", cval=0.0)


def test_warp_matches_scipy_affine_transform_on_random_images() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 12, 16, generator=gen, dtype=torch.float64).float()
    theta = affine_theta(torch.rand(6, 4, generator=gen), strength=2.0)
    out = warp(images, theta)
    for i in range(6):
        ref = _scipy_warp(images[i, 0].double().numpy(), theta[i].double().numpy())
        np.testing.assert_allclose(out[i, 0].numpy(), ref, atol=1e-5)


def test_nearest_warp_matches_scipy_order_zero_on_random_images() -> None:
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(6, 1, 12, 16, generator=gen)
    theta = affine_theta(torch.rand(6, 4, generator=gen), strength=2.0)
    out = warp(images, theta, mode="nearest")
    for i in range(6):
        ref = _scipy_warp(images[i, 0].double().numpy(), theta[i].double().numpy(), order=0)
        assert np.mean(np.isclose(out[i, 0].numpy(), ref, atol=1e-6)) > 0.98  # a sample exactly between two pixels may round either way
        assert set(np.round(out[i, 0].numpy(), 6).ravel()) <= set(np.round(images[i, 0].numpy(), 6).ravel()) | {0.0}
    with pytest.raises(ValueError, match="mode must be one of"):
        warp(images, theta, mode="bicubic")


def test_subpixel_shift_fades_stripes_bilinear_but_not_nearest() -> None:
    """One-pixel vertical stripes (0, 1, 0, 1, ...) moved by 0.4 of a pixel: bilinear sampling mixes
    each pair of columns 0.6 : 0.4 (stripes of 0.4 and 0.6), the nearest pixel keeps them (0 and 1)."""
    stripes = torch.zeros(1, 1, 8, 8)
    stripes[..., 1::2] = 1.0
    # 0.4 pixel: 0.8 / W in normalised coordinates = 0.15 * 1 * (2u - 1)
    u = torch.tensor([[0.5, 0.5, (0.8 / 8 / 0.15 + 1) / 2, 0.5]])
    bilinear = random_affine(stripes, u, 1.0)[0, 0, :, :7]
    nearest = random_affine(stripes, u, 1.0, mode="nearest")[0, 0, :, :7]
    expected = torch.tensor([0.4, 0.6] * 3 + [0.4]).expand(8, 7)  # column c reads c + 0.4
    torch.testing.assert_close(bilinear, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(nearest, stripes[0, 0, :, :7], atol=0, rtol=0)  # rounds to column c


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


def test_parts_leave_the_other_components_at_the_identity() -> None:
    u = torch.tensor([[1.0, 0.0, 0.75, 0.25]])  # +15 deg at strength 1, scale 0.85, shift (+0.075, -0.075)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    # strength 2: rotation only, scale only, shift only, rotation and shift
    torch.testing.assert_close(affine_theta(u, 2.0, parts=("rotation",))[0], torch.tensor([[c, -s, 0.0], [s, c, 0.0]]))
    torch.testing.assert_close(affine_theta(u, 2.0, parts=("scale",))[0], torch.tensor([[1 / 0.7, 0.0, 0.0], [0.0, 1 / 0.7, 0.0]]))
    torch.testing.assert_close(affine_theta(u, 2.0, parts=("shift",))[0], torch.tensor([[1.0, 0.0, 0.15], [0.0, 1.0, -0.15]]))
    torch.testing.assert_close(affine_theta(u, 2.0, parts=("shift", "rotation"))[0], torch.tensor([[c, -s, 0.15], [s, c, -0.15]]))
    with pytest.raises(ValueError, match="unknown affine parts"):
        affine_theta(u, 1.0, parts=("shear",))


def test_per_component_strengths_are_the_hand_computed_map() -> None:
    u = torch.tensor([[1.0, 0.0, 0.75, 0.25]])  # +15 deg at strength 1, scale 0.85, shift (+0.075, -0.075)
    # rotation at strength 2 (30 degrees), scale at strength 3 (0.55), shift at strength 0.5 (0.0375)
    c, s = math.cos(math.radians(30)) / 0.55, math.sin(math.radians(30)) / 0.55
    torch.testing.assert_close(affine_theta(u, (2.0, 3.0, 0.5))[0],
                               torch.tensor([[c, -s, 0.0375], [s, c, -0.0375]]))
    # a component not drawn stays at the identity whatever its strength
    torch.testing.assert_close(affine_theta(u, (2.0, 3.0, 0.5), parts=("scale",))[0],
                               torch.tensor([[1 / 0.55, 0.0, 0.0], [0.0, 1 / 0.55, 0.0]]))
    # three equal strengths are the one number, bit for bit
    draws = torch.rand(20, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(affine_theta(draws, (2.0, 2.0, 2.0), (28, 20)), affine_theta(draws, 2.0, (28, 20)))
    images = torch.rand(2, 1, 8, 8)
    assert random_affine(images, torch.rand(2, 4), (0.0, 0.0, 0.0)) is images
    with pytest.raises(ValueError, match="strength must be a number or 3 numbers"):
        affine_theta(u, (1.0, 2.0))


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


@pytest.mark.parametrize("size", [(16, 16), (12, 32), (40, 10)])
def test_rotation_is_rigid_in_pixels_for_any_aspect_ratio(size: tuple[int, int]) -> None:
    """The sampling map in pixels is a rotation by the drawn angle divided by the drawn scale
    (``M^T M = I / scale^2``, the angle from ``M``), for square and non-square images alike."""
    u = torch.tensor([[0.9, 0.2, 0.5, 0.5], [0.1, 0.7, 0.3, 0.8]])
    theta = affine_theta(u, 1.0, size).double().numpy()
    for i, (ur, us, _, _) in enumerate(u.tolist()):
        matrix, _ = _pixel_map(theta[i], *size)
        scale = 1 + (2 * us - 1) * 0.15
        np.testing.assert_allclose(matrix.T @ matrix, np.eye(2) / scale**2, atol=1e-6)
        angle = math.atan2(matrix[1, 0], matrix[0, 0])  # row from column: + for a content rotation
        assert abs(abs(angle) - math.radians(15 * abs(2 * ur - 1))) < 1e-6
