"""The OpenAI-compatible HTTP surface over a :class:`Scheduler`: ``POST /v1/completions`` (plain and SSE
streaming), ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Handlers validate and tokenize in the event loop, queue the request, and await its events, which the scheduler
thread hands over with ``loop.call_soon_threadsafe``. A client that hangs up cancels its request: a stream through
the response generator's ``finally``, a plain request by racing the result against the ``http.disconnect`` message.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EngineError
from . import protocol
from .metrics import ServerMetrics
from .protocol import ProtocolError
from .scheduler import ChoiceSettings, Delta, Failed, Finished, Overloaded, Request, Scheduler
from .settings import ContextOverflow, choice_settings

__all__ = ["ServerConfig", "build_app"]

log = logging.getLogger("gptmeg.serve")


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 2 * 2**20
    default_max_tokens: int = 16  # OpenAI's default for completions


def build_app(scheduler: Scheduler, tokenizer, config: ServerConfig) -> FastAPI:
    """The FastAPI app. ``tokenizer`` is a ``tokenizers.Tokenizer`` (encode/decode); the scheduler must be started."""
    app = FastAPI(title="gptmeg serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(scheduler)
    scheduler.observe = metrics.observe
    spec = scheduler.spec
    created = protocol.now()
    app.state.metrics = metrics

    def fail(error: ProtocolError) -> JSONResponse:
        if error.status < 500 and error.status != 429:
            metrics.invalid += 1
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, error: StarletteHTTPException):  # unknown routes and methods, OpenAI-shaped
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(protocol.error_body(str(error.detail), kind, None, error.status_code),
                            status_code=error.status_code)

    def authorize(request: HttpRequest) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ProtocolError("Incorrect API key provided: pass it as 'Authorization: Bearer <key>'.", status=401,
                                type="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            reason = f" ({scheduler.error})" if scheduler.error else ""
            return JSONResponse(protocol.error_body(f"the scheduler thread is not running{reason}.",
                                                    "unavailable_error", None, 503), status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        try:
            authorize(request)
        except ProtocolError as error:
            return fail(error)
        return {"object": "list", "data": [{"id": config.served_model_name, "object": "model", "created": created,
                                            "owned_by": "gptmeg", "max_model_len": spec.max_sequence}]}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        try:
            authorize(request)
            body = await _read_json(request, config.max_body_bytes)
            completion = protocol.parse_completion_request(body)
            if completion.extra_fields:
                log.info("ignored request fields: %s", ", ".join(completion.extra_fields))
            if completion.model is not None and completion.model != config.served_model_name:
                raise ProtocolError(f"The model `{completion.model}` does not exist.", status=404,
                                    type="not_found_error", param="model", code="model_not_found")
            prompts, texts = _prompts(completion.prompt, tokenizer, spec)
            settings = _settings(completion, prompts, spec, config)
            if len(prompts) * completion.n > scheduler.max_waiting:
                raise ProtocolError(f"the request asks for {len(prompts) * completion.n} choices; this server queues "
                                    f"at most {scheduler.max_waiting}.", param="n")
        except ProtocolError as error:
            return fail(error)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Request(prompts, settings, lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                      n=completion.n)
        try:
            scheduler.submit(job)
        except Overloaded as error:
            return fail(ProtocolError(str(error), status=429, type="overloaded_error", code=429))
        except EngineError as error:
            return fail(ProtocolError(str(error), status=503, type="unavailable_error", code=503))
        echoes = [texts[i // completion.n] for i in range(len(prompts) * completion.n)] if completion.echo else None
        answer = _Answer(protocol.completion_id(), protocol.now(), config.served_model_name)
        if completion.stream:
            include_usage = bool(completion.stream_options and completion.stream_options.include_usage)
            return StreamingResponse(_stream(job, events, answer, echoes, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(request, job, events, answer, echoes)

    return app


@dataclass(frozen=True)
class _Answer:
    id: str
    created: int
    model: str

    def body(self, choices: list[dict], usage: dict | None = None) -> dict:
        return protocol.chunk(self.id, self.created, self.model, choices, usage)


async def _read_json(request: HttpRequest, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"the request body is {declared} bytes; at most {limit} are accepted.", status=413)
    received = bytearray()
    async for part in request.stream():
        received += part
        if len(received) > limit:
            raise ProtocolError(f"the request body is over {limit} bytes.", status=413)
    try:
        return json.loads(received)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProtocolError(f"the request body is not valid JSON ({error}).") from None


def _prompts(prompt, tokenizer, spec) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of every prompt (str, list of str, ids, list of ids), each checked against the model."""
    if isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    prompts, texts = [], []
    for number, item in enumerate(items):
        where = f"prompt {number}" if len(items) > 1 else "the prompt"
        if isinstance(item, str):
            ids = tokenizer.encode(item).ids
            text = item
        else:
            bad = next((t for t in item if not 0 <= t < spec.vocab_size), None)
            if bad is not None:
                raise ProtocolError(f"{where} has token id {bad}; ids must be in [0, {spec.vocab_size}).",
                                    param="prompt")
            ids, text = list(item), tokenizer.decode(list(item))
        if not ids:
            raise ProtocolError(f"{where} is empty: it must have at least one token.", param="prompt")
        prompts.append(ids)
        texts.append(text)
    return prompts, texts


