"""latent_em: Bootstrapping Latent Thoughts (BoLT) in JAX/Flax."""
import setuptools

# Ranges verified together on CPU (Python 3.11): jax 0.10.2, flax 0.12.8, optax 0.2.8,
# orbax-checkpoint 0.12.8, seqio 0.0.20, tensorflow 2.21.0, tensorflow-datasets 4.9.10,
# ml-collections 1.1.0, sentencepiece 0.2.3, clu 0.0.12.
INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.11",
    "flax>=0.12.0,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12.0,<0.13",
    "seqio==0.0.20",
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "tensorflow-datasets>=4.9.9,<4.10",
    "ml-collections>=1.1.0,<1.2",
    "sentencepiece>=0.2.0,<0.3",
    "clu>=0.0.12,<0.1",
    "tensorboard>=2.21,<2.22",
    "sympy>=1.12,<2",
    "pyarrow>=14",
    "scipy>=1.11",
    "openai>=3.54,<4",
    "importlib_resources>=6",
    "absl-py>=2.1",
    "numpy>=1.26,<3",
    "tqdm>=4.66",
    "safetensors>=0.4",
    "matplotlib>=3.8,<4",
]

# libtpu, for the fit check's compiles for TPU topologies (latent_em/tools/preflight.py) without
# TPU hardware; its wheels are Linux x86-64 only. `pip install "jax[tpu]"` on a TPU VM is the same.
TPU = "jax[tpu]>=0.10.0,<0.11"

EXTRAS = {
    "tpu": [TPU],
    "test": [
        # ~0.7 GB installed; 5 s to install from the package index (docs/preflight.md).
        TPU + '; sys_platform == "linux" and platform_machine == "x86_64"',
        "pytest>=8",
        "hypothesis>=6.100",
        "torch==2.13.0",
        "transformers>=4.50,<6",
        "safetensors>=0.4",
        "nbclient>=0.10,<0.12",
        "nbformat>=5.10,<6",
        "ipykernel>=6.29,<8",
    ],
}

setuptools.setup(
    name="latent_em",
    version="0.1.0",
    description="Bootstrapping Latent Thoughts (BoLT): EM over latent thoughts for LM pretraining, in JAX.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["latent_em", "latent_em.*"]),
    package_data={"latent_em": ["data/assets/*"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
