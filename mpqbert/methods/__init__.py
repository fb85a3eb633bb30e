"""Compression pipelines (`config.method`): automp, uniform and hessian, and sensimix.run."""

from mpqbert.methods import sensimix
from mpqbert.methods.pipelines import automp, hessian, uniform

__all__ = ["automp", "hessian", "sensimix", "uniform"]
