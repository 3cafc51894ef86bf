"""Harmony rendering (token-exact against openai-harmony) and parsing of completions, streamed and not."""

import json

import pytest
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
)

from ossie.chat.harmony import ChatFormatError, ChatParser, render
from ossie.tokenizer import harmony_encoding

DATE = "2025-06-28"
WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
    },
    "required": ["location"],
}
NESTED_PARAMS = {
    "type": "object",
    "properties": {
        "query": {"type": "string"},
        "filters": {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string"}},
                "range": {"type": "object", "properties": {"from": {"type": "integer"}, "to": {"type": "integer"}}},
            },
        },
        "limit": {"type": "integer", "default": 10},
    },
    "required": ["query"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_current_weather",
                                      "description": "Gets the current weather in the provided location.",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "search", "description": "Search the notes.",
                                      "parameters": NESTED_PARAMS}},
]


def enc():
    return harmony_encoding()


def expected(*messages, effort="medium", system=None):
    sysc = SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize()))
    sysc = sysc.with_conversation_start_date(DATE)
    if system:
        sysc = system(sysc)
    conv = Conversation.from_messages([Message.from_role_and_content(Role.SYSTEM, sysc), *messages])
    return list(enc().render_conversation_for_completion(conv, Role.ASSISTANT))


def user(text):
    return Message.from_role_and_content(Role.USER, text)


def dev(instructions=None, tools=None):
    d = DeveloperContent.new()
    if instructions:
        d = d.with_instructions(instructions)
    if tools:
        d = d.with_function_tools([ToolDescription.new(t["function"]["name"], t["function"]["description"],
                                                       parameters=t["function"]["parameters"]) for t in tools])
    return Message.from_role_and_content(Role.DEVELOPER, d)


def assistant(text, channel, recipient=None):
    m = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    if recipient:
        m = m.with_recipient(recipient).with_content_type("<|constrain|>json")
    return m


def tool_result(name, text):
    return (Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
            .with_recipient("assistant").with_channel("commentary"))


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_every_reasoning_effort(effort):
    ours = render([{"role": "user", "content": "What is 2+2?"}], reasoning_effort=effort,
                  conversation_start_date=DATE)
    assert ours == expected(user("What is 2+2?"), effort=effort)
    assert enc().decode(ours).endswith("<|start|>assistant")
    assert f"Reasoning: {effort}" in enc().decode(ours)


