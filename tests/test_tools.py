"""tools.py: reading the model's tool calls, checked arguments, the calculator that never evals; the demo tools."""
import json

import pytest

from dataset import conversation_problem, encode_chat
from demo_data import ATTRIBUTES, DemoGenerator, demo_toolbox, value
from tools import Toolbox, ToolError, calculator, function_schema, parse_tool_call, tool_turns


@pytest.mark.parametrize("expression,result", [
    ("2 + 3", "5"), ("31 * 12", "372"), ("3 × (4+5)", "27"), ("7 ÷ 2", "3.5"), ("-4 - -6", "2"), ("1,000 * 3", "3000"),
    ("17 // 5", "3"), ("17 % 5", "2"), ("1 / 3", "0.333333"), ("  8  ", "8"), ("2.5 * 4", "10"),
])
def test_calculator_computes(expression, result):
    assert calculator(expression) == result


@pytest.mark.parametrize("expression,problem", [
    ("__import__('os').system('true')", "only numbers"), ("open('x')", "only numbers"), ("x + 1", "only numbers"),
    ("(1).real", "only numbers"), ("2 ** 10", "only numbers"), ("'a' * 3", "only numbers"), ("[1] * 3", "only numbers"),
    ("True + 1", "only numbers"), ("1 / 0", "division by zero"), ("5 % 0", "division by zero"),
    ("99999999 * 99999999 * 99999999", "too large"), ("1 +", "cannot parse"), ("", "empty"),
    ("1+" * 150 + "1", "longer than 200"),
])
def test_calculator_refuses_anything_but_arithmetic(expression, problem):
    with pytest.raises(ToolError, match=problem):
        calculator(expression)


@pytest.mark.parametrize("text,expected", [
    ('{"name": "lookup", "arguments": {"person": "Anna", "attribute": "age"}}',
     {"name": "lookup", "arguments": {"person": "Anna", "attribute": "age"}}),
    (' {"name": "calculator", "arguments": "{\\"expression\\": \\"1+1\\"}"} ',
     {"name": "calculator", "arguments": {"expression": "1+1"}}),
    ('{"name": "now"}', {"name": "now", "arguments": {}}),
])
def test_tool_calls_are_parsed(text, expected):
    assert parse_tool_call(text) == (expected, None)


@pytest.mark.parametrize("text,problem", [
    ('{"name": "lookup", "arguments": {"person": "Anna"', "not JSON"), ("lookup(Anna)", "not JSON"),
    ('["lookup"]', "expected {"), ('{"arguments": {}}', "expected {"), ('{"name": " "}', "expected {"),
    ('{"name": "f", "arguments": [1]}', "not a JSON object"), ('{"name": "f", "arguments": "1 +"}', "not a JSON object"),
])
def test_malformed_tool_calls_say_why(text, problem):
    call, why = parse_tool_call(text)
    assert call is None and problem in why


def toolbox():
    box = Toolbox()
    box.add(function_schema("repeat", "Repeat a word", {"word": {"type": "string"}, "times": {"type": "integer"},
                                                        "style": {"type": "string", "enum": ["plain", "loud"]}},
                            required=["word", "times"]),
            lambda word, times, style="plain": (word.upper() if style == "loud" else word) * times)
    return box


@pytest.mark.parametrize("name,arguments,result", [
    ("repeat", {"word": "ab", "times": 2}, "abab"),
    ("repeat", {"word": "ab", "times": 2, "style": "loud"}, "ABAB"),
    ("repeat", {"word": "ab"}, "error: missing argument 'times'"),
    ("repeat", {"word": "ab", "times": "2"}, "error: argument 'times' must be of type integer, got \"2\""),
    ("repeat", {"word": "ab", "times": True}, "error: argument 'times' must be of type integer, got true"),
    ("repeat", {"word": "ab", "times": 1, "loud": 1}, "error: unknown argument 'loud' (expected word, times, style)"),
    ("repeat", {"word": "ab", "times": 1, "style": "soft"}, "error: argument 'style' must be one of plain, loud"),
    ("shout", {}, "error: unknown tool 'shout' (available: repeat)"),
])
def test_toolbox_checks_arguments_before_running(name, arguments, result):
    assert toolbox().call(name, arguments).startswith(result)


def test_tool_turns_are_a_trainable_openai_conversation(tokenizer):
    calls = [{"name": "repeat", "arguments": {"word": "ab", "times": 2}}, {"name": "shout", "arguments": {}}]
    turns = tool_turns(toolbox(), "", calls)
    assert turns[0]["content"] is None and [t["role"] for t in turns] == ["assistant", "tool", "tool"]
    shaped = turns[0]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in shaped] == [c["arguments"] for c in calls]
    assert [t["tool_call_id"] for t in turns[1:]] == [c["id"] for c in shaped] and len({c["id"] for c in shaped}) == 2
    assert [t["content"] for t in turns[1:]] == ["abab", "error: unknown tool 'shout' (available: repeat)"]
    conversation = [{"role": "user", "content": "go"}, *turns, {"role": "assistant", "content": "done"}]
    assert conversation_problem(conversation) is None
    ids, _ = encode_chat(tokenizer, conversation)
    assert tokenizer.decode(ids.tolist(), skip_special_tokens=False).count("<tool_response>") == 2


def test_demo_lookup_answers_every_fact_in_the_language_of_the_name():
    box, world = demo_toolbox(seed=0), DemoGenerator(0).world
    for person in world.people:
        for attribute in ATTRIBUTES:
            assert box.call("lookup", {"person": person.en, "attribute": attribute}) == value(person, attribute, "en")
            assert box.call("lookup", {"person": person.zh, "attribute": attribute}) == value(person, attribute, "zh")
    assert box.call("lookup", {"person": "Bob", "attribute": "age"}) == "error: no person named 'Bob' in the demo world"
    assert box.call("lookup", {"person": "Anna", "attribute": "height"}).startswith("error: argument 'attribute'")
    assert box.call("calculator", {"expression": "6 × 7"}) == "42"
    assert [s["function"]["name"] for s in box.schemas] == ["lookup", "calculator"]
