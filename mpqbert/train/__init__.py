"""Training: optimizer, train state and steps, data-parallel sharding, checkpoints, results."""

from mpqbert.train.loop import finetune

__all__ = ["finetune"]
