"""An ensemble of M convolutional autoencoders (and heads) run as one vectorised network.

Member ``m`` of :class:`EnsembleConvAutoencoder` is exactly a :class:`~clusterlight.nn.ConvAutoencoder`
of the same arguments; the M members are stacked along the channel axis:

- the first convolution is one ``Conv2d(C, M * c1)`` (every member sees the same image), the
  following ones are grouped convolutions ``Conv2d(M * c_in, M * c_out, groups=M)``, and the
  decoder uses grouped ``ConvTranspose2d``; member ``m`` owns channels ``[m * c, (m + 1) * c)``;
- batch/group normalisation over ``M * c`` channels normalises each member's channels on their own
  (the statistics are per channel, group norm groups never straddle two members);
- the fully connected layers are :class:`GroupedLinear`: a weight ``[M, out, in]`` applied by one
  batched matrix product.

So one forward pass computes all members, gradients of one member never touch another's
parameters, and summing the members' losses trains each as if it were trained on its own (on the
same batches). :meth:`EnsembleConvAutoencoder.member` and :meth:`EnsembleConvAutoencoder.load_member`
convert to and from separate modules (for tests, inspection or transfer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from clusterlight.nn.backbones import MLP, ConvAutoencoder, ConvEncoder, _norm

__all__ = ["EnsembleConvAutoencoder", "EnsembleMLP", "GroupedLinear"]


class GroupedLinear(nn.Module):
    """M independent linear layers: ``(B, M, in) -> (B, M, out)``, initialised like ``nn.Linear``."""

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in range(self.members):  # the init of nn.Linear, member by member
            nn.init.kaiming_uniform_(self.weight[m], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.bmm(x.transpose(0, 1), self.weight.transpose(1, 2)).transpose(0, 1)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"members={self.members}, in_features={self.in_features}, out_features={self.out_features}"


def _grouped_norm(kind: str, channels: int, members: int) -> nn.Module:
    if kind == "group":
        per = min(8, channels)  # as backbones._norm, for each member
        return nn.GroupNorm(per * members, channels * members)
    return _norm(kind, channels * members)


class EnsembleConvAutoencoder(nn.Module):
    """M :class:`~clusterlight.nn.ConvAutoencoder` members computed together.

    Args:
        members: ensemble size M.
        input_shape: ``(channels, height, width)``.
        latent_dim: bottleneck size of each member.
        widths: encoder channel counts of each member (the decoder mirrors them).
        norm: ``batch``, ``group`` or ``none``.

    Shapes: :meth:`encode` maps images ``(B, C, H, W)`` to latents ``(B, M, latent_dim)``,
    :meth:`decode` latents ``(B, M, latent_dim)`` to reconstructions ``(B, M, C, H, W)``.
    """

    def __init__(self, members: int, input_shape: Sequence[int], latent_dim: int = 50,
                 widths: Sequence[int] = (32, 64, 128), norm: str = "batch") -> None:
        super().__init__()
        if members < 1:
            raise ValueError(f"members must be at least 1, got {members}")
        self.members = int(members)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.latent_dim = int(latent_dim)
        self.widths = tuple(int(w) for w in widths)
        self.norm = norm
        template = ConvEncoder(self.input_shape, latent_dim, widths, norm)  # shapes only
        self.stage_sizes = template.stage_sizes
        self.channels = template.channels
        self.feature_shape = template.feature_shape
        m = self.members
        # encoder
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(pairwise(self.channels)):
            if i == 0:
                conv = nn.Conv2d(cin, m * cout, 3, stride=2, padding=1, bias=norm == "none")
            else:
                conv = nn.Conv2d(m * cin, m * cout, 3, stride=2, padding=1, bias=norm == "none", groups=m)
            layers += [conv, _grouped_norm(norm, cout, m), nn.ReLU(inplace=True)]
        self.enc_features = nn.Sequential(*layers)
        fc, fh, fw = self.feature_shape
        self.enc_fc = GroupedLinear(m, fc * fh * fw, latent_dim)
        # decoder (mirror of ConvDecoder)
        self.dec_fc = GroupedLinear(m, latent_dim, fc * fh * fw)
        sizes = self.stage_sizes[::-1]
        channels = self.channels[::-1]
        dec: list[nn.Module] = []
        for i, (cin, cout) in enumerate(pairwise(channels)):
            (hin, win), (hout, wout) = sizes[i], sizes[i + 1]
            pad = (hout - (2 * hin - 1), wout - (2 * win - 1))
            dec.append(nn.ConvTranspose2d(m * cin, m * cout, 3, stride=2, padding=1, output_padding=pad, groups=m))
            if i < len(channels) - 2:
                dec += [_grouped_norm(norm, cout, m), nn.ReLU(inplace=True)]
        self.dec_deconv = nn.Sequential(*dec)

    # ------------------------------------------------------------------ forward
    def encode(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` to latents ``(B, M, latent_dim)``."""
        h = self.enc_features(x)
        return self.enc_fc(h.reshape(x.shape[0], self.members, math.prod(h.shape[1:]) // self.members))  # B may be 0

    def decode(self, z: Tensor) -> Tensor:
        """Latents ``(B, M, latent_dim)`` to images ``(B, M, C, H, W)`` in [0, 1]."""
        fc, fh, fw = self.feature_shape
        h = torch.relu(self.dec_fc(z)).reshape(z.shape[0], self.members * fc, fh, fw)
        out = torch.sigmoid(self.dec_deconv(h))
        return out.reshape(z.shape[0], self.members, *self.input_shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(x)
        return z, self.decode(z)

    # ------------------------------------------------------------------ members as separate modules
    def _pairs(self, ae: ConvAutoencoder) -> list[tuple[nn.Module, nn.Module, str]]:
        """(ensemble module, member module, kind) for every layer with parameters or buffers."""
        enc = [mod for mod in self.enc_features if not isinstance(mod, nn.ReLU)]
        ref = [mod for mod in ae.encoder.features if not isinstance(mod, nn.ReLU)]
        dec = [mod for mod in self.dec_deconv if not isinstance(mod, nn.ReLU)]
        rdec = [mod for mod in ae.decoder.deconv if not isinstance(mod, nn.ReLU)]
        if len(enc) != len(ref) or len(dec) != len(rdec):
            raise ValueError("the autoencoder does not have this ensemble's architecture")
        pairs: list[tuple[nn.Module, nn.Module, str]] = []
        for i, (a, b) in enumerate(zip(enc, ref)):
            pairs.append((a, b, "conv_first" if i == 0 else ("conv" if isinstance(a, nn.Conv2d) else "norm")))
        pairs += [(self.enc_fc, ae.encoder.fc, "linear"), (self.dec_fc, ae.decoder.fc, "linear")]
        pairs += [(a, b, "deconv" if isinstance(a, nn.ConvTranspose2d) else "norm") for a, b in zip(dec, rdec)]
        return pairs

    @staticmethod
    def _slices(ens: nn.Module, kind: str, m: int, members: int) -> dict[str, tuple[Tensor, slice | int]]:
        """Where member ``m``'s tensors live inside the ensemble module ``ens``."""
        out: dict[str, tuple[Tensor, slice | int]] = {}
        if kind == "linear":
            out["weight"] = (ens.weight, m)
            if ens.bias is not None:
                out["bias"] = (ens.bias, m)
            return out
        if kind in ("conv", "conv_first"):
            per = ens.weight.shape[0] // members
            out["weight"] = (ens.weight, slice(m * per, (m + 1) * per))
            if ens.bias is not None:
                out["bias"] = (ens.bias, slice(m * per, (m + 1) * per))
            return out
        if kind == "deconv":
            per_in = ens.weight.shape[0] // members
            per_out = ens.weight.shape[1]
            out["weight"] = (ens.weight, slice(m * per_in, (m + 1) * per_in))
            if ens.bias is not None:
                out["bias"] = (ens.bias, slice(m * per_out, (m + 1) * per_out))
            return out
        # normalisation layers: per-channel tensors
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(ens, name, None)
            if isinstance(t, Tensor):
                per = t.shape[0] // members
                out[name] = (t, slice(m * per, (m + 1) * per))
        return out

    def member(self, m: int) -> ConvAutoencoder:
        """A separate :class:`~clusterlight.nn.ConvAutoencoder` holding a copy of member ``m``'s weights."""
        ae = ConvAutoencoder(self.input_shape, self.latent_dim, self.widths, self.norm)
        ae.to(next(self.parameters()).device)
        with torch.no_grad():
            for ens, ref, kind in self._pairs(ae):
                for name, (t, where) in self._slices(ens, kind, m, self.members).items():
                    getattr(ref, name).copy_(t[where])
                if isinstance(ens, nn.BatchNorm2d):
                    ref.num_batches_tracked.copy_(ens.num_batches_tracked)
        ae.train(self.training)
        return ae

    def load_member(self, m: int, ae: ConvAutoencoder) -> None:
        """Copy the weights (and normalisation statistics) of ``ae`` into member ``m``."""
        with torch.no_grad():
            for ens, ref, kind in self._pairs(ae):
                for name, (t, where) in self._slices(ens, kind, m, self.members).items():
                    t[where].copy_(getattr(ref, name))

    @classmethod
    def from_members(cls, aes: Sequence[ConvAutoencoder], latent_dim: int, widths: Sequence[int],
                     norm: str = "batch") -> EnsembleConvAutoencoder:
        """An ensemble whose member ``m`` has the weights of ``aes[m]``."""
        ens = cls(len(aes), aes[0].encoder.input_shape, latent_dim, widths, norm)
        for m, ae in enumerate(aes):
            ens.load_member(m, ae)
        return ens


class EnsembleMLP(nn.Module):
    """M independent MLP heads ``in_dim -> hidden... -> out_dim``: ``(B, M, in) -> (B, M, out)``.

    Member ``m`` equals a :class:`~clusterlight.nn.MLP` with the same arguments.
    """

    def __init__(self, members: int, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.members = members
        self.dims = dims
        self.layers = nn.ModuleList(GroupedLinear(members, a, b) for a, b in pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def member(self, m: int) -> MLP:
        """A separate :class:`~clusterlight.nn.MLP` holding a copy of head ``m``."""
        mlp = MLP(self.dims[0], self.dims[1:-1], self.dims[-1]).to(self.layers[0].weight.device)
        linears = [mod for mod in mlp.net if isinstance(mod, nn.Linear)]
        with torch.no_grad():
            for lin, layer in zip(linears, self.layers):
                lin.weight.copy_(layer.weight[m])
                lin.bias.copy_(layer.bias[m])
        return mlp

    def load_member(self, m: int, mlp: MLP) -> None:
        """Copy the weights of ``mlp`` into head ``m``."""
        linears = [mod for mod in mlp.net if isinstance(mod, nn.Linear)]
        with torch.no_grad():
            for lin, layer in zip(linears, self.layers):
                layer.weight[m].copy_(lin.weight)
                layer.bias[m].copy_(lin.bias)
