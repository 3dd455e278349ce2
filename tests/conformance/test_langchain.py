"""LangChain's ``ChatOpenAI`` against the real stack: what it sends (``max_completion_tokens``,
``stream_options``, ``response_format`` json_schema, ``tools``) must work unchanged."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

from tests.conformance.support import MODEL

langchain_openai = pytest.importorskip("langchain_openai")


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)
    color: Literal["red", "green", "blue"]


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    # Bounded: the random model never closes a string on its own, only the grammar's limit does.
    city: str = Field(max_length=12)
    unit: Literal["c", "f"]


def chat_model(base: str, max_tokens: int) -> Any:
    return langchain_openai.ChatOpenAI(base_url=base + "/v1", api_key="x", model=MODEL, max_retries=0,
                                       timeout=60, temperature=0, max_tokens=max_tokens)


@pytest.fixture()
def llm(conf_stack: str) -> Any:
    return chat_model(conf_stack, 12)


def test_invoke_and_stream(llm: Any) -> None:
    message = llm.invoke("Hello world! How are you today?")
    assert isinstance(message.content, str) and message.content
    assert message.response_metadata["finish_reason"] in ("stop", "length")
    assert message.usage_metadata["output_tokens"] <= 12
    chunks = list(llm.stream("Hello world! How are you today?", stream_usage=True))
    assert "".join(str(c.content) for c in chunks) == message.content  # temperature 0: the same text
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert total.usage_metadata["output_tokens"] == message.usage_metadata["output_tokens"]


def test_with_structured_output(conf_stack: str) -> None:
    structured = chat_model(conf_stack, 300).with_structured_output(Person)  # json_schema response_format
    person = structured.invoke("Describe someone.")
    assert isinstance(person, Person)


def test_bind_tools(conf_stack: str) -> None:
    message = chat_model(conf_stack, 300).bind_tools([GetWeather], tool_choice="GetWeather").invoke("Weather?")
    assert message.response_metadata["finish_reason"] == "tool_calls"
    (call,) = message.tool_calls
    assert call["name"] == "GetWeather" and call["id"]
    GetWeather.model_validate(call["args"])
