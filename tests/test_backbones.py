"""The LeNet-style PoolEncoder against a step-by-step functional computation and hand-counted sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clusterlight.nn import PoolEncoder


@pytest.mark.parametrize(("shape", "expect"), [((1, 28, 28), (16, 4, 4)), ((1, 16, 16), (16, 1, 1)),
                                               ((3, 32, 40), (16, 5, 7))])
def test_pool_encoder_sizes_are_the_hand_counted_ones(shape, expect) -> None:
    # 28: conv5 24, pool 12, conv5 8, pool 4; 16: 12, 6, 2, 1; 32 x 40: 28 x 36, 14 x 18, 10 x 14, 5 x 7
    enc = PoolEncoder(shape, latent_dim=7)
    assert enc.feature_shape == expect
    assert enc(torch.rand(3, *shape)).shape == (3, 7)


def test_pool_encoder_equals_the_functional_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    enc = PoolEncoder((1, 28, 28), latent_dim=5, widths=(6, 16), norm="batch").eval()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
    x = torch.rand(4, 1, 28, 28, generator=gen)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    h = x
    for conv, bn in zip(convs, norms):
        h = F.conv2d(h, conv.weight)  # no padding, no bias before batch norm
        h = (h - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps)
        h = h * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
        h = F.max_pool2d(h.clamp_min(0), 2)
    expected = h.flatten(1) @ enc.fc.weight.T + enc.fc.bias
    torch.testing.assert_close(enc(x), expected, atol=1e-5, rtol=1e-5)
    assert len(convs) == 2 and convs[0].weight.shape == (6, 1, 5, 5) and convs[1].weight.shape == (16, 6, 5, 5)


def test_pool_encoder_refuses_images_too_small_for_its_stages() -> None:
    with pytest.raises(ValueError, match="too small"):
        PoolEncoder((1, 16, 16), widths=(6, 16, 32))  # 16 -> 6 -> 1: no room for a third stage
