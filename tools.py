"""Tool calling: the model's <tool_call> text read into calls, tools described by OpenAI function schemas and run
with their arguments checked against those schemas, and a calculator that never calls eval.

    from tools import Toolbox, parse_tool_call, calculator

A reply's tool call is the JSON {"name": ..., "arguments": {...}} between <tool_call> and </tool_call>
(train_tokenizer.CHAT_TEMPLATE); inference.Reply hands over that text and parse_tool_call reads it. A Toolbox runs a
call only when the tool exists and the arguments match its schema (required keys, no unknown ones, types, enums);
otherwise the result is an "error: ..." text the model sees in the tool turn, as a real API would answer.
"""
if __name__ == "__main__":  # before the imports: a library module answers at once
    raise SystemExit("tools.py is a library module, not a script: eval_model.py --tools demo runs the demo tools "
                     "(see README.md)")
import ast
import json
import math
import operator
import uuid

JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


class ToolError(ValueError):
    """A call that cannot run: unknown tool, bad arguments, or a failure inside the tool. The message is what the
    model gets back."""


def parse_tool_call(text):
    """(call, None) for the text between <tool_call> and </tool_call> when it is {"name": str, "arguments": {...}}
    (arguments may also be a JSON string of an object, as OpenAI writes them), else (None, why it is not)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg} at column {e.colno})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"].strip():
        return None, 'expected {"name": ..., "arguments": {...}}'
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None, "'arguments' is not a JSON object"
    if not isinstance(args, dict):
        return None, "'arguments' is not a JSON object"
    return {"name": call["name"], "arguments": args}, None


def openai_tool_calls(calls):
    """Parsed calls in OpenAI's message shape: ids, type "function", arguments as a JSON string."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def tool_turns(toolbox, content, calls):
    """What a reply with parsed tool calls adds to the conversation: the assistant turn (its content and the calls,
    OpenAI-shaped) and one tool turn per call holding the result of running it."""
    shaped = openai_tool_calls(calls)
    return [{"role": "assistant", "content": content or None, "tool_calls": shaped}] + [
        {"role": "tool", "tool_call_id": s["id"], "content": toolbox.call(c["name"], c["arguments"])}
        for s, c in zip(shaped, calls)]


def function_schema(name, description, properties, required=None):
    """An OpenAI tool schema: {"type": "function", "function": {name, description, parameters}}."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(required or properties)}}}


def check_arguments(schema, arguments):
    """Raise ToolError naming the first argument that does not match the function schema's parameters."""
    params = schema["function"].get("parameters", {})
    properties = params.get("properties", {})
    missing = [k for k in params.get("required", []) if k not in arguments]
    if missing:
        raise ToolError(f"missing argument {missing[0]!r}")
    for key, value in arguments.items():
        if key not in properties:
            raise ToolError(f"unknown argument {key!r} (expected {', '.join(properties) or 'none'})")
        spec = properties[key]
        expected = JSON_TYPES.get(spec.get("type"))
        if expected and (not isinstance(value, expected) or isinstance(value, bool) and spec["type"] != "boolean"):
            raise ToolError(f"argument {key!r} must be of type {spec['type']}, got {json.dumps(value)}")
        if "enum" in spec and value not in spec["enum"]:
            raise ToolError(f"argument {key!r} must be one of {', '.join(map(str, spec['enum']))}, got {value!r}")


class Toolbox:
    """Named functions with their schemas. call() checks the arguments first and returns the result as text."""

    def __init__(self):
        self.functions, self.schemas = {}, []

    def add(self, schema, function):
        self.functions[schema["function"]["name"]] = (schema, function)
        self.schemas.append(schema)

    def call(self, name, arguments):
        """The tool's result text, or "error: ..." when the call cannot run."""
        try:
            if name not in self.functions:
                raise ToolError(f"unknown tool {name!r} (available: {', '.join(self.functions)})")
            schema, function = self.functions[name]
            check_arguments(schema, arguments)
            return str(function(**arguments))
        except ToolError as e:
            return f"error: {e}"


# ------------------------------------------------------------------------------------------------- calculator

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
MAX_EXPRESSION = 200
MAX_MAGNITUDE = 1e15  # beyond this a result is no longer exact in a float; a demo calculator has no need for it


def calculator(expression):
    """The value of an arithmetic expression: numbers, + - * / // % and parentheses (× and ÷ too). Parsed with
    ast and evaluated node by node; anything else (names, calls, powers) is refused. Integral results print
    without a decimal point."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("the expression is empty")
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION} characters")
    text = expression.replace("×", "*").replace("÷", "/").replace("，", "").replace(",", "")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r} as arithmetic") from None
    value = _evaluate(tree.body)
    if value == int(value):
        return str(int(value))
    return f"{value:.6g}"


def _evaluate(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if right == 0 and isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
            raise ToolError("division by zero")
        value = OPERATORS[type(node.op)](left, right)
        if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
            raise ToolError("the result is too large")
        return value
    raise ToolError("only numbers, + - * / // % and parentheses are allowed")
