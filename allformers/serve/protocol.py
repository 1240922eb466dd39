"""The OpenAI request bodies the server accepts, as strict pydantic models, and OpenAI's error
shape: {"error": {"message", "type", "param", "code"}}.

Strict: a string is not a number, a float is not an int, and an unknown field is refused (as
OpenAI does) instead of being silently ignored."""
from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error the client caused (4xx) or that it should know about (429/503), in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields /v1/completions and /v1/chat/completions share (OpenAI's ranges)."""
    model: str
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=16)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)  # an extra field (vLLM's): 0 or -1 is off
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("stop must be a string or a list of strings")
        if len(v) > 4:
            raise ValueError(f"stop takes at most 4 sequences, got {len(v)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for k, b in (v or {}).items():
            if not k.isdigit():
                raise ValueError(f"logit_bias keys are token ids (strings of digits), got {k!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b} for token {k}")
        return v

    def stop_list(self) -> list:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # lenient about extra keys: clients send back the assistant messages they received (refusal, annotations ...)
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"only text content parts are supported, got type {kind!r}")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    best_of: Optional[int] = Field(None, ge=1, le=16)
    suffix: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        return _text_or_tokens(v, "prompt")


class EmbeddingRequest(_Strict):
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v):
        return _text_or_tokens(v, "input")


def _text_or_tokens(v: Any, name: str):
    """One clear message for OpenAI's four shapes instead of pydantic's four union failures."""
    ok = (isinstance(v, str)
          or (isinstance(v, list) and v and (all(isinstance(x, str) for x in v)
                                             or all(type(x) is int for x in v)
                                             or all(isinstance(x, list) and x and all(type(t) is int for t in x)
                                                    for x in v))))
    if not ok:
        raise ValueError(f"{name} must be a string, a non-empty list of strings, a list of token ids or a list of "
                         f"non-empty lists of token ids")
    return v


def validation_error(e: ValidationError) -> APIError:
    """pydantic's first complaint -> one OpenAI-style 400."""
    err = e.errors(include_url=False)[0]
    kind, loc = err["type"], [x for x in err["loc"] if not _is_branch(x)]
    param = "".join(f"[{x}]" if isinstance(x, int) else (f".{x}" if i else str(x)) for i, x in enumerate(loc)) or None
    msg = re.sub(r"^(Value|Assertion) error, ", "", err["msg"])
    if kind == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request ({msg}). The body must be a "
                             f"JSON object; check its quoting and commas.", param=None, code="invalid_json")
    if kind == "model_type" and not loc:
        return APIError(400, "The request body must be a JSON object.", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind != "value_error":  # our own validators already name the value
        shown = repr(err.get("input"))
        msg += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    return APIError(400, f"Invalid value for '{param}': {msg}.", param=param, code="invalid_value")


def _is_branch(x) -> bool:
    """pydantic puts union branch names ('str', 'list[int]', 'function-after[...]') into error locations."""
    return isinstance(x, str) and bool(re.fullmatch(r"[a-z_-]+\[.*\]|str|int|float|bool|none|list|dict", x))


def parse(model_cls, raw: bytes):
    try:
        return model_cls.model_validate_json(raw or b"")
    except ValidationError as e:
        raise validation_error(e) from None
