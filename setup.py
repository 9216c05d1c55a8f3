"""mappa_jax: multiagent LLM finetuning with per-action process rewards (MAPPA) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="mappa_jax",
    version="0.1.0",
    description="MAPPA: finetune multiagent LLM systems with per-action coach rewards, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["mappa_jax", "mappa_jax.*"]),
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.0",
        "numpy>=2.0",
        "transformers>=5.0",
        "tokenizers>=0.22",
        "jinja2>=3.1",
        "safetensors>=0.6",
        "gguf>=0.17",
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "google-genai>=1.30",
        "httpx>=0.27",
        "grain>=0.2.18",
        "array-record>=0.8",
        "tensorflow-datasets>=4.9.10",
        "math-verify>=0.8",
        "pandas>=2.2",
        "scikit-learn>=1.5",
        "reasoning-gym>=0.1.20",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # transformers' PyTorch models are the independent reference in parity tests; pin the
        # CPU wheel (a looser spec pulls a multi-GB CUDA build). libtpu (the tpu extra) lets
        # tests/test_compile.py compile a run for a TPU slice; the tests run JAX on CPU.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "torch==2.13.0", "accelerate>=1.0", "nbformat>=5.10",
                 "scipy>=1.11", "jax[tpu]==0.10.2"],
        "wandb": ["wandb>=0.18"],
        # benchmarks/compare.py's peers. llama-cpp-python builds llama.cpp from source (about 40 min
        # on 2 busy cores). google-tunix pins safetensors<0.8, so pip resolves an older transformers
        # with it; installing it with --no-deps plus qwix, google-metrax, jaxtyping, omegaconf,
        # sentencepiece, perfetto and pylatexenc (what its sampler imports) keeps this stack's versions.
        "bench": ["torch==2.13.0", "accelerate>=1.0", "llama-cpp-python==0.3.36", "diskcache>=5.6",
                  "google-tunix==0.1.7"],
        # libtpu (about 700 MB): lets `mappa-compile` compile a run for a TPU slice on any machine.
        "tpu": ["jax[tpu]==0.10.2"],
    },
    entry_points={
        "console_scripts": [
            "mappa-train=mappa_jax.train:run",
            "mappa-eval=mappa_jax.evaluate:run",
            "mappa-chat=mappa_jax.chat:run",
            "mappa-plot=mappa_jax.plots:run",
            "mappa-data=mappa_jax.data_cli:run",
            "mappa-compile=mappa_jax.compile:run",
        ]
    },
)
