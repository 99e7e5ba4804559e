"""Neural network building blocks: convolutional encoders/decoders, heads and the statistics pooling block."""

from clusterlight.nn.backbones import MLP, ConvAutoencoder, ConvDecoder, ConvEncoder, PoolEncoder
from clusterlight.nn.stats_pool import StatisticsPooling

__all__ = ["MLP", "ConvAutoencoder", "ConvDecoder", "ConvEncoder", "PoolEncoder", "StatisticsPooling"]
