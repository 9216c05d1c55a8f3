"""Worker: llama.cpp through llama-cpp-python's C API, batched the way llama.cpp's own batched
example does it: one context with a KV-cache slot per row, every prompt prefilled in one llama_decode
call, then one llama_decode per step with one token per row, each row sampled by llama.cpp's sampler
chain (EOS logit -inf, then the full-vocabulary distribution at temperature 1).

llama_cpp_f32: the project's GGUF with every tensor dequantized to float32 and written back as an
    F32 GGUF (cached next to the original): the same weights and precision as the other systems.
llama_cpp_q4_1: the Q4_1 GGUF as shipped, what a llama.cpp user would run.
"""
from __future__ import annotations

import pathlib

import common


def f32_gguf(source: pathlib.Path) -> pathlib.Path:
    """`source` with every tensor dequantized to float32 (metadata copied, file type ALL_F32)."""
    import gguf
    import numpy as np
    target = source.with_name(source.name.split(".")[0] + ".F32.gguf")
    if target.exists():
        return target
    reader = gguf.GGUFReader(str(source))
    partial = target.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer writes the header and the architecture itself
        value = field.contents()
        if name == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
    for t in reader.tensors:  # llama.cpp's own layout (permuted Q/K) is kept: only the dtype changes
        writer.add_tensor(t.name, np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(target)
    return target


class BatchedLlama:
    """One llama.cpp context that generates for `rows` sequences at once."""

    def __init__(self, ll, path: pathlib.Path, rows: int, max_prompt: int, new_tokens: int, threads: int,
                 extra_buffers: bool = True):
        self.ll = ll
        ll.llama_backend_init()
        model_params = ll.llama_model_default_params()
        model_params.use_extra_bufts = extra_buffers
        self.model = ll.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        per_row = -(-(max_prompt + new_tokens) // 256) * 256  # llama.cpp pads each slot to 256 cells
        params = ll.llama_context_default_params()
        params.n_ctx = rows * per_row
        params.n_seq_max = rows
        params.n_batch = max(rows * max_prompt, 512)  # the whole prefill is one llama_decode call
        params.n_threads = params.n_threads_batch = threads
        self.ctx = ll.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.batch = ll.llama_batch_init(params.n_batch, 0, 1)

    def _decode(self, entries):
        """entries: (token, position, row, wants logits); returns the batch index of each logits row."""
        b = self.batch
        outputs = []
        for i, (token, pos, row, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = row
            if logits:
                outputs.append(i)
        b.n_tokens = len(entries)
        if self.ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return outputs

    def sampler(self, seed: int | None, banned: list[int]):
        ll = self.ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if banned:
            biases = (ll.llama_logit_bias * len(banned))(*[ll.llama_logit_bias(t, float("-inf")) for t in banned])
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_logit_bias(self.n_vocab, len(banned), biases))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy() if seed is None
                                   else ll.llama_sampler_init_dist(seed))
        return chain

    def generate(self, prompts, new_tokens: int, seed: int | None, banned: list[int]) -> list[list[int]]:
        ll = self.ll
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        chain = self.sampler(seed, banned)
        try:
            entries = [(t, pos, row, pos == len(p) - 1) for row, p in enumerate(prompts) for pos, t in enumerate(p)]
            outputs = self._decode(entries)
            out = [[] for _ in prompts]
            for step in range(new_tokens):
                for row, idx in enumerate(outputs):
                    out[row].append(ll.llama_sampler_sample(chain, self.ctx, idx))
                if step + 1 < new_tokens:
                    outputs = self._decode([(out[row][-1], len(p) + step, row, True) for row, p in enumerate(prompts)])
            return out
        finally:
            ll.llama_sampler_free(chain)


def prepare(workload: dict, system: str) -> common.Prepared:
    ll = common.require("llama_cpp", "pip install llama-cpp-python (builds llama.cpp from source)")
    batch, new_tokens = workload["batch"], workload["new_tokens"]
    prompts, path = common.smollm2_prompts(batch, workload["prompt_tokens"])
    if system == "llama_cpp_f32":
        path = f32_gguf(pathlib.Path(path))
    # On a CPU with AMX, llama.cpp repacks quantized weights into AMX buffers by default; with this
    # Q4_1 file that crashes (SIGSEGV at the first decode, llama-cpp-python 0.3.36), so the Q4_1
    # run keeps them in plain CPU buffers. F32 weights are never repacked: the default is kept.
    quantized = system != "llama_cpp_f32"
    llm = BatchedLlama(ll, pathlib.Path(path), batch, max(map(len, prompts)), new_tokens, common.cores(),
                       extra_buffers=not quantized)
    eos = ll.llama_vocab_eos(llm.vocab)

    def call(seed: int):
        out = llm.generate(prompts, new_tokens, seed, banned=[eos])
        common.check_lengths([len(o) for o in out], batch, new_tokens, system)

    def check() -> dict:
        greedy = common.greedy_count(workload)
        return {"greedy_tokens": llm.generate(prompts[:1], greedy, None, banned=[])[0]}

    settings = (f"{'Q4_1' if quantized else 'F32'} GGUF, llama-cpp-python low-level API, {batch} sequences per "
                f"context, EOS logit -inf" + (", no AMX repacking (it crashes here)" if quantized else ""))
    return common.Prepared(call, batch * new_tokens, dict(common.prompt_info(prompts), settings=settings,
                                                          gguf=path.name), check)


if __name__ == "__main__":
    common.run(prepare)
