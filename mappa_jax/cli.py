"""The --config flag shared by mappa-train and mappa-eval (ml_collections config files)."""
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file, e.g. configs/demo.py; override fields with "
    "--config.train.steps=10", lock_config=True)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that an override of a key the config lacks (--config.foo=1),
    which ml_collections raises as a bare AttributeError deep in a traceback, exits naming the key."""
    import sys
    from absl import flags
    try:
        remaining = flags.FLAGS(argv)
    except (AttributeError, KeyError) as err:
        detail = err.args[0] if err.args else err
        if isinstance(detail, KeyError) and detail.args:
            detail = detail.args[0]
        missing, _, hint = str(detail).partition("\n")
        missing = missing.strip("'\"")
        overrides = [a[2:].split("=", 1)[0].removeprefix("config.") for a in argv[1:] if a.startswith("--config.")]
        key = next((k for k in overrides if missing in k.split(".")), missing)
        from mappa_jax.config import REMOVED_KEYS
        if key in REMOVED_KEYS:
            sys.exit(f"error: config key {key!r} (command-line override --config.{key}) was removed: "
                     f"{REMOVED_KEYS[key]}")
        sys.exit(f"error: unknown config key {key!r} (command-line override --config.{key}) {hint}".rstrip())
    except flags.Error as err:  # a bad value or an unknown flag: what absl's own parser reports
        sys.exit(f"error: {err}\nPass --helpfull to see the flags.")
    _quiet_library_logs()
    return remaining


def _quiet_library_logs() -> None:
    """Progress and results are printed; library INFO logs (orbax's ~40 lines per checkpoint, one
    line per coach HTTP request) are shown only with an explicit --verbosity (e.g. -v 0)."""
    from absl import flags, logging
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
