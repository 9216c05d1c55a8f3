"""The --config flag shared by mappa-train and mappa-eval (ml_collections config files)."""
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file, e.g. configs/demo.py; override fields with "
    "--config.train.steps=10", lock_config=True)
