"""mpqbert: mixed-precision quantization of BERT in JAX/Flax."""

__version__ = "0.1.0"
