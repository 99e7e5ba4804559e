"""Convolutional encoders and decoders shared by every method.

The networks adapt to the input shape: 1 or 3 channels, square or not, from 8 to 96 pixels.
Each stage halves the spatial size with a stride-2 convolution (``ceil(n / 2)``), so 28 px
becomes 14, 7, 4 and 96 px becomes 48, 24, 12, 6. Stages are added beyond ``widths`` (repeating
the last width) until the feature map is at most 7 px, and never go below 2 px, so a 96-px
image does not end in a huge flattened layer and an 8-px image is not squeezed to nothing.
The decoder mirrors the encoder stage by stage and restores the exact input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _stage_sizes(height: int, width: int, num_widths: int) -> list[tuple[int, int]]:
    sizes = [(height, width)]
    h, w = height, width
    while min(h, w) > 2 and (len(sizes) - 1 < num_widths or max(h, w) > 7):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got {kind!r}")


class ConvEncoder(nn.Module):
    """Strided convolutional encoder: image ``(B, C, H, W)`` to a vector ``(B, latent_dim)``.

    Args:
        input_shape: ``(channels, height, width)`` of the images.
        latent_dim: size of the output vector.
        widths: channel counts of the first stages; later stages repeat the last one.
        norm: normalisation after each convolution: ``batch``, ``group`` or ``none``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        latent_dim: int = 32,
        widths: Sequence[int] = (32, 64, 128),
        norm: str = "batch",
    ) -> None:
        super().__init__()
        c, h, w = (int(v) for v in input_shape)
        if min(h, w) < 4:
            raise ValueError(f"images must be at least 4 px on each side, got {h}x{w}")
        self.input_shape = (c, h, w)
        self.stage_sizes = _stage_sizes(h, w, len(widths))
        channels = [c] + [widths[min(i, len(widths) - 1)] for i in range(len(self.stage_sizes) - 1)]
        layers: list[nn.Module] = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=norm == "none"), _norm(norm, cout),
                       nn.ReLU(inplace=True)]
        self.channels = channels
        self.features = nn.Sequential(*layers)
        fh, fw = self.stage_sizes[-1]
        self.feature_shape = (channels[-1], fh, fw)
        self.fc = nn.Linear(channels[-1] * fh * fw, latent_dim)
        self.latent_dim = latent_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


class PoolEncoder(nn.Module):
    """LeNet-style encoder: image ``(B, C, H, W)`` to a vector ``(B, latent_dim)``.

    Each stage is a ``kernel x kernel`` convolution without padding, a normalisation, ReLU and
    2x2 max pooling (sizes ``floor((n - kernel + 1) / 2)``); a linear layer maps the flattened
    features to ``latent_dim``. With the defaults a 28-px image goes 24, 12, 8, 4 and a 16-px one
    12, 6, 2, 1: the small network of the online hard clustering authors' code. Max pooling
    makes it more tolerant of small shifts than the strided :class:`ConvEncoder`, with about a
    ninth of its multiply-adds at 28 px and the default widths of each (0.27 million against 2.4).

    Args:
        input_shape: ``(channels, height, width)`` of the images.
        latent_dim: size of the output vector.
        widths: channel counts of the stages (one stage each).
        norm: normalisation after each convolution: ``batch``, ``group`` or ``none``.
        kernel: side of the convolution kernels.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        latent_dim: int = 128,
        widths: Sequence[int] = (6, 16),
        norm: str = "batch",
        kernel: int = 5,
    ) -> None:
        super().__init__()
        c, h, w = (int(v) for v in input_shape)
        self.input_shape = (c, h, w)
        layers: list[nn.Module] = []
        cin = c
        for cout in widths:
            if min(h, w) < kernel + 1:
                raise ValueError(f"a {h}x{w} feature map is too small for a {kernel}-px convolution and 2x2 pooling: "
                                 f"use fewer widths or a smaller kernel")
            h, w = (h - kernel + 1) // 2, (w - kernel + 1) // 2
            layers += [nn.Conv2d(cin, int(cout), kernel, bias=norm == "none"), _norm(norm, int(cout)),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = int(cout)
        self.features = nn.Sequential(*layers)
        self.feature_shape = (cin, h, w)
        self.fc = nn.Linear(cin * h * w, latent_dim)
        self.latent_dim = latent_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


class ConvDecoder(nn.Module):
    """Mirror of a :class:`ConvEncoder`: vector ``(B, latent_dim)`` to image ``(B, C, H, W)`` in [0, 1]."""

    def __init__(self, encoder: ConvEncoder, norm: str = "batch") -> None:
        super().__init__()
        fc, fh, fw = encoder.feature_shape
        self.feature_shape = encoder.feature_shape
        self.fc = nn.Linear(encoder.latent_dim, fc * fh * fw)
        sizes = encoder.stage_sizes[::-1]
        channels = encoder.channels[::-1]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
            (hin, win), (hout, wout) = sizes[i], sizes[i + 1]
            # ConvTranspose2d(k=3, s=2, p=1) gives 2n - 1 + output_padding.
            pad = (hout - (2 * hin - 1), wout - (2 * win - 1))
            last = i == len(channels) - 2
            layers.append(nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=pad))
            if not last:
                layers += [_norm(norm, cout), nn.ReLU(inplace=True)]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        h = torch.relu(self.fc(z)).view(z.shape[0], *self.feature_shape)
        return torch.sigmoid(self.deconv(h))


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder with a linear bottleneck.

    Args:
        input_shape: ``(channels, height, width)``.
        latent_dim: bottleneck size.
        widths: encoder channel counts (the decoder mirrors them).
        norm: ``batch``, ``group`` or ``none``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        latent_dim: int = 10,
        widths: Sequence[int] = (32, 64, 128),
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.encoder = ConvEncoder(input_shape, latent_dim, widths, norm)
        self.decoder = ConvDecoder(self.encoder, norm)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encoder(x)
        return z, self.decoder(z)


class MLP(nn.Module):
    """A small fully connected head: ``in_dim -> hidden... -> out_dim`` with ReLU between layers."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
