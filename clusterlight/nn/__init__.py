"""Neural network building blocks: convolutional encoders/decoders and heads."""

from clusterlight.nn.backbones import MLP, ConvAutoencoder, ConvDecoder, ConvEncoder

__all__ = ["MLP", "ConvAutoencoder", "ConvDecoder", "ConvEncoder"]
