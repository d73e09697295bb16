"""Encoder trunk, projection/prediction heads, decoder and the momentum copy."""
from .encoder import ARCHS, build_encoder, load_weights
from .heads import MoCoHead, SimSiamProjector, SimSiamPredictor
from .decoder import Decoder
from .momentum import momentum_copy, momentum_update
from .bn import frozen_bn_stats

__all__ = ["ARCHS", "build_encoder", "load_weights", "MoCoHead", "SimSiamProjector", "SimSiamPredictor",
           "Decoder", "momentum_copy", "momentum_update", "frozen_bn_stats"]
