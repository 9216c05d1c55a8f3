"""Worker: mappa_jax's Sampler on SmolLM2-135M-Instruct (float32 weights from the GGUF).

mappa_sampler: the default SamplerConfig (on "sample_eos" workloads, stopped rows are dropped as
the rest fit smaller batch buckets); mappa_sampler_whole_batch: compact_rows=False.
"second_turn" workloads time an agent's second turn: the prompts of the first (untimed) turn, its
generated tokens and a tool output, as the episode runner builds them. mappa_sampler starts it
from the first turn's kept KV cache (reuse_context="on"), mappa_sampler_reprefill prefills the
whole prompts again (reuse_context="off").
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common  # noqa: E402


def prepare(workload: dict, system: str) -> common.Prepared:
    import time

    import jax
    import numpy as np
    from mappa_jax.models import weights
    from mappa_jax.sampling import Sampler, SamplerConfig

    batch, new_tokens = workload["batch"], workload["new_tokens"]
    stop_at_eos = workload["kind"] == "sample_eos"
    if workload["kind"] == "second_turn":
        return _second_turn(workload, system)
    prompts, path = common.smollm2_prompts(batch, workload["prompt_tokens"], mixed=stop_at_eos)
    cfg, state = weights.load_gguf(path)
    width = max(map(len, prompts))
    # At EOS, rows stop at different steps: powers of two give the loop smaller buckets to move to.
    buckets = tuple(sorted({1, batch} | ({2 ** k for k in range(batch.bit_length()) if 2 ** k < batch}
                                          if stop_at_eos else set())))
    sampler = Sampler(cfg, SamplerConfig(batch_buckets=buckets, prompt_buckets=(width,), generation_buckets=(new_tokens,),
                                         compact_rows=system != "mappa_sampler_whole_batch"))
    compile_seconds = [0.0]

    def count_compile(event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compile_seconds[0] += seconds
    jax.monitoring.register_event_duration_secs_listener(count_compile)
    if stop_at_eos:  # compile every decode program now: which ones a timed call uses depends on its seed
        for rows in buckets:
            sampler.generate(state, prompts[:rows], max_new_tokens=1, stop_token_ids=[])
    # The decode's own time (prefill excluded, the layer copies it reads included), for its fraction
    # of the decode roofline.
    programs = sampler.programs()
    decode_seconds, last, prefilled = [0.0], {}, []

    def prefill(*args, **kwargs):
        prefilled[:] = [programs.prefill(*args, **kwargs)]
        return prefilled[0]

    def timed(program):
        def run(*args, **kwargs):
            # The prefill finishes outside the timer: XLA:CPU runs programs in the order they were
            # dispatched, so the layer copy (made after it) would otherwise wait for it on the clock.
            # Waited for once: the first decode call donates its cache (a later call, after rows
            # were dropped, must not touch it).
            jax.block_until_ready((args, prefilled))
            prefilled.clear()
            start = time.perf_counter()
            out = jax.block_until_ready(program(*args, **kwargs))
            decode_seconds[0] += time.perf_counter() - start
            return out
        return run
    sampler._programs[None] = programs._replace(prefill=prefill, decode=timed(programs.decode),
                                                decode_layers=timed(programs.decode_layers))

    def call(seed: int):
        if stop_at_eos:
            out = sampler.generate(state, prompts, max_new_tokens=new_tokens, temperature=1.0, seed=seed)
            last.update(row_steps=int(out.decode_row_steps), generated_tokens=int(out.lengths.sum()))
            return int(out.lengths.sum())
        # stop_token_ids=[]: an EOS does not end a row, so every row decodes new_tokens steps.
        decode_seconds[0] = 0.0
        out = sampler.generate(state, prompts, max_new_tokens=new_tokens, temperature=1.0, stop_token_ids=[],
                               seed=seed)
        common.check_lengths(out.lengths, batch, new_tokens, "mappa_jax")
        last.setdefault("decode_tokens_per_s", []).append(round(batch * new_tokens / decode_seconds[0], 2))

    def check() -> dict:
        compile_s = compile_seconds[0]  # of the timed shapes only; the greedy check compiles batch 1
        greedy = common.greedy_count(workload)
        out = sampler.generate(state, prompts[:1], max_new_tokens=greedy, temperature=0.0, stop_token_ids=[])
        return {**last, "greedy_tokens": out.tokens[0, :greedy].tolist(),
                "compile_s": round(compile_s, 2), "cache_dtype": np.dtype(sampler.cache_dtype).name,
                "param_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state)))}

    return common.Prepared(call, batch * new_tokens, dict(common.prompt_info(prompts), settings="float32, stop_token_ids=[]"),
                           check, timing_starts=last.clear)  # decode figures of the timed calls only


TOOL_OUTPUT = ("Execution output:\n```\n" + "\n".join(f"step {i}: x = {i * i - 3 * i + 7}, residual = {0.5 ** i:.6f}"
                                                      for i in range(8)) + "\n```")


def _second_turn(workload: dict, system: str) -> common.Prepared:
    from mappa_jax.models import weights
    from mappa_jax.sampling import Sampler, SamplerConfig
    from mappa_jax.workflows.chat import ChatFormat

    batch, new_tokens = workload["batch"], workload["new_tokens"]
    prompts, path = common.smollm2_prompts(batch, workload["prompt_tokens"])
    cfg, state = weights.load_gguf(path)
    chat = ChatFormat(weights.load_tokenizer(path))
    reuse = system == "mappa_sampler"
    sampler = Sampler(cfg, SamplerConfig(batch_buckets=(batch,), prompt_buckets=(128, 256, 512, 1024),
                                         generation_buckets=(new_tokens,), reuse_context="on" if reuse else "off"))
    turn = {}
    sample = dict(max_new_tokens=new_tokens, temperature=1.0, stop_token_ids=[])  # every row decodes every step

    def first_turn(seed: int):
        out = sampler.generate(state, prompts, seed=seed, keep_context=reuse, **sample)
        turn["context"] = out.context
        turn["prompts"] = [p + g + chat.continuation_ids("user", TOOL_OUTPUT, g) for p, g in zip(prompts, out.sequences())]

    def call(seed: int):
        out = sampler.generate(state, turn["prompts"], seed=seed + 1, context=turn.pop("context"), **sample)
        common.check_lengths(out.lengths, batch, new_tokens, "mappa_jax")
        turn.update(prefilled_tokens=out.prefilled_tokens, prompt_tokens=sum(map(len, turn["prompts"])))

    def check() -> dict:
        return {"prefilled_tokens": turn["prefilled_tokens"], "prompt_tokens": turn["prompt_tokens"],
                "first_turn_prompt_tokens": sum(map(len, prompts))}

    return common.Prepared(call, batch * new_tokens, {"settings": f"float32, reuse_context={'on' if reuse else 'off'}"},
                           check, before_call=first_turn)


if __name__ == "__main__":
    common.run(prepare)
