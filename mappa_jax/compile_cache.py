"""The persistent compilation cache: compiled XLA programs kept on disk, so that a resumed or
repeated run loads its programs instead of compiling them again (jax's compilation cache).

The config key `compilation_cache` chooses the directory:
    "auto"     the user cache: $MAPPA_CACHE/xla, else $XDG_CACHE_HOME/mappa_jax/xla, else
               ~/.cache/mappa_jax/xla (next to the model files, see models/hub.py)
    "workdir"  <workdir>/compilation_cache (a gs:// workdir gives every host of a pod one cache)
    ""         off
    other      that directory (local or gs://)

Every program is cached, however fast it compiled or small it is: jax's defaults skip programs
that compile in under a second, which is most of a CPU run. An entry's key covers the program,
its shardings and devices, the jax/jaxlib versions and the XLA flags, so a changed program
compiles anew. jax writes entries from process 0 only; on several hosts use a shared directory.
The cache holds executable code: keep it where only you can write. It is never evicted; delete
the directory to reclaim the space. `stats()` counts what a process compiled and loaded.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import threading

import jax

from mappa_jax.models.hub import cache_dir as user_cache_dir

CONFIG_KEY = "compilation_cache"


@dataclasses.dataclass(frozen=True)
class CompileStats:
    """XLA programs of this process since `enable`: loaded from the cache (hits) and compiled
    (misses, written to the cache). Where the time went is metrics.TimeSplit's job."""
    hits: int = 0
    misses: int = 0

    def describe(self) -> str:
        return f"{self.misses} XLA programs compiled, {self.hits} loaded from the compilation cache"


_lock = threading.Lock()
_counts = {"hits": 0, "misses": 0}
_listening = False
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}


def _on_event(event: str, **_) -> None:
    if key := _EVENTS.get(event):
        with _lock:
            _counts[key] += 1


def _listen() -> None:
    global _listening
    with _lock:
        if _listening:
            return
        _listening = True
    jax.monitoring.register_event_listener(_on_event)


def stats() -> CompileStats:
    with _lock:
        return CompileStats(**_counts)


def resolve(setting: str, workdir: str | os.PathLike | None = None) -> str | None:
    """The cache directory for a `compilation_cache` setting (None = off); see the module doc."""
    setting = str(setting if setting is not None else "").strip()
    if not setting:
        return None
    if setting == "auto":
        return str(user_cache_dir() / "xla")
    if setting == "workdir":
        if workdir is None or not str(workdir):
            raise ValueError(f"config key {CONFIG_KEY!r} = 'workdir' needs a workdir")
        return f"{str(workdir).rstrip('/')}/compilation_cache"
    return setting if "://" in setting else str(pathlib.Path(setting).expanduser())


def enable(setting: str = "auto", workdir: str | os.PathLike | None = None) -> str | None:
    """Point jax's persistent compilation cache at the directory `setting` names (before the
    first jit of the process; a later call may move it) and start counting `stats()`. Returns the
    directory, or None when the setting is "" (the cache is then left off)."""
    from jax.experimental.compilation_cache import compilation_cache
    _listen()
    path = resolve(setting, workdir)
    if path is None:
        return None
    if "://" not in path:
        pathlib.Path(path).mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir not in (None, path):
        compilation_cache.reset_cache()  # drop the cache object bound to the previous directory
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
