"""Compression pipelines (`config.method`): automp, uniform and hessian."""

from mpqbert.methods.pipelines import automp, hessian, uniform

__all__ = ["automp", "hessian", "uniform"]
