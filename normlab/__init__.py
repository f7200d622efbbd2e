"""normlab: a harness for normalization-layer experiments (Wu & He, "Group Normalization", 2018)."""

__version__ = "0.1.0"
