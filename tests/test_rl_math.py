"""REINFORCE++ math vs an independent NumPy re-implementation of OpenRLHF's code, written with
plain loops (float64 to 1e-6 under enable_x64, float32 to 1e-5)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mappa_jax.rl import advantages as adv_lib
from mappa_jax.rl.kl import KL_ESTIMATORS, token_kl
from mappa_jax.rl.losses import LOSS_AGGREGATIONS, POLICY_LOSSES, aggregate, step_counts

# ---------------------------------------------------------------- NumPy reference (plain loops)


def ref_kl(logp, ref, mask, estimator):
    out = np.zeros_like(logp)
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            d = logp[b, t] - ref[b, t]
            out[b, t] = {"k1": d, "k2": d * d / 2.0, "k3": math.exp(-d) - 1.0 + d}[estimator]
    return out


def ref_token_rewards(r, kl, mask, kl_coef, clip):
    out = -max(kl_coef, 0.0) * kl.copy()
    for b in range(mask.shape[0]):
        reward = r[b] if clip is None else min(max(r[b], clip[0]), clip[1])
        for t in reversed(range(mask.shape[1])):
            if mask[b, t]:
                out[b, t] += reward
                break
    return out


def ref_returns(rewards, mask, gamma):
    out = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(range(rewards.shape[1])):
            running = rewards[b, t] * mask[b, t] + gamma * running
            out[b, t] = running
    return out


def ref_normalize(values_list, mask_list, divide_by_std, eps=1e-8):
    """OpenRLHF: mean and (population) variance over every masked entry of the given arrays."""
    picked = [v for vals, m in zip(values_list, mask_list) for v, k in zip(vals.ravel(), m.ravel()) if k]
    mean = sum(picked) / len(picked)
    var = sum((v - mean) ** 2 for v in picked) / len(picked)
    scale = 1.0 / math.sqrt(max(var, eps)) if divide_by_std else 1.0
    return [np.where(m, (vals - mean) * scale, 0.0) for vals, m in zip(values_list, mask_list)]


def ref_ppo(logp, old, adv, mask, eps_low, eps_high):
    loss = np.zeros_like(logp)
    clipped = np.zeros(logp.shape, bool)
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = math.exp(logp[b, t] - old[b, t])
            s1 = ratio * adv[b, t]
            s2 = min(max(ratio, 1 - eps_low), 1 + eps_high) * adv[b, t]
            loss[b, t] = -min(s1, s2)
            clipped[b, t] = s2 < s1
    return loss, clipped


def ref_aggregate(values, mask, how):
    rows = [[values[b, t] for t in range(values.shape[1]) if mask[b, t]] for b in range(values.shape[0])]
    rows_nonempty = [r for r in rows if r]
    if how == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if how == "seq_mean_token_sum":
        return sum(sum(r) for r in rows_nonempty) / len(rows_nonempty)
    return sum(sum(r) / len(r) for r in rows_nonempty) / len(rows_nonempty)


# ---------------------------------------------------------------- random padded batches


def random_batch(seed, b=5, t=9, dtype=np.float64):
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, t), bool)
    for row in range(b - 1):  # last row: empty (an invalid / padding row)
        start = rng.integers(0, t - 2)
        mask[row, start:start + rng.integers(1, t - start + 1)] = True
    logp = -rng.exponential(1.5, (b, t)).astype(dtype)
    ref = logp + rng.normal(0, 0.4, (b, t)).astype(dtype)
    old = logp + rng.normal(0, 0.3, (b, t)).astype(dtype)
    rewards = rng.uniform(-14, 14, b).astype(dtype)  # some beyond the clip range
    adv = rng.normal(0, 1.0, (b, t)).astype(dtype)
    return dict(mask=mask, logp=logp, ref=ref, old=old, rewards=rewards, adv=adv)


PRECISIONS = [(np.float64, 1e-6), (np.float32, 1e-5)]


def close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators(dtype, tol, estimator):
    with jax.enable_x64(dtype == np.float64):
        for seed in range(3):
            d = random_batch(seed, dtype=dtype)
            got = token_kl(jnp.asarray(d["logp"]), jnp.asarray(d["ref"]), jnp.asarray(d["mask"]), estimator)
            assert got.dtype == dtype
            close(got, ref_kl(d["logp"], d["ref"], d["mask"], estimator), tol)


def test_kl_registry_rejects_unknown_name():
    with pytest.raises(ValueError, match="rl.kl_estimator='k9'"):
        KL_ESTIMATORS.get("k9")


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("clip", [(-10.0, 10.0), None])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_token_rewards_and_returns(dtype, tol, clip, gamma):
    with jax.enable_x64(dtype == np.float64):
        for seed in range(3):
            d = random_batch(seed, dtype=dtype)
            kl = ref_kl(d["old"], d["ref"], d["mask"], "k1")
            want_r = ref_token_rewards(d["rewards"], kl, d["mask"], 0.05, clip)
            got_r = adv_lib.token_rewards(jnp.asarray(d["rewards"]), jnp.asarray(kl), jnp.asarray(d["mask"]), 0.05, clip)
            # Entries outside the mask never reach the returns; compare where they matter.
            close(np.where(d["mask"], got_r, 0), np.where(d["mask"], want_r, 0), tol)
            got = adv_lib.discounted_returns(got_r, jnp.asarray(d["mask"]), gamma)
            close(got, ref_returns(want_r, d["mask"], gamma), tol * 10)


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("divide_by_std", [True, False])
def test_normalization_scopes(dtype, tol, divide_by_std):
    with jax.enable_x64(dtype == np.float64):
        agents = [random_batch(s, b=4 + s, t=6 + 2 * s, dtype=dtype) for s in range(3)]
        values = [a["adv"] for a in agents]
        masks = [a["mask"] for a in agents]
        jv, jm = [jnp.asarray(v) for v in values], [jnp.asarray(m) for m in masks]
        # global: one pool over all agents
        for got, want in zip(adv_lib.normalize_advantages(jv, jm, "global", divide_by_std),
                             ref_normalize(values, masks, divide_by_std)):
            close(got, want, tol)
        # agent: each agent over its own batch
        for got, v, m in zip(adv_lib.normalize_advantages(jv, jm, "agent", divide_by_std), values, masks):
            close(got, ref_normalize([v], [m], divide_by_std)[0], tol)
        # group: each prompt group of each agent
        groups = [np.arange(v.shape[0]) % 2 for v in values]
        got_all = adv_lib.normalize_advantages(jv, jm, "group", divide_by_std, [jnp.asarray(g) for g in groups])
        for got, v, m, g in zip(got_all, values, masks, groups):
            want = np.zeros_like(v)
            for gid in (0, 1):
                rows = g == gid
                want[rows] = ref_normalize([v[rows]], [m[rows]], divide_by_std)[0]
            close(got, want, tol)
        for got, v, m in zip(adv_lib.normalize_advantages(jv, jm, "none"), values, masks):
            close(got, np.where(m, v, 0), tol)


def test_normalization_rejects_unknown_scope():
    with pytest.raises(ValueError, match="rl.advantage_scope='prompt'"):
        adv_lib.normalize_advantages([jnp.zeros((1, 2))], [jnp.ones((1, 2), bool)], "prompt")


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_ppo_clip_loss_and_aggregation(dtype, tol, eps, agg):
    with jax.enable_x64(dtype == np.float64):
        for seed in range(3):
            d = random_batch(seed, dtype=dtype)
            d["old"] = d["logp"] + np.random.default_rng(seed).normal(0, 0.4, d["logp"].shape).astype(dtype)
            loss, clipped = POLICY_LOSSES.get("ppo_clip")(
                jnp.asarray(d["logp"]), jnp.asarray(d["old"]), jnp.asarray(d["adv"]), jnp.asarray(d["mask"]),
                clip_eps_low=eps[0], clip_eps_high=eps[1])
            want_loss, want_clipped = ref_ppo(d["logp"], d["old"], d["adv"], d["mask"], *eps)
            close(loss, want_loss, tol)
            np.testing.assert_array_equal(np.asarray(clipped), want_clipped)
            assert want_clipped.any(), "the batch should exercise the clip"
            close(aggregate(agg, loss, jnp.asarray(d["mask"])), ref_aggregate(want_loss, d["mask"], agg), tol)


def test_aggregation_with_step_counts_is_additive_over_micro_batches():
    """Summing micro-batch losses normalized by whole-step counts gives the full-batch loss."""
    d = random_batch(7, b=8, t=7, dtype=np.float32)
    mask = jnp.asarray(d["mask"])
    values = jnp.asarray(d["adv"])
    for agg in LOSS_AGGREGATIONS.names():
        counts = step_counts(mask)
        parts = sum(aggregate(agg, values[i:i + 2], mask[i:i + 2], counts) for i in range(0, 8, 2))
        close(parts, aggregate(agg, values, mask), 1e-5)


def test_last_token_index_handles_padding():
    mask = jnp.array([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    assert adv_lib.last_token_index(mask).tolist() == [2, 0, 3]
