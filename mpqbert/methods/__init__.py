"""Compression pipelines (`config.method`): automp, uniform, qbert and hawq, and sensimix.run."""

from mpqbert.methods import sensimix
from mpqbert.methods.pipelines import automp, hawq, qbert, uniform

__all__ = ["automp", "hawq", "qbert", "sensimix", "uniform"]
