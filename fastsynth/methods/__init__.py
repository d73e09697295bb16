"""The SSL baselines (each owns its state) and the paper's synthesized pairs."""
from .mocov2 import MoCoV2
from .simsiam import SimSiam
from .synth import SynthPairs

METHODS = {"mocov2": MoCoV2, "simsiam": SimSiam}

__all__ = ["METHODS", "MoCoV2", "SimSiam", "SynthPairs"]
