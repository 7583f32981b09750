"""OpenAI's chat-completions request, as typed models: what a client may send through the proxy.

Only what validates here is forwarded to the small model or, through litellm, to the frontier model:
a role the API does not have, content that is neither text nor a list of typed parts, a tool without
a function name OpenAI would take, a `response_format` that is not one of its three shapes, a
`logit_bias` key that is not a token id: each is the client's 400, naming the field, never an
upstream's 5xx. Models are strict (no "1" for 1, no true for 1.0) and refuse unknown keys inside a
message, a part or a tool, as OpenAI does; unknown top-level parameters are ignored and never forwarded.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, model_validator

# OpenAI's pattern for function and json_schema names.
FunctionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
ShortText = Annotated[str, StringConstraints(max_length=256)]
TokenId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,10}$")]
Bias = Annotated[float, Field(ge=-100, le=100)]


class _Strict(BaseModel):
    """A nested object of the request: exact types, no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True)


# -- content parts ------------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str  # base64
    format: Literal["wav", "mp3"]


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(_Strict):
    file_data: str | None = None  # base64
    file_id: str | None = None
    filename: str | None = None

    @model_validator(mode="after")
    def _names_a_file(self) -> "FileRef":
        if self.file_data is None and self.file_id is None:
            raise ValueError("a file part needs `file_data` or `file_id`")
        return self


class FilePart(_Strict):
    type: Literal["file"]
    file: FileRef


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


def _content_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "parts"
    return None  # pydantic answers with the custom error below


_NOT_CONTENT = "must be a string or a list of content parts"
_TextParts = Annotated[list[Annotated[TextPart, Field(discriminator="type")]], Field(min_length=1)]
_UserParts = Annotated[list[Annotated[Union[TextPart, ImagePart, AudioPart, FilePart], Field(discriminator="type")]],
                       Field(min_length=1)]
_AssistantParts = Annotated[list[Annotated[Union[TextPart, RefusalPart], Field(discriminator="type")]],
                            Field(min_length=1)]

TextContent = Annotated[Union[Annotated[str, Tag("text")], Annotated[_TextParts, Tag("parts")]],
                        Discriminator(_content_kind, custom_error_type="invalid_content",
                                      custom_error_message=_NOT_CONTENT)]
UserContent = Annotated[Union[Annotated[str, Tag("text")], Annotated[_UserParts, Tag("parts")]],
                        Discriminator(_content_kind, custom_error_type="invalid_content",
                                      custom_error_message=_NOT_CONTENT)]
AssistantContent = Annotated[Union[Annotated[str, Tag("text")], Annotated[_AssistantParts, Tag("parts")]],
                             Discriminator(_content_kind, custom_error_type="invalid_content",
                                           custom_error_message=_NOT_CONTENT)]


# -- messages -------------------------------------------------------------------------------------
class SystemMessage(_Strict):
    role: Literal["system"]
    content: TextContent
    name: ShortText | None = None


class DeveloperMessage(_Strict):
    role: Literal["developer"]
    content: TextContent
    name: ShortText | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: UserContent
    name: ShortText | None = None


class CalledFunction(_Strict):
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Strict):
    id: str = Field(min_length=1)
    type: Literal["function"]
    function: CalledFunction


class AssistantAudio(_Strict):
    id: str = Field(min_length=1)


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: AssistantContent | None = None
    name: ShortText | None = None
    # An empty list is what vLLM answers with no tool call; clients send it back in the next turn.
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None
    function_call: CalledFunction | None = None  # deprecated by OpenAI, still accepted
    refusal: str | None = None
    audio: AssistantAudio | None = None

    @model_validator(mode="after")
    def _says_something(self) -> "AssistantMessage":
        if self.content is None and not self.tool_calls and self.function_call is None and self.refusal is None \
                and self.audio is None:
            raise ValueError("an assistant message needs `content` unless it has `tool_calls` or `function_call`")
        return self


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: str = Field(min_length=1)


class FunctionMessage(_Strict):
    """The deprecated `function` role: still OpenAI's API, still accepted."""

    role: Literal["function"]
    content: str | None
    name: str = Field(min_length=1)


Message = Annotated[Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage, FunctionMessage],
                    Field(discriminator="role")]


# -- tools ------------------------------------------------------------------------------------------
class FunctionDef(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object
    strict: bool | None = None

    @model_validator(mode="after")
    def _object_schema(self) -> "FunctionDef":
        _check_object_schema(self.parameters, "parameters")
        return self


def _check_object_schema(schema: dict[str, Any] | None, where: str) -> None:
    """OpenAI takes an object schema here; `properties` maps names to schemas. (The rest of JSON Schema
    is the model provider's to judge; the body's depth bound already holds.)"""
    if schema is None:
        return
    kind = schema.get("type")
    if kind is not None and kind != "object":
        raise ValueError(f"`{where}` must be a JSON Schema with type \"object\", got type {str(kind)[:40]!r}")
    props = schema.get("properties")
    if props is not None and (not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values())):
        raise ValueError(f"`{where}.properties` must map each name to a JSON Schema object")


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


def _str_or_object(value: Any) -> str | None:
    if isinstance(value, str):
        return "mode"
    if isinstance(value, (dict, BaseModel)):  # a dict when validating, the model when serialising
        return "object"
    return None


ToolChoice = Annotated[Union[Annotated[Literal["none", "auto", "required"], Tag("mode")],
                             Annotated[NamedToolChoice, Tag("object")]],
                       Discriminator(_str_or_object, custom_error_type="invalid_tool_choice",
                                     custom_error_message='must be "none", "auto", "required" or '
                                                          '{"type": "function", "function": {"name": ...}}')]


# -- response_format --------------------------------------------------------------------------------
class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: FunctionName
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaFormat], Field(discriminator="type")]


def _one_or_list(value: Any) -> str | None:
    if isinstance(value, str):
        return "one"
    if isinstance(value, list):
        return "list"
    return None


Stop = Annotated[Union[Annotated[str, Tag("one")], Annotated[list[str], Field(max_length=4), Tag("list")]],
                 Discriminator(_one_or_list, custom_error_type="invalid_stop",
                               custom_error_message="must be a string or a list of up to 4 strings")]


class StreamOptions(BaseModel):
    # Not forwarded (the proxy sets what it asks upstream), so newer keys are ignored, not refused.
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool | None = None


# -- the request --------------------------------------------------------------------------------------
class ChatRequest(BaseModel):
    """A chat completion request. `model` is the task's name (the proxy picks the upstream model)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    messages: Annotated[list[Message], Field(min_length=1)]
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logit_bias: Annotated[dict[TokenId, Bias], Field(max_length=1024)] | None = None
    user: ShortText | None = None

    @model_validator(mode="after")
    def _stream_and_logprob_options_need_their_switch(self) -> "ChatRequest":
        # OpenAI refuses both: an option for something not asked for is a client's mistake to name.
        if self.stream_options is not None and self.stream is not True:
            raise ValueError("`stream_options` is only allowed when `stream` is true")
        if self.top_logprobs and self.logprobs is not True:
            raise ValueError("`top_logprobs` needs `logprobs`: true")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> "ChatRequest":
        choice = self.tool_choice
        if choice is None or choice == "none":
            return self
        if not self.tools:
            raise ValueError("`tool_choice` needs `tools`")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools}:
            raise ValueError(f"`tool_choice` names {choice.function.name!r}, which is not one of `tools`")
        return self

    def forwarded(self) -> dict[str, Any]:
        """The request as checked, in OpenAI's own keys: only fields the client set, unknown ones gone."""
        return self.model_dump(mode="python", exclude_unset=True, by_alias=True)
