"""Hot-path operations of the method, installed as `fastsynth.kernels`.

Each file holds one operation: its plain-PyTorch reference (the CPU path and the yardstick for
every fast path) and, from the Triton issue on, the kernel with the same public signature.
Dispatch is explicit through `impl=`; importing this package starts nothing.
"""
from .info_nce import info_nce, info_nce_reference
from .dual_noise import dual_noise, dual_noise_reference
from .feature_bank import FeatureBank

__all__ = ["info_nce", "info_nce_reference", "dual_noise", "dual_noise_reference", "FeatureBank"]
