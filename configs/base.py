"""The base config. Every field, its default and its meaning are documented in
mappa_jax/config.py (`base_config`), which this file returns unchanged; the defaults are MAPPA's
released MathChat settings. Experiment files in this folder start from it."""
from mappa_jax.config import base_config


def get_config():
    return base_config()
