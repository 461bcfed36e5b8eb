"""The OpenAI completions wire format the server speaks: the request and its field policy, response and stream
chunk shapes, and OpenAI's error body. The subset vLLM, TensorRT-LLM's ``trtllm-serve`` and llama.cpp share.

Field policy: what GPTMeg generates with is honoured; what it cannot honour (``logprobs``, non-zero
presence/frequency penalties, ``logit_bias``, ``best_of`` > 1, ``suffix``) is a 400 rather than silently ignored;
unknown fields are ignored (clients send their own extras) and listed in the server log.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

__all__ = [
    "CompletionRequest",
    "ProtocolError",
    "chunk",
    "completion_id",
    "error_body",
    "parse_completion_request",
]

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per request
MAX_STOP = 16  # stop strings per request

Prompt = Union[str, list[str], list[StrictInt], list[list[StrictInt]]]


class ProtocolError(ValueError):
    """A request the server answers with an OpenAI error body: ``status``, ``type``, ``param``, ``code``."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def body(self) -> dict:
        return error_body(str(self), self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """``POST /v1/completions`` body. Defaults are OpenAI's: 16 tokens, temperature 1 (sampling); 0 is greedy."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: Prompt
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=-1)  # extra (vLLM): -1 or 0 = off
    repetition_penalty: float | None = Field(default=None, gt=0)  # extra (vLLM, TGI)
    stop: str | list[str] | None = None  # normalised to a list by the validator
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**63)
    echo: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False  # extra (vLLM): keep generating past the end-of-text token
    user: str | None = None
    # accepted only at their neutral values
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    best_of: StrictInt | None = None
    suffix: str | None = None

    @field_validator("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
    @classmethod
    def _finite(cls, value):
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        return stops

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must not be an empty list")
        if isinstance(value, list) and value and isinstance(value[0], (str, list)) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return value

    def unsupported(self) -> None:
        """400 for fields GPTMeg cannot honour at a non-neutral value."""
        checks = [
            ("logprobs", self.logprobs is not None, "logprobs are not supported"),
            ("presence_penalty", bool(self.presence_penalty), "presence_penalty is not supported (only 0)"),
            ("frequency_penalty", bool(self.frequency_penalty), "frequency_penalty is not supported (only 0); use "
             "repetition_penalty"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            ("best_of", self.best_of not in (None, 1), "best_of > 1 is not supported"),
            ("suffix", bool(self.suffix), "suffix is not supported"),
            ("stream_options", self.stream_options is not None and not self.stream,
             "stream_options is only allowed when stream is true"),
        ]
        for param, bad, message in checks:
            if bad:
                raise ProtocolError(f"{message}.", param=param)

    @property
    def extra_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


def parse_completion_request(body: Any) -> CompletionRequest:
    """The validated request, or a 400 ProtocolError naming the first bad field."""
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object.")
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not isinstance(p, int)) or None
        param = param.split(".")[0] if param else None
        raise ProtocolError(f"{param or 'body'}: {first['msg']}" if param else first["msg"], param=param) from None
    request.unsupported()
    return request


def completion_id() -> str:
    return f"cmpl-{secrets.token_hex(16)}"


def chunk(request_id: str, created: int, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    """A ``text_completion`` object: a whole response, or one streamed chunk."""
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())
