"""A real HTTP coach server on 127.0.0.1 for tests and benchmarks, with scripted faults.

It speaks two protocols on one port:
  POST /v1/chat/completions                      (OpenAI-compatible; any prefix before /chat/...)
  POST /{version}/models/{model}:generateContent (Gemini REST, what google-genai's client sends)
The answer follows markers written anywhere in the request (e.g. in the task text):
  [[score:N]]            answer with score N (default 7)
  [[fault:KIND*K#tag]]   the first K hits of this marker get fault KIND (K may be "all"):
      429 | 500           an HTTP error with a JSON error body (429 carries Retry-After: 0)
      hang              sleep `hang_s` before answering (past the client's timeout)
      drop              close the connection without an answer
      badjson           answer text that is not JSON ("{score: seven")
      unparseable       prose with numbers but no PROCESS_SCORE line and not JSON
      range             score 11
      echo401           HTTP 401 whose body echoes the credential the client sent (a leaky server)
      leak              a valid answer whose reasoning quotes the credential the client sent
  the #tag keeps markers of different requests apart; hits are counted per full marker.
Every response waits `latency_s` first. Counters: `hits` (all POSTs), `hits_by_marker`, `bodies`,
`max_in_flight` (most requests being answered at once), `open_connections` (client connections
not yet closed, by either side);
GET /_stats returns the counters as JSON (for `FakeCoachServerProcess`, which keeps the server's
work off the client's GIL, as a real remote server would be).
"""
from __future__ import annotations

import asyncio
import collections
import json
import multiprocessing
import re
import threading
import time
from typing import Any

_MARKER = re.compile(r"\[\[fault:(?P<kind>[a-z0-9]+)\*(?P<count>\d+|all)(?:#[\w-]+)?\]\]")
_SCORE = re.compile(r"\[\[score:(?P<n>-?\d+)\]\]")
_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 401: "Unauthorized",
            404: "Not Found", 400: "Bad Request", 200: "OK"}


def _credential(headers: dict[str, str]) -> str:
    return headers.get("x-goog-api-key") or headers.get("authorization", "")


