"""Request models for structured output and tool calling: tools, tool_choice, response_format.

JSON schemas get a quick structural check here so a malformed one is a 400 naming its field; the
worker's grammar compiler has the last word (it answers a schema it cannot compile with a 400 too).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gateway.errors import validation_error_code


def _invalid(message: str, sub: str = "", code: str = "invalid_value") -> PydanticCustomError:
    """As openai_types._invalid: our message, ``sub`` extending the param below the field, ``code``
    the OpenAI error code."""
    return PydanticCustomError("invalid_value", message, {"sub": sub, "code": code})


Name = Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
_JSON_TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "contains")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


def _schema_problem(schema: Any, path: str = "", depth: int = 0) -> str | None:
    """A quick structural check of a JSON schema (the worker's compiler has the last word)."""
    where = f" at '{path}'" if path else ""
    if isinstance(schema, bool) and depth:
        return None
    if not isinstance(schema, dict):
        return f"a schema must be an object{where}"
    if depth > 32:
        return "the schema nests too deeply"
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) and kind else [kind]
    if kind is not None and not all(isinstance(k, str) and k in _JSON_TYPES for k in kinds):
        return f"unknown type {json.dumps(kind)}{where}"
    if "required" in schema and not (isinstance(schema["required"], list)
                                     and all(isinstance(r, str) for r in schema["required"])):
        return f"'required' must be a list of strings{where}"
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        return f"'enum' must be a non-empty list{where}"
    for key in _COUNTS:
        value = schema.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return f"'{key}' must be a non-negative integer{where}"
    children: list[tuple[str, Any]] = []
    for key in _SUBSCHEMA_MAPS:
        if key in schema:
            if not isinstance(schema[key], dict):
                return f"'{key}' must be an object{where}"
            children += [(f"{path}.{key}.{name}".lstrip("."), sub) for name, sub in schema[key].items()]
    for key in _SUBSCHEMA_LISTS:
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                return f"'{key}' must be a non-empty list{where}"
            children += [(f"{path}.{key}[{i}]".lstrip("."), sub) for i, sub in enumerate(schema[key])]
    for key in _SUBSCHEMAS:
        if key in schema:
            value = schema[key]
            # Draft 4-7 allowed a list of schemas for "items" (one per position).
            children += ([(f"{path}.{key}[{i}]".lstrip("."), sub) for i, sub in enumerate(value)]
                         if key == "items" and isinstance(value, list) else [(f"{path}.{key}".lstrip("."), value)])
    for child_path, child in children:
        problem = _schema_problem(child, child_path, depth + 1)
        if problem:
            return problem
    return None


def _check_schema(value: dict[str, Any] | None, sub: str) -> dict[str, Any] | None:
    problem = _schema_problem(value) if value is not None else None
    if problem:
        raise _invalid(f"Invalid JSON schema: {problem}.", sub)
    return value


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Name
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    @field_validator("parameters")
    @classmethod
    def _check_parameters(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_schema(value, "")


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDefinition


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: Name
    description: StrictStr | None = None
    # "schema" would shadow a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None

    @field_validator("json_schema")
    @classmethod
    def _check_json_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_schema(value, "")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_kind(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise _invalid("Missing required parameter: 'response_format.json_schema'.", "json_schema",
                           "missing_required_parameter")
        return self

    def for_job(self) -> dict[str, Any] | None:
        if self.type == "text":
            return None
        if self.type == "json_object" or self.json_schema is None:
            return {"type": "json_object"}
        spec = self.json_schema
        return {"type": "json_schema",
                "json_schema": {"name": spec.name, "schema": spec.json_schema, "strict": bool(spec.strict)}}


def check_tool_choice(value: Any) -> Any:
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return {"type": "function", "function": {"name": function["name"]}}
    raise _invalid("'tool_choice' must be 'none', 'auto', 'required', or "
                   "{\"type\": \"function\", \"function\": {\"name\": ...}}.")


def parse_response_format(value: Any) -> ResponseFormat | None:
    """Every problem in a response_format is reported as param ``response_format`` (as OpenAI does),
    with the path inside it in the message."""
    if value is None:
        return None
    try:
        return ResponseFormat.model_validate(value)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        code = validation_error_code(error)
        if error["type"] == "invalid_value":
            raise _invalid(error["msg"], code=code) from None
        where = "".join(f".{part}" for part in error["loc"])
        raise _invalid(f"Invalid 'response_format{where}': {error['msg'][:1].lower()}{error['msg'][1:]}.",
                       code=code) from None
