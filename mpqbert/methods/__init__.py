"""Compression pipelines (`config.method`): automp, uniform, hessian and sensimix."""

from mpqbert.methods.pipelines import automp, hessian, uniform
from mpqbert.methods.sensimix import sensimix

__all__ = ["automp", "hessian", "sensimix", "uniform"]
