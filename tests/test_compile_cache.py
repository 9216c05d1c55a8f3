"""The persistent compilation cache: a second process running the same sampler programs loads them
from the cache instead of compiling (jax's cache-hit events, files on disk), and the loaded
executables give the same tokens and logprobs as freshly compiled ones."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from mappa_jax import compile_cache

CHILD = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from mappa_jax import compile_cache
    path = compile_cache.enable(sys.argv[1])
    from flax import nnx
    from mappa_jax.models.config import ModelConfig
    from mappa_jax.models.decoder import Decoder
    from mappa_jax.sampling import Sampler, SamplerConfig

    def run():
        cfg = ModelConfig.tiny("llama")
        _, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
        sampler = Sampler(cfg, SamplerConfig(batch_buckets=(4,), prompt_buckets=(16,), generation_buckets=(16,)))
        out = sampler.generate(state, [[1, 5, 9], [1, 7, 8, 9]], n=2, max_new_tokens=12, temperature=1.0, seed=5)
        return out.tokens.tolist(), out.logprobs.tolist()

    tokens, logprobs = run()
    stats = compile_cache.stats()
    # The reference: the same programs compiled afresh, with the cache off.
    jax.config.update("jax_enable_compilation_cache", False)
    jax.clear_caches()
    fresh_tokens, fresh_logprobs = run()
    print("RESULT " + json.dumps({"path": path, "hits": stats.hits, "misses": stats.misses,
                                  "same_tokens": tokens == fresh_tokens,
                                  "logprob_gap": float(np.max(np.abs(np.subtract(logprobs, fresh_logprobs)))),
                                  "tokens": tokens}))
''')


def _run(cache: pathlib.Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-c", CHILD, str(cache)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_second_process_loads_the_programs_and_they_compute_the_same(tmp_path):
    cache = tmp_path / "xla"
    first = _run(cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert first["path"] == str(cache) and first["hits"] == 0 and first["misses"] >= 2
    # Every program is written, the sampler's prefill and decode among them (however fast they compiled).
    assert any("prefill" in e for e in entries) and any("decode" in e for e in entries), entries
    second = _run(cache)
    assert second["misses"] == 0 and second["hits"] == first["misses"], (first, second)
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing new to write
    for run in (first, second):  # loaded executables compute what freshly compiled ones do
        assert run["same_tokens"] and run["logprob_gap"] == 0.0
    assert second["tokens"] == first["tokens"]


def test_settings_name_their_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("MAPPA_CACHE", str(tmp_path / "user"))
    assert compile_cache.resolve("auto") == str(tmp_path / "user" / "xla")
    assert compile_cache.resolve("workdir", tmp_path / "run") == str(tmp_path / "run" / "compilation_cache")
    assert compile_cache.resolve("workdir", "gs://bucket/run/") == "gs://bucket/run/compilation_cache"
    assert compile_cache.resolve("") is None and compile_cache.enable("") is None
    assert compile_cache.resolve(str(tmp_path / "mine")) == str(tmp_path / "mine")
    with pytest.raises(ValueError, match="compilation_cache"):
        compile_cache.resolve("workdir")


def test_on_by_default():
    from mappa_jax.config import base_config
    assert base_config().compilation_cache == "auto"
