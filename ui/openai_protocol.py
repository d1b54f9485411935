"""Request bodies of the OpenAI-compatible endpoint as pydantic models (after vLLM's and LMDeploy's
``protocol.py``), and their translation into the app's :class:`~engines.base.ChatRequest`.

Every field OpenAI's chat completions API defines is declared, so none is silently ignored: each is
honoured, or refused with a 400 that names it when the loaded engine cannot honour it. Unknown
fields are refused too (``extra="forbid"``), as OpenAI's own API does. Types are strict where a
lax reading would change the meaning (``"stream": "yes"`` is not a boolean; ``max_tokens: 1.5`` is
not a whole number).
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from engines.base import ChatMessage, ChatRequest, GenParams, InvalidRequest, check_text

Temperature = Annotated[float, Field(strict=True, ge=0.0, le=2.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(strict=True, ge=-2.0, le=2.0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImageURL(_Strict):
    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: StrictStr | None = None


class JSONSchemaFormat(_Strict):
    name: StrictStr
    description: StrictStr | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Strict):
    """POST /v1/chat/completions. Fields after ``top_k`` are extensions LMDeploy's and vLLM's
    servers also take."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "temperature": 0.2, "top_p": 0.9, "max_tokens": 4, "stop": ["\n"], "seed": 1, "stream": True},
        {"messages": [{"role": "developer", "content": "Answer in one word."},
                      {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}],
         "presence_penalty": 0.5, "frequency_penalty": 0.5, "stream_options": {"include_usage": True},
         "response_format": {"type": "text"}, "n": 1}]})

    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(strict=True, gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    n: StrictInt | None = Field(default=None, ge=1, le=16)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(strict=True, ge=-100, le=100)]] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    seed: StrictInt | None = Field(default=None, ge=0, le=2**31 - 1)
    tools: list[dict] | None = None
    tool_choice: StrictStr | dict | None = None
    parallel_tool_calls: StrictBool | None = None
    user: StrictStr | None = None
    top_k: StrictInt | None = Field(default=None, ge=0, le=1000)
    repetition_penalty: Annotated[float, Field(strict=True, ge=0.5, le=2.0, allow_inf_nan=False)] | None = None


def _content(m: Message, i: int, decode_image) -> tuple[str, tuple]:
    if m.content is None:
        raise InvalidRequest(f"messages[{i}] has no content.", param=f"messages[{i}].content")
    if isinstance(m.content, str):
        return m.content, ()
    text, images = [], []
    for part in m.content:
        if isinstance(part, TextPart):
            text.append(part.text)
        else:
            try:
                images.append(decode_image(part.image_url.url))
            except ValueError as e:
                raise InvalidRequest(f"messages[{i}]: {e}", param=f"messages[{i}].content") from None
    return "".join(text), tuple(images)


def to_chat_request(body: ChatCompletionRequest, *, max_new_tokens_limit: int, owner: str | None,
                    request_id: str, decode_image, defaults: GenParams | None = None) -> ChatRequest:
    """The app's request for ``body``; InvalidRequest (naming the parameter) for what cannot be
    honoured. What the loaded engine supports (penalties, images) is checked by the manager."""
    unsupported = []
    if body.n not in (None, 1):
        unsupported.append(("n", "only n=1 is supported"))
    if body.logit_bias:
        unsupported.append(("logit_bias", "logit_bias is not supported"))
    if body.logprobs:
        unsupported.append(("logprobs", "logprobs are not supported"))
    if body.top_logprobs is not None and not body.logprobs:
        unsupported.append(("top_logprobs", "top_logprobs needs logprobs: true"))
    if body.response_format is not None and body.response_format.type != "text":
        unsupported.append(("response_format", f"response_format {body.response_format.type!r} is not "
                                               "supported; only 'text'"))
    if body.tools:
        unsupported.append(("tools", "tools (function calling) are not supported"))
    if body.tool_choice not in (None, "none"):
        unsupported.append(("tool_choice", "tool_choice is not supported (no tools)"))
    if unsupported:
        param, message = unsupported[0]
        raise InvalidRequest(f"{message}.", param=param)

    msgs: list[ChatMessage] = []
    system: list[str] = []
    for i, m in enumerate(body.messages):
        if m.role == "tool" or m.tool_calls:
            raise InvalidRequest("tool messages and tool_calls are not supported.", param=f"messages[{i}].role")
        text, images = _content(m, i, decode_image)
        try:
            check_text(text, f"messages[{i}]")
        except ValueError as e:
            raise InvalidRequest(str(e), param=f"messages[{i}].content") from None
        if m.role in ("system", "developer"):
            if msgs:
                raise InvalidRequest(f"messages[{i}]: a {m.role} message must come before the conversation.",
                                     param=f"messages[{i}].role")
            system.append(text)
            continue
        if images and m.role != "user":
            raise InvalidRequest(f"messages[{i}]: only user messages may carry images.",
                                 param=f"messages[{i}].content")
        if m.role == "user" and not text.strip() and not images:
            raise InvalidRequest(f"messages[{i}] is an empty user message.", param=f"messages[{i}].content")
        msgs.append(ChatMessage(m.role, text, images))
    if not msgs or msgs[-1].role != "user":
        raise InvalidRequest("The last message must come from the user.", param="messages")
    if system:
        msgs.insert(0, ChatMessage("system", "\n\n".join(system)))

    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = min(512, max_new_tokens_limit)
    if max_tokens > max_new_tokens_limit:
        raise InvalidRequest(f"{name} must be in [1, {max_new_tokens_limit}], got {max_tokens}.", param=name)
    kw = {"max_new_tokens": max_tokens}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "presence_penalty",
                "frequency_penalty", "stop"):
        value = getattr(body, key)
        if value is not None:
            kw[key] = value
    try:
        params = GenParams.from_dict(kw, defaults=defaults)
    except ValueError as e:
        raise InvalidRequest(str(e), param=next((k for k in kw if k in str(e)), None)) from None
    return ChatRequest(tuple(msgs), params, request_id=request_id, owner=owner,
                       session=request_id, source="v1")
