"""The sampler on a mesh of 8 forced CPU devices gives the same tokens as on one device.

The device count is fixed when jax starts, so the check runs in a fresh subprocess: this file
does not change the device count seen by the other tests of the same pytest process."""
import os
import subprocess
import sys
import textwrap

from cpu_devices import cpu_devices_env

CHILD = textwrap.dedent('''
    import sys
    import jax, numpy as np
    from mappa_jax.parallel import make_mesh
    from mappa_jax.sampling import Sampler, SamplerConfig
    sys.path.insert(0, "tests")
    from tiny_policy import tiny_policy

    assert jax.device_count() == 8, jax.devices()
    cfg, state, lora, prompts = tiny_policy()
    buckets = SamplerConfig(batch_buckets=(8, 16), prompt_buckets=(16,), generation_buckets=(16,))
    calls = [dict(n=3, temperature=1.0, top_p=0.9, seed=3), dict(n=2, temperature=0.0, lora=lora)]
    single = Sampler(cfg, buckets)
    reference = [single.generate(state, prompts, max_new_tokens=12, stop_token_ids=[], **kw) for kw in calls]
    for axes in (dict(data=2, fsdp=2, tensor=2),):  # batch over data x fsdp, params over fsdp x tensor
        mesh = make_mesh(**axes)
        sharded = Sampler(cfg, buckets, mesh)
        for kw, ref in zip(calls, reference):
            out = sharded.generate(state, prompts, max_new_tokens=12, stop_token_ids=[], **kw)
            np.testing.assert_array_equal(out.tokens, ref.tokens)
            np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
        # The KV cache really is split over the data axes.
        prefill = sharded._programs_for(None)[0]
        rows = np.zeros((8,), np.int32)
        cache, _ = prefill(sharded.place_weights(state), None, sharded._put_batch(np.ones((8, 16), np.int32)),
                           sharded._put_batch(np.ones((8, 16), bool)), sharded._put_batch(rows), generation_slots=16)
        assert len(cache.k[0].sharding.device_set) == 8
        assert cache.k[0].sharding.shard_shape(cache.k[0].shape)[0] == 8 // (axes.get("data", 1) * axes.get("fsdp", 1))
    try:
        Sampler(cfg, SamplerConfig(batch_buckets=(4, 8)), make_mesh(data=8))
        raise SystemExit("batch buckets that the mesh cannot split were accepted")
    except ValueError as err:
        assert "batch_buckets" in str(err)
    print("SHARDED_OK")
''')


def test_sampler_on_8_devices_matches_single_device():
    env = cpu_devices_env(8)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, cwd=root,
                            timeout=600)
    assert result.returncode == 0 and "SHARDED_OK" in result.stdout, result.stderr[-4000:]
