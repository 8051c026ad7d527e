"""An OpenAI-compatible chat-completions mock server on loopback (stdlib only).

``POST /v1/chat/completions`` answers DSPy prompts with the same deterministic,
type-correct values as :class:`dspex_tasks.testing.mock_lm.MockLM` (via
:mod:`dspex_tasks.testing.mockgen`), so real workers can talk to it through LiteLLM or
DSPy's native engines. Knobs: latency, an error rate with a chosen HTTP status
(429 adds ``Retry-After``; 400 answers ``context_length_exceeded``; 401 with ``echo_key`` puts the request's
``Authorization`` value in its message, as some providers do), and ``POST /_control`` /
``GET /_stats`` at run time; ``GET /_log`` lists each completion request's arrival time, status and
parameters (``temperature``, ``max_tokens``, ...).

``"stream": true`` gets a ``text/event-stream`` of OpenAI ``chat.completion.chunk`` events (HTTP/1.1
chunked transfer): the same text as the non-streamed answer, split per word (or every
``stream_chunk_chars`` characters), ``chunk_latency_ms`` apart, then a ``finish_reason`` chunk, a usage
chunk when ``stream_options.include_usage`` asks, and ``data: [DONE]``. ``latency_ms`` is then the time to
the first chunk, and ``stream_error_after`` aborts streams mid-way (an error event, then a dropped
connection).

Example:
    >>> with MockLMServer(port=0) as server:  # doctest: +SKIP
    ...     lm = dspy.LM("openai/mock", api_base=server.url, api_key="sk-test", cache=False)
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..dsl.signature import SignatureRegistry
from ..dsl.signature import registry as default_registry
from . import mockgen

__all__ = ["MockLMServer", "serve", "import_signature_modules"]

log = logging.getLogger(__name__)
MODULES_ENV = "DSPEX_SIGNATURE_MODULES"


def import_signature_modules(spec: str | None = None) -> list[str]:
    """Import the comma-separated modules in ``spec`` (default ``$DSPEX_SIGNATURE_MODULES``), best effort.

    Returns:
        The names that imported; failures are logged as warnings and skipped.
    """
    names = [n.strip() for n in (os.environ.get(MODULES_ENV, "") if spec is None else spec).split(",") if n.strip()]
    done = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.warning("mock LM server: cannot import signature module %r: %s", name, exc)
        else:
            done.append(name)
    return done


def _stream_error_after(value: Any) -> int | None:
    """The ``stream_error_after`` knob: a positive chunk count, or None (``None``/0: off)."""
    count = max(int(value or 0), 0)
    return count or None


@dataclass(frozen=True)
class _Plan:
    """What one completion request does, decided by :meth:`_State.begin` from the knobs at its arrival."""

    fail: bool
    latency_ms: float
    status: int
    retry_after: float
    chunk_latency_ms: float
    stream_chunk_chars: int
    stream_error_after: int | None
    entry: dict[str, Any]  # its request-log entry (the stream marks an abort in it)


class _State:
    """Knobs and counters shared by the handler threads (guarded by ``lock``)."""

    def __init__(self, *, latency_ms: float, error_rate: float, status: int, retry_after_s: float, seed: int,
                 chunk_latency_ms: float = 0.0, stream_chunk_chars: int = 0,
                 stream_error_after: int | None = None) -> None:
        self.lock = threading.Lock()
        self.latency_ms = latency_ms
        self.error_rate = error_rate
        self.status = status
        self.retry_after_s = retry_after_s
        self.chunk_latency_ms = max(float(chunk_latency_ms), 0.0)
        self.stream_chunk_chars = max(int(stream_chunk_chars), 0)
        self.stream_error_after = _stream_error_after(stream_error_after)
        self.fail_next = 0
        self.echo_key = False
        self.scenario: str | None = None
        self.seed = seed
        self.rng = random.Random(seed)
        self.requests = self.errors = self.in_flight = self.max_in_flight = 0
        # per request: t, status, and the body's parameters (everything but messages, tools and response_format)
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=10_000)

    def control(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            if "latency_ms" in body:
                self.latency_ms = max(float(body["latency_ms"]), 0.0)
            if "error_rate" in body:
                self.error_rate = min(max(float(body["error_rate"]), 0.0), 1.0)
            if "status" in body:
                self.status = int(body["status"])
            if "fail_next" in body:
                self.fail_next = max(int(body["fail_next"]), 0)
            if "retry_after_s" in body:
                self.retry_after_s = max(float(body["retry_after_s"]), 0.0)
            if "echo_key" in body:
                self.echo_key = bool(body["echo_key"])
            if "chunk_latency_ms" in body:
                self.chunk_latency_ms = max(float(body["chunk_latency_ms"]), 0.0)
            if "stream_chunk_chars" in body:
                self.stream_chunk_chars = max(int(body["stream_chunk_chars"]), 0)
            if "stream_error_after" in body:
                self.stream_error_after = _stream_error_after(body["stream_error_after"])
            if "scenario" in body:
                name = body["scenario"] or None
                if name is not None and name not in mockgen.SCENARIOS:
                    raise ValueError(f"unknown scenario {name!r}; known: {', '.join(sorted(mockgen.SCENARIOS))}")
                self.scenario = name
            if body.get("reset_stats"):
                self.requests = self.errors = self.max_in_flight = 0
                self.log.clear()
                self.max_in_flight = self.in_flight
            return self.knobs()

    def knobs(self) -> dict[str, Any]:
        return {"latency_ms": self.latency_ms, "error_rate": self.error_rate, "status": self.status,
                "fail_next": self.fail_next, "retry_after_s": self.retry_after_s, "scenario": self.scenario,
                "echo_key": self.echo_key, "chunk_latency_ms": self.chunk_latency_ms,
                "stream_chunk_chars": self.stream_chunk_chars, "stream_error_after": self.stream_error_after}

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"requests": self.requests, "errors": self.errors, "in_flight": self.in_flight,
                    "max_in_flight": self.max_in_flight}

    def begin(self, params: dict[str, Any] | None = None, *, stream: bool = False) -> _Plan:
        """Count a completion request (logging its ``params`` and whether it streams); decide whether it fails
        and with which knobs it is answered."""
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fail = False
            if self.fail_next > 0:
                self.fail_next -= 1
                fail = True
            elif self.error_rate > 0 and self.rng.random() < self.error_rate:
                fail = True
            if fail:
                self.errors += 1
            entry: dict[str, Any] = {"t": time.time(), "status": self.status if fail else 200,
                                     "params": params or {}, "stream": stream}
            self.log.append(entry)
            return _Plan(fail, self.latency_ms, self.status, self.retry_after_s, self.chunk_latency_ms,
                         self.stream_chunk_chars, self.stream_error_after, entry)

    def stream_aborted(self, entry: dict[str, Any]) -> None:
        """Count a stream the ``stream_error_after`` knob broke off as an error, and mark its log entry."""
        with self.lock:
            self.errors += 1
            entry["stream_error"] = True

    def request_log(self) -> list[dict[str, Any]]:
        with self.lock:  # copies: a stream still running may yet mark its entry
            return [dict(entry) for entry in self.log]

    def end(self) -> None:
        with self.lock:
            self.in_flight -= 1


#: Request body keys the log leaves out: the bulk of a request, not its settings.
_UNLOGGED = frozenset({"messages", "tools", "response_format"})


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": kind, "param": None}}


_WORD = re.compile(r"\S+\s*|\s+")


def _split(text: str, size: int = 0) -> list[str]:
    """``text`` in stream chunks: ``size`` characters each, or (``size`` 0) one word and the whitespace after it
    each (leading whitespace on its own). The chunks join back to ``text``; an empty text is one empty chunk."""
    parts = [text[i:i + size] for i in range(0, len(text), size)] if size > 0 else _WORD.findall(text)
    return parts or [""]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], state: _State, registry: SignatureRegistry, model: str) -> None:
        self.state = state
        self.registry = registry
        self.model = model
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError | ConnectionResetError):
            return  # the client gave up waiting (a timeout test): nothing to report
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every reply carries Content-Length, or is chunked (streams)
    server_version = "dspex-mock-lm/1"
    timeout = 120  # idle keep-alive connections are dropped after this
    # Headers and body go out in separate writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms per call on a kept-alive connection).
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.conn_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.conn_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("mock LM server: " + format, *args)

    # -- plumbing -------------------------------------------------------------
    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        return json.loads(raw) if raw.strip() else {}

    def _error(self, status: int, message: str, kind: str) -> None:
        self._send_json(status, _error_body(message, kind))

    # -- routes ---------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": [
                {"id": self.server.model, "object": "model", "created": 0, "owned_by": "dspex"}]})
        elif path == "/_stats":
            stats: dict[str, Any] = dict(self.server.state.stats())
            if "log=1" in self.path.partition("?")[2].split("&"):
                stats["log"] = self.server.state.request_log()
            self._send_json(200, stats)
        elif path == "/_log":
            self._send_json(200, self.server.state.request_log())
        else:
            self._error(404, f"no route for GET {path}", "not_found")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            body = self._body()
        except (ValueError, UnicodeDecodeError) as exc:
            self._error(400, f"request body is not JSON: {exc}", "invalid_request_error")
            return
        if path == "/_control":
            if not isinstance(body, dict):
                self._error(400, "control body must be a JSON object", "invalid_request_error")
                return
            try:
                self._send_json(200, self.server.state.control(body))
            except (TypeError, ValueError) as exc:
                self._error(400, f"bad control value: {exc}", "invalid_request_error")
        elif path in ("/v1/chat/completions", "/chat/completions"):
            self._completion(body)
        else:
            self._error(404, f"no route for POST {path}", "not_found")

    def _completion(self, body: Any) -> None:
        state = self.server.state
        params = {k: v for k, v in body.items() if k not in _UNLOGGED} if isinstance(body, dict) else {}
        stream = isinstance(body, dict) and bool(body.get("stream"))
        plan = state.begin(params, stream=stream)
        ended = False

        def end() -> None:  # once, whichever way the request goes
            nonlocal ended
            if not ended:
                ended = True
                state.end()

        try:  # in_flight drops before the reply goes out, so a client that has its answer sees it dropped
            reply = self._reply(body, plan.fail, plan.latency_ms, plan.status, plan.retry_after)
            if stream and reply[0] == 200:
                self._stream(body, reply[1], plan, end)
                return
        finally:
            end()
        self._send_json(*reply)

    def _reply(self, body: Any, fail: bool, latency_ms: float, status: int, retry_after: float,
               ) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        if latency_ms > 0:
            time.sleep(latency_ms / 1000.0)
        if fail:
            if status == 400:  # OpenAI's answer to a prompt longer than the model's context window
                return 400, {"error": {"message": "This model's maximum context length is 8192 tokens. However, your "
                                                  "messages resulted in 9000 tokens. (mock LM injected error)",
                                       "type": "invalid_request_error", "code": "context_length_exceeded",
                                       "param": "messages"}}, None
            if status == 401 and self.server.state.echo_key:  # a provider that echoes the refused credential
                key = self.headers.get("Authorization", "")
                return 401, _error_body(f"Incorrect API key provided: {key}. (mock LM injected error)",
                                        "invalid_api_key"), None
            kind = "rate_limit_exceeded" if status == 429 else "server_error"
            headers = {"Retry-After": f"{retry_after:g}"} if status == 429 else None
            return status, _error_body(f"mock LM injected error (status {status})", kind), headers
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return 400, _error_body("'messages' must be a list of message objects", "invalid_request_error"), None
        try:
            return 200, self._answer(body, messages), None
        except Exception as exc:  # a mock bug must still produce an HTTP answer
            log.exception("mock LM server: cannot answer")
            return 500, _error_body(f"mock LM server error: {type(exc).__name__}: {exc}", "server_error"), None

    # -- streaming ------------------------------------------------------------
    def _write_chunk(self, data: bytes) -> None:
        """One HTTP/1.1 chunk (empty: the terminating one), flushed."""
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, payload: Any) -> None:
        """One server-sent event ``data: <payload>``; a str payload goes out as is (``[DONE]``)."""
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self._write_chunk(f"data: {data}\n\n".encode())

    def _stream(self, body: dict[str, Any], answer: dict[str, Any], plan: _Plan, end: Callable[[], None]) -> None:
        """Send ``answer`` (the non-streamed reply) as OpenAI ``chat.completion.chunk`` events.

        Content chunks are ``plan.chunk_latency_ms`` apart; ``plan.stream_error_after`` content chunks in (or
        after the last, if there are fewer), an error event goes out and the connection is dropped without
        the chunked body's end, so the client sees the stream fail mid-way. ``end`` is called before the last
        event, as for non-streamed replies.
        """
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        head = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
                "model": answer["model"], "system_fingerprint": None}
        sent = 0
        for choice in answer["choices"]:
            for part in _split(choice["message"]["content"], plan.stream_chunk_chars):
                if plan.stream_error_after is not None and sent >= plan.stream_error_after:
                    self._abort(plan, end)
                    return
                if sent and plan.chunk_latency_ms > 0:
                    time.sleep(plan.chunk_latency_ms / 1000.0)
                self._event({**head, "choices": [{"index": choice["index"], "finish_reason": None, "logprobs": None,
                                                  "delta": {"role": "assistant", "content": part}}]})
                sent += 1
        if plan.stream_error_after is not None:  # the answer had no more chunks than that
            self._abort(plan, end)
            return
        for choice in answer["choices"]:
            self._event({**head, "choices": [{"index": choice["index"], "delta": {}, "finish_reason": "stop",
                                              "logprobs": None}]})
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            self._event({**head, "choices": [], "usage": answer["usage"]})
        end()
        self._event("[DONE]")
        self._write_chunk(b"")

    def _abort(self, plan: _Plan, end: Callable[[], None]) -> None:
        """Break a stream off: an OpenAI-style error event, then the connection dropped mid-body."""
        self.server.state.stream_aborted(plan.entry)
        end()
        self._event(_error_body(f"mock LM injected stream error (after {plan.stream_error_after} chunks)",
                                "server_error"))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _answer(self, body: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
        seed = self.server.state.seed
        scenario = self.server.state.scenario
        scripted = {"*": mockgen.SCENARIOS[scenario]} if scenario else None
        fmt = body.get("response_format")
        schema = fmt.get("json_schema", {}).get("schema") if isinstance(fmt, dict) else None
        n = max(int(body.get("n") or 1), 1)
        texts = []
        for i in range(n):
            if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(schema, dict):
                texts.append(mockgen.answer_for_schema(messages, schema, seed=seed + i))
            else:
                texts.append(mockgen.answer(messages, seed=seed + i, registry=self.server.registry,
                                            scripted=scripted))
        prompt_tokens = mockgen.prompt_tokens(messages)
        completion_tokens = sum(mockgen.count_tokens(t) for t in texts)
        return {
            "id": f"chatcmpl-mock-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model") or self.server.model),
            "system_fingerprint": None,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop", "logprobs": None}
                for i, t in enumerate(texts)
            ],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


class MockLMServer:
    """The mock server on a background thread.

    Args:
        host: Interface to bind; loopback unless you say otherwise.
        port: TCP port; 0 picks a free one (read it back from :attr:`port` or :attr:`url`).
        latency_ms: Delay before every completion.
        error_rate: Fraction of completions that fail with ``status``.
        status: HTTP status of injected errors (429 adds ``Retry-After``).
        retry_after_s: The ``Retry-After`` value for injected 429s.
        chunk_latency_ms: Delay between the content chunks of a streamed answer (``latency_ms`` is the delay
            before the first).
        stream_chunk_chars: Characters per streamed content chunk; 0 streams one word (and the whitespace after
            it) per chunk. (DSPy 3.4.1's ``StreamListener`` leaks the next field marker into its chunks with 1-2
            characters per chunk, and yields nothing when one chunk holds the whole answer.)
        stream_error_after: Break every stream off after this many content chunks (an error event, then the
            connection dropped); None or 0 never does. A broken stream counts as an error in :meth:`stats`.
        seed: Changes every generated value.
        registry: Signatures for precise output types (default: the process-wide registry).
        model: The model id listed by ``GET /v1/models``.
        import_modules: Import ``$DSPEX_SIGNATURE_MODULES`` on start.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency_ms: float = 0.0,
        error_rate: float = 0.0,
        status: int = 500,
        retry_after_s: float = 1.0,
        chunk_latency_ms: float = 0.0,
        stream_chunk_chars: int = 0,
        stream_error_after: int | None = None,
        seed: int = 0,
        registry: SignatureRegistry | None = None,
        model: str = "mock",
        import_modules: bool = True,
    ) -> None:
        self.host = host
        self._port = port
        self.state = _State(latency_ms=latency_ms, error_rate=error_rate, status=status,
                            retry_after_s=retry_after_s, seed=seed, chunk_latency_ms=chunk_latency_ms,
                            stream_chunk_chars=stream_chunk_chars, stream_error_after=stream_error_after)
        self.registry = registry if registry is not None else default_registry
        self.model = model
        self.import_modules = import_modules
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _bind(self) -> _Server:
        if self.import_modules:
            import_signature_modules()
        self._server = _Server((self.host, self._port), self.state, self.registry, self.model)
        self._port = int(self._server.server_address[1])
        return self._server

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        return self._port

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}/v1"

    def start(self) -> MockLMServer:
        """Bind and serve on a daemon thread; returns ``self``."""
        if self._server is not None:
            return self
        server = self._bind()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"mock-lm-server:{self._port}", daemon=True)
        self._thread.start()
        log.info("mock LM server listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with server.conn_lock:
            conns = list(server.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def control(self, **knobs: Any) -> dict[str, Any]:
        """Change knobs in process (same keys as ``POST /_control``)."""
        return self.state.control(knobs)

    def knobs(self) -> dict[str, Any]:
        """The current knobs (what ``POST /_control`` answers)."""
        with self.state.lock:
            return self.state.knobs()

    def stats(self) -> dict[str, int]:
        """Counters (same as ``GET /_stats``)."""
        return self.state.stats()

    def request_log(self) -> list[dict[str, Any]]:
        """Per completion request, oldest first: ``{"t": unix seconds at arrival, "status": HTTP status,
        "params": the body but its messages, tools and response_format, "stream": whether it asked for a
        stream}``, plus ``"stream_error": True`` on a stream ``stream_error_after`` broke off (the last 10,000;
        same as ``GET /_log`` or ``GET /_stats?log=1``; cleared by ``reset_stats``)."""
        return self.state.request_log()

    def __enter__(self) -> MockLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(host: str = "127.0.0.1", port: int = 8765, **options: Any) -> None:
    """Serve in the foreground until interrupted (for the CLI). ``options`` are :class:`MockLMServer`'s."""
    server = MockLMServer(host, port, **options)
    httpd = server._bind()
    log.info("mock LM server listening on %s", server.url)
    try:
        httpd.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
