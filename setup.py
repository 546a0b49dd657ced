"""scm_jax: continuous-time consistency models (sCM) in JAX/Flax."""
import setuptools

CORE = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "chex>=0.1.88",
    "clu>=0.0.12",
    "tensorflow-datasets>=4.9.8",
    "grain>=0.2.10",
    "scikit-learn>=1.3",
    "scipy>=1.11",
    "numpy>=1.26",
    "tensorboardX>=2.6",
    "pillow>=10.0",
    "matplotlib>=3.7",    # the notebook's and the studies' plots
    "absl-py>=2.0",
    "safetensors>=0.4",   # SD-VAE weights (numpy loader; no torch)
    "etils[epath]>=1.5",  # the path layer (local folders and gs:// alike)
]

EXTRAS = {
    # libtpu: the TPU compiler, so the tests can compile the Mosaic kernel ahead of time for a
    # real TPU topology on a CPU host (the version jax[tpu] pins for the installed jax).
    # jax[cuda12] (the CUDA plugin and its CUDA wheels, ~3 GB, no GPU needed): so the tests
    # compile the Triton kernel and train steps deviceless for H100s (sm_90), at the jax version
    # the libtpu pin belongs to.
    # nbclient/nbformat/ipykernel: the tests execute notebooks/quickstart.ipynb.
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "pytest-timeout>=2.3", "libtpu==0.0.42.1",
             "jax[cuda12]==0.10.2", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],
    # gcsfs: gs:// workdirs and data through etils.epath; google-cloud-storage: TensorBoard on gs://.
    "tpu": ["jax[tpu]", "gcsfs", "google-cloud-storage"],
    "gpu": ["jax[cuda12]", "jax-triton>=0.3"],
    "data": ["tensorflow-cpu>=2.16"],
}

setuptools.setup(
    name="scm_jax",
    version="0.1.0",
    description="Simplified, stabilized and scaled continuous-time consistency models (sCM) in JAX/Flax",
    packages=setuptools.find_packages(include=["scm_jax", "scm_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