class FakeCoachServer:
    """Start with `with FakeCoachServer(latency_s=0.2) as server:`; `server.url` is the base URL."""

    def __init__(self, *, latency_s: float = 0.0, hang_s: float = 30.0, record_bodies: bool = True):
        self.latency_s = latency_s
        self.hang_s = hang_s
        self.record_bodies = record_bodies
        self.hits = 0
        self.hits_by_marker: collections.Counter = collections.Counter()
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.open_connections = 0
        self.port = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None

    # ---- lifecycle --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeCoachServer":
        self._thread = threading.Thread(target=self._run, name="fake-coach-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake coach server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def reset_counters(self) -> None:
        with self._lock:
            self.hits = 0
            self.hits_by_marker.clear()
            self.bodies.clear()
            self.max_in_flight = 0

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        handlers: set[asyncio.Task] = set()

        async def on_connect(reader, writer):
            task = asyncio.current_task()
            handlers.add(task)
            with self._lock:
                self.open_connections += 1
            try:
                await self._connection(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass  # client hung up, or the server is stopping
            finally:
                handlers.discard(task)
                writer.close()
                with self._lock:
                    self.open_connections -= 1

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    # ---- HTTP -------------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # HTTP/1.1 keep-alive
            request_line = await reader.readline()
            if not request_line:
                return
            method, path, _ = request_line.decode("latin-1").split(" ", 2)
            headers = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                reply = await self._respond(method, path, headers, body)
            finally:
                with self._lock:
                    self.in_flight -= 1
            if reply is None:  # "drop": hang up without a word
                writer.transport.abort()
                return
            status, payload, extra = reply
            data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
            head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "content-type: application/json",
                    f"content-length: {len(data)}"] + [f"{k}: {v}" for k, v in extra.items()]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
            await writer.drain()

    async def _respond(self, method: str, path: str, headers: dict[str, str], body: bytes):
        if method == "GET" and path == "/_stats":  # counters, for a server in another process
            with self._lock:
                return 200, {"hits": self.hits, "hits_by_marker": dict(self.hits_by_marker),
                             "max_in_flight": self.max_in_flight}, {}
        if method != "POST":
            return 404, {"error": {"code": 404, "message": f"no route {method} {path}"}}, {}
        try:
            request = json.loads(body)
        except json.JSONDecodeError:
            return 400, {"error": {"code": 400, "message": "request body is not JSON"}}, {}
        text = json.dumps(request)
        fault = None
        with self._lock:
            self.hits += 1
            if self.record_bodies:
                self.bodies.append({"path": path, "body": request, "credential": _credential(headers)})
            for match in _MARKER.finditer(text):
                self.hits_by_marker[match.group(0)] += 1
                count = match.group("count")
                if count == "all" or self.hits_by_marker[match.group(0)] <= int(count):
                    fault = match.group("kind")
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        gemini = ":generateContent" in path
        if fault in ("429", "500"):
            code = int(fault)
            status_name = "RESOURCE_EXHAUSTED" if code == 429 else "INTERNAL"
            return code, {"error": {"code": code, "message": "injected fault", "status": status_name}}, (
                {"retry-after": "0"} if code == 429 else {})
        if fault == "echo401":
            return 401, {"error": {"code": 401, "message": f"API key not valid: {_credential(headers)}",
                                   "status": "UNAUTHENTICATED"}}, {}
        if fault == "hang":
            await asyncio.sleep(self.hang_s)
        if fault == "drop":
            return None
        score = int(_SCORE.search(text).group("n")) if _SCORE.search(text) else 7
        wants_json = (request.get("generationConfig", {}).get("responseMimeType") == "application/json"
                      if gemini else "response_format" in request)
        if fault == "badjson":
            answer = "{score: seven, reasoning: fine" if wants_json else "The work looks fine overall."
        elif fault == "unparseable":
            answer = "Step 3 is right and 2 of 4 checks pass; I would give it 8 or so."
        else:
            if fault == "range":
                score = 11
            reasoning = "checked the work"
            if fault == "leak":
                reasoning += f" (request signed with {_credential(headers)})"
            answer = (json.dumps({"reasoning": reasoning, "score": score, "correct": None})
                      if wants_json else f"{reasoning}\nPROCESS_SCORE: {score}")
        tokens_in, tokens_out = max(1, len(text) // 4), max(1, len(answer) // 4)
        if gemini:
            return 200, {"candidates": [{"content": {"role": "model", "parts": [{"text": answer}]},
                                         "finishReason": "STOP", "index": 0}],
                         "usageMetadata": {"promptTokenCount": tokens_in,
                                           "candidatesTokenCount": tokens_out,
                                           "totalTokenCount": tokens_in + tokens_out},
                         "modelVersion": path.split("/models/")[-1].split(":")[0]}, {}
        return 200, {"id": "chatcmpl-fake", "object": "chat.completion", "model": request.get("model"),
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": answer}}],
                     "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                               "total_tokens": tokens_in + tokens_out}}, {}


def _serve_forever(conn, kwargs) -> None:
    server = FakeCoachServer(**kwargs).start()
    conn.send(server.port)
    conn.recv()  # blocks until the parent asks us to stop
    server.stop()


class FakeCoachServerProcess:
    """FakeCoachServer in a child process. `hits()` reads the counters over HTTP."""

    def __init__(self, **kwargs):
        self._kwargs = dict(kwargs, record_bodies=False)
        self.port = 0
        self._conn = None
        self._process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold JAX threads
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve_forever, args=(child, self._kwargs), daemon=True)
        self._process.start()
        deadline = time.monotonic() + 60
        while not self._conn.poll(0.1):
            if not self._process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"fake coach server process did not start (exit code "
                                   f"{self._process.exitcode})")
        self.port = self._conn.recv()
        return self

    def stats(self) -> dict:
        import httpx  # pylint: disable=import-outside-toplevel
        return httpx.get(self.url + "/_stats", timeout=10).json()

    def __exit__(self, *exc):
        self._conn.send("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
