"""The run's time split (mappa_jax/metrics.py: TimeSplit, CompileLog): compile seconds are counted
per program from jax's own events, moved out of the phase they happened in, and the parts add up
to the wall time."""
import re
import time

import jax
import jax.numpy as jnp
import pytest

from mappa_jax.metrics import TimeSplit


def test_compile_seconds_come_from_jax_and_leave_the_phase():
    split = TimeSplit()

    @jax.jit
    def time_split_probe_program(x):
        return jnp.tanh(x @ x.T).sum()

    x, half = jnp.ones((64, 64)), jnp.ones((32, 64))  # their own small programs compile here
    before = split.compile_s()
    start = time.perf_counter()
    time_split_probe_program(x).block_until_ready()  # traced, lowered, compiled
    first_call = time.perf_counter() - start
    compiled = split.compile_s() - before
    assert 0 < compiled <= first_call
    count, seconds = split.compiles.per_program["time_split_probe_program"]
    assert count == 1 and seconds == pytest.approx(compiled, rel=1e-6)

    again = split.compile_s()
    time_split_probe_program(x).block_until_ready()  # the compiled program: no new compile
    assert split.compile_s() == again
    time_split_probe_program(half).block_until_ready()  # a new shape is a new program
    assert split.compiles.per_program["time_split_probe_program"][0] == 2

    split.add("update", first_call, compiled)
    split.add("sampling", 0.25)
    parts = split.split()
    assert parts["update"] == pytest.approx(first_call - compiled)
    assert parts["sampling"] == 0.25
    assert sum(v for k, v in parts.items() if k != "wall") == pytest.approx(parts["wall"], abs=1e-6) \
        or parts["other"] == 0.0  # "other" is the rest of the wall time, never negative
    text = split.describe()
    assert text.startswith(tuple("0123456789")) and "compilation" in text
    # A run's summary lists only programs that took 0.5 s or more; the probe may be quicker.
    probe_seconds = split.compiles.per_program["time_split_probe_program"][1]
    assert ("time_split_probe_program" in text) == (probe_seconds >= 0.5)
    assert re.search(r"time_split_probe_program [0-9.]+ s \(2x\)", split.compiles.top(min_seconds=0.0))
    with pytest.raises(KeyError, match="unknown phase 'sampler'"):
        split.add("sampler", 1.0)
    split.compiles.close()