def _settings(completion, prompts, spec, config: ServerConfig) -> ChoiceSettings:
    try:
        return choice_settings(
            max(len(p) for p in prompts), spec.max_sequence, max_tokens=completion.max_tokens,
            default_max_tokens=config.default_max_tokens, temperature=completion.temperature, top_k=completion.top_k,
            top_p=completion.top_p, repetition_penalty=completion.repetition_penalty, seed=completion.seed,
            stop=completion.stop or (), ignore_eos=completion.ignore_eos)
    except ContextOverflow as error:
        raise ProtocolError(str(error), param="prompt", code="context_length_exceeded") from None
    except ValueError as error:
        raise ProtocolError(str(error)) from None


def _sse(payload) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _stream(job: Request, events: asyncio.Queue, answer: _Answer, echoes, include_usage: bool):
    done = False
    try:
        if echoes:
            yield _sse(answer.body([protocol.choice(i, text, None) for i, text in enumerate(echoes)]))
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                if event.text or event.finish_reason:
                    yield _sse(answer.body([protocol.choice(event.choice, event.text, event.finish_reason)]))
            elif isinstance(event, Finished):
                done = True
                if include_usage:
                    yield _sse(answer.body([], protocol.usage(event.prompt_tokens, event.completion_tokens)))
                yield _sse("[DONE]")
                return
            elif isinstance(event, Failed):
                done = True
                yield _sse(protocol.error_body(event.message, "server_error", None, 500))
                yield _sse("[DONE]")
                return
    finally:
        if not done:  # the client hung up (or the server is stopping): free the rows
            job.cancel()


async def _complete(http: HttpRequest, job: Request, events: asyncio.Queue, answer: _Answer, echoes):
    """Collect a non-stream answer, cancelling the request if the client disconnects first."""
    texts = ["" for _ in range(len(job.prompts) * job.n)]
    reasons: list[str | None] = [None] * len(texts)

    async def collect():
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                texts[event.choice] += event.text
                reasons[event.choice] = event.finish_reason or reasons[event.choice]
            else:
                return event

    async def disconnected():
        while True:
            message = await http.receive()
            if message["type"] == "http.disconnect":
                return

    result, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    try:
        finished, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()
            job.cancel()
    if result not in finished:
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
    event = result.result()
    if isinstance(event, Failed):
        return JSONResponse(protocol.error_body(event.message, "server_error", None, 500), status_code=500)
    if echoes:
        texts = [prefix + text for prefix, text in zip(echoes, texts)]
    choices = [protocol.choice(i, text, reason) for i, (text, reason) in enumerate(zip(texts, reasons))]
    return answer.body(choices, protocol.usage(event.prompt_tokens, event.completion_tokens))