def test_system_and_developer_become_instructions():
    msgs = [{"role": "system", "content": "Always respond in riddles"},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert render(msgs, conversation_start_date=DATE) == expected(dev("Always respond in riddles"), user("Hi"))
    msgs[0]["role"] = "developer"
    assert render(msgs, conversation_start_date=DATE) == expected(dev("Always respond in riddles"), user("Hi"))


def test_guide_example_function_tools_high_effort():
    """The harmony guide's example: riddles, get_current_weather, high effort, a question about the weather."""
    msgs = [{"role": "system", "content": "Always respond in riddles"},
            {"role": "user", "content": "What is the weather like in SF?"}]
    ours = render(msgs, tools=TOOLS[:1], reasoning_effort="high", conversation_start_date=DATE)
    assert ours == expected(dev("Always respond in riddles", TOOLS[:1]), user("What is the weather like in SF?"),
                            effort="high")
    text = enc().decode(ours)
    assert "namespace functions {" in text and "type get_current_weather = (_: {" in text
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text


def test_nested_schema_tools_without_instructions():
    ours = render([{"role": "user", "content": "find"}], tools=TOOLS, conversation_start_date=DATE)
    assert ours == expected(dev(None, TOOLS), user("find"))


def test_tool_call_round_trip_keeps_reasoning_before_the_call():
    msgs = [
        {"role": "user", "content": "What is the weather in Tokyo?"},
        {"role": "assistant", "reasoning_content": "Need the weather tool.", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_current_weather", "arguments": '{"location": "Tokyo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sunny": true, "temperature": 20}'},
    ]
    ours = render(msgs, tools=TOOLS[:1], conversation_start_date=DATE)
    assert ours == expected(
        dev(None, TOOLS[:1]), user("What is the weather in Tokyo?"),
        assistant("Need the weather tool.", "analysis"),
        assistant('{"location": "Tokyo"}', "commentary", "functions.get_current_weather"),
        tool_result("get_current_weather", '{"sunny": true, "temperature": 20}'))
    text = enc().decode(ours)
    assert "Need the weather tool." in text  # reasoning before a call is kept
    assert "<|start|>functions.get_current_weather to=assistant<|channel|>commentary<|message|>" in text


def test_earlier_reasoning_with_final_answer_is_dropped():
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning": "User greets. Respond.", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    ours = render(msgs, conversation_start_date=DATE)
    assert ours == expected(user("Hi"), assistant("User greets. Respond.", "analysis"),
                            assistant("Hello!", "final"), user("How are you?"))
    assert "User greets" not in enc().decode(ours)


def test_preamble_and_builtin_tools():
    msgs = [{"role": "user", "content": "look it up"},
            {"role": "assistant", "content": "Let me check.",
             "tool_calls": [{"id": "c", "function": {"name": "search", "arguments": {"query": "x"}}}]},
            {"role": "tool", "tool_call_id": "c", "content": "[]"}]
    ours = render(msgs, tools=TOOLS[1:], builtin_tools=["browser", "python"], conversation_start_date=DATE)
    assert ours == expected(dev(None, TOOLS[1:]), user("look it up"), assistant("Let me check.", "commentary"),
                            assistant('{"query": "x"}', "commentary", "functions.search"),
                            tool_result("search", "[]"),
                            system=lambda s: s.with_browser_tool().with_python_tool())


@pytest.mark.parametrize("bad", [
    [{"role": "wizard", "content": "x"}],
    [{"role": "tool", "tool_call_id": "nope", "content": "x"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    ["not a message"],
])
def test_bad_messages(bad):
    with pytest.raises(ChatFormatError):
        render(bad)


def test_bad_effort_and_tools():
    with pytest.raises(ChatFormatError):
        render([{"role": "user", "content": "x"}], reasoning_effort="max")
    with pytest.raises(ChatFormatError):
        render([{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {}}])


# ---- parsing ----------------------------------------------------------------------------------------------


def parse(text, hit_length=False):
    """Feed the completion one token at a time; return (assembled from the deltas, the final result)."""
    tokens = enc().encode(text, allowed_special="all")
    parser = ChatParser()
    deltas = [d for t in tokens for d in parser.feed(t)] + parser.finish(hit_length)
    assert deltas[-1].kind == "finish"
    result = deltas[-1].result
    streamed = {"reasoning": "", "content": "", "calls": {}}
    for d in deltas[:-1]:
        if d.kind == "tool_call":
            call = streamed["calls"].setdefault(d.index, {"name": None, "arguments": ""})
            if d.name:
                assert call["name"] is None and call["arguments"] == "", "the name comes first"
                call["name"] = d.name
            call["arguments"] += d.text
        else:
            streamed[d.kind] += d.text
    # streaming and non-streaming agree
    assert streamed["reasoning"] == result.reasoning and streamed["content"] == result.content
    assert [(c["name"], c["arguments"]) for c in streamed["calls"].values()] == \
           [(c.name, c.arguments) for c in result.tool_calls]
    for leak in ("<|", "to=functions", "commentary", "analysis<", "json<"):
        assert leak not in result.content
    return result


def test_final_only():
    r = parse("<|channel|>final<|message|>Hello there!<|return|>")
    assert (r.reasoning, r.content, r.tool_calls, r.finish_reason) == ("", "Hello there!", [], "stop")


def test_analysis_then_final():
    r = parse("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>42<|return|>")
    assert (r.reasoning, r.content, r.finish_reason) == ("Think.", "42", "stop")
    assert r.reasoning_tokens > 0 and r.completion_tokens > r.reasoning_tokens


@pytest.mark.parametrize("call", [
    '<|channel|>commentary to=functions.get_current_weather <|constrain|>json<|message|>{"location": "SF"}<|call|>',
    '<|channel|>commentary to=functions.get_current_weather<|message|>{"location": "SF"}<|call|>',
    ' to=functions.get_current_weather<|channel|>commentary <|constrain|>json<|message|>{"location": "SF"}<|call|>',
    ' to=functions.get_current_weather<|channel|>commentary json<|message|>{"location": "SF"}<|call|>',
])
def test_analysis_then_call_in_every_form(call):
    text = "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant" + call
    r = parse(text)
    assert r.reasoning == "Need weather." and r.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in r.tool_calls] == [("get_current_weather", {"location": "SF"})]
    assert r.finish_reason == "tool_calls" and r.tool_calls[0].id.startswith("call_")


def test_call_as_first_message_recipient_before_channel():
    r = parse(' to=functions.search<|channel|>commentary json<|message|>{"query": "q"}<|call|>')
    assert r.tool_calls[0].name == "search" and r.finish_reason == "tool_calls" and r.content == ""


def test_preamble_then_call():
    r = parse("<|channel|>commentary<|message|>Checking the notes.<|end|><|start|>assistant<|channel|>commentary "
              'to=functions.search <|constrain|>json<|message|>{"query": "q", "filters": {"tags": ["a"]}}<|call|>')
    assert r.content == "Checking the notes."
    assert json.loads(r.tool_calls[0].arguments) == {"query": "q", "filters": {"tags": ["a"]}}


def test_truncated_final_answer():
    r = parse("<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>final<|message|>The ans",
              hit_length=True)
    assert (r.reasoning, r.content, r.finish_reason) == ("Hmm.", "The ans", "length")


def test_truncated_header():
    r = parse("<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>fin", hit_length=True)
    assert (r.reasoning, r.content, r.finish_reason) == ("Hmm.", "", "length")
    assert r.warnings


def test_truncated_call_is_text_not_a_call():
    r = parse('<|channel|>commentary to=functions.search <|constrain|>json<|message|>{"query": "q',
              hit_length=True)
    assert r.tool_calls == [] and r.content == '{"query": "q' and r.finish_reason == "length" and r.warnings


def test_invalid_json_call_is_text():
    r = parse("<|channel|>commentary to=functions.search <|constrain|>json<|message|>{query: oops}<|call|>")
    assert r.tool_calls == [] and r.content == "{query: oops}" and r.finish_reason == "stop" and r.warnings


def test_no_header_at_all_is_text():
    r = parse("Just some words")
    assert r.content == "Just some words" and r.warnings


def test_garbage_after_a_message_is_text():
    r = parse("<|channel|>final<|message|>ok<|end|>stray words<|return|>")
    assert r.content.startswith("ok") and "stray words" in r.content and r.warnings


def test_two_calls_in_one_completion():
    r = parse('<|channel|>commentary to=functions.a<|message|>{}<|end|>'
              '<|start|>assistant<|channel|>commentary to=functions.b<|message|>{"x": 1}<|call|>')
    assert [c.name for c in r.tool_calls] == ["a", "b"] and len({c.id for c in r.tool_calls}) == 2


def test_text_without_a_header_streams_as_it_comes():
    """A model that writes plain text (a random one) has it streamed once HEADERLESS_AFTER tokens show no header,
    not held to the end; the text is the same."""
    enc = harmony_encoding()
    tokens = enc.encode("The quick brown fox jumps over the lazy dog, " * 4, allowed_special="all")
    parser = ChatParser()
    streamed = [d.text for t in tokens for d in parser.feed(t) if d.kind == "content"]
    assert streamed, "nothing came before the end"
    final = parser.finish(hit_length=True)
    text = "".join(streamed) + "".join(d.text for d in final if d.kind == "content")
    assert text == enc.decode(tokens) == final[-1].result.content
