"""Are the sampler's logprobs on-policy? The demo's model and sampling setup (SmolLM2-135M, an agent
at temperature 0.7, the demo's sampler buckets): 8 samples of 4 word problems, then the logged
trainer/sampler gap (rl.pipeline.prepare_experiences) and the distance of the recorded logprobs
from the distribution the tokens were drawn from (softmax(logits / 0.7), an independent dense
forward pass in float64). Prints one RESULT line of JSON.

    python benchmarks/logprob_gap.py
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from mappa_jax.models import hub, weights
from mappa_jax.models.weights import abstract_model
from mappa_jax.parallel import make_mesh
from mappa_jax.rl.config import RLConfig
from mappa_jax.rl.experience import Sample, build_experience
from mappa_jax.rl.pipeline import prepare_experiences
from mappa_jax.rl.update import PolicyUpdater
from mappa_jax.sampling import Sampler, SamplerConfig
from mappa_jax.models.decoder import positions_from_mask

T = 0.7
cfg, state = weights.load_gguf(hub.smollm2_gguf_path())
tok = weights.load_tokenizer(hub.smollm2_gguf_path())
sc = SamplerConfig(batch_buckets=(8, 16), prompt_buckets=(256, 384, 512, 640), generation_buckets=(64, 128),
                   pad_token_id=tok.pad_token_id or 0)
questions = ["Tom has 7 apples and buys 5 more. How many apples does he have?",
             "A box holds 12 pens. Sara takes 4. How many pens are left?",
             "Each bag has 3 oranges. How many oranges are in 6 bags?",
             "Mia read 9 pages on Monday and 8 on Tuesday. How many pages in all?"]
system = "Solve the math word problem. Write one or two short sentences of calculation, then the final number as \\boxed{N}."
prompts = [tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                   add_generation_prompt=True, tokenize=False) for q in questions]
prompts = [tok.encode(p, add_special_tokens=False) for p in prompts]
out = Sampler(cfg, sc).generate(state, prompts, n=2, max_new_tokens=64, temperature=T, seed=0)
has_t = "temperature" in Sample._fields  # the code before per-agent temperatures lacked it
samples = [Sample(prompts[r // 2], out.tokens[r, :n].tolist(), out.logprobs[r, :n].tolist(), 1.0, False, r // 2,
                  *((T,) if has_t else ())) for r, n in enumerate(out.lengths)]
rl = RLConfig(train_batch_size=8, micro_batch_size=4, old_logprobs="trainer")  # prepare_experiences logs the gap
graphdef = abstract_model(cfg)[0]
updater = PolicyUpdater(graphdef, rl, make_mesh())
exp = build_experience(samples, batch_buckets=tuple(8 * 2 ** k for k in range(4)), batch_multiple=8, pad_id=sc.pad_token_id,
                       padding_side="split", prompt_buckets=sc.prompt_buckets, generation_buckets=sc.generation_buckets)
prepared, metrics = prepare_experiences(updater, {"problem_solver": updater.new_full_agent(state)}, {"problem_solver": exp})
e = jax.device_get(prepared["problem_solver"])
mask = np.asarray(e.loss_mask)
# The weights go in as an argument: captured, they would compile into the program as constants.
forward = jax.jit(lambda st, t, m: nnx.merge(graphdef, st)(t, positions_from_mask(m), m)[0])
logits = np.asarray(forward(state, jnp.asarray(e.tokens), jnp.asarray(e.attention_mask)), np.float64)[:, :-1] / T
logits -= logits.max(-1, keepdims=True)
logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
behaviour = np.pad(np.take_along_axis(logp, np.asarray(e.tokens)[:, 1:, None], -1)[..., 0], ((0, 0), (1, 0)))
off = np.abs(e.sampler_logprobs - behaviour)[mask]
print("RESULT " + json.dumps({
    "tokens": int(mask.sum()),
    "trainer_sampler_logprob_gap_mean": float(metrics["problem_solver/trainer_sampler_logprob_gap_mean"]),
    "trainer_sampler_logprob_gap_max": float(metrics["problem_solver/trainer_sampler_logprob_gap_max"]),
    "recorded_vs_T0.7_behaviour_mean": float(off.mean()), "recorded_vs_T0.7_behaviour_max": float(off.max()),
    "recorded_over_behaviour_prob_ratio_mean": float(np.exp(e.sampler_logprobs[mask] - behaviour[mask]).mean())}),
    flush=True)
