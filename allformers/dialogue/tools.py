"""Tools a dialogue model may call, and the one text protocol for calling them.

The protocol (Hermes / Qwen style, which OpenAI function calling maps onto one to one):
  * the tools are listed in the system message (`tools_system_prompt`), one JSON schema a line;
  * the model calls one by writing `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    as its whole turn (generation stops at `</tool_call>`: CALL_STOP);
  * the result comes back as a `role: tool` message, and the model continues from there.
`run_with_tools` is that loop for a model answering on its own (LaMDA's toolset, the server's
`--dialogue lamda`); the server's OpenAI `tools` field returns the call to the client instead.

The calculator parses arithmetic with `ast` and evaluates the tree itself over exact fractions:
no `eval`, no names, no calls, no attributes, bounded sizes."""
from __future__ import annotations

import ast
import json
import operator
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional

from ..errors import AllformersError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_STOP = CALL_CLOSE  # the stop string generation uses: a call ends the turn
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)


class ToolError(AllformersError, ValueError):
    """A tool call that cannot run: unknown tool, bad arguments, an expression the calculator refuses."""


# ---------------------------------------------------------------------- the calculator
MAX_EXPRESSION = 200  # characters
MAX_DIGITS = 60  # of any intermediate numerator or denominator
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _normalise(expression: str) -> str:
    e = expression.strip().rstrip("=").strip()
    e = e.replace("×", "*").replace("÷", "/").replace("−", "-").replace("^", "**")
    e = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", e)  # 1,234 -> 1234 (a thousands separator, not a tuple)
    return re.sub(r"(?<=\d)\s*[xX]\s*(?=[\d(])", "*", e)  # 12 x 7 -> 12*7


def _value(node) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _value(node.left), _value(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise ToolError("division by zero")
        if isinstance(node.op, ast.Pow):
            if b.denominator != 1:
                raise ToolError("only whole-number powers are supported (no roots)")
            if abs(b) > 64 or (a == 0 and b < 0):
                raise ToolError(f"power {b} is out of range (|exponent| <= 64, no 0 to a negative power)")
        out = _BINARY[type(node.op)](a, b)
        out = Fraction(out)
        if max(len(str(abs(out.numerator))), len(str(out.denominator))) > MAX_DIGITS:
            raise ToolError(f"the result has more than {MAX_DIGITS} digits")
        return out
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    what = type(node).__name__
    raise ToolError(f"the calculator takes numbers, + - * / // % ** and parentheses only, not {what}")


def format_number(x: Fraction) -> str:
    """An exact integer as is; otherwise a decimal with up to 10 places, trailing zeros dropped."""
    if x.denominator == 1:
        return str(x.numerator)
    text = f"{float(x):.10f}".rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly: calculate("37 * 48") -> "1776", "7 / 4" -> "1.75"."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("the calculator needs an expression, e.g. '37 * 48'")
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION} characters")
    text = _normalise(expression)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"{expression!r} is not an arithmetic expression") from None
    return format_number(_value(tree.body))


# ---------------------------------------------------------------------- tools and calls
@dataclass
class Tool:
    """A callable with an OpenAI function schema. `fn(**arguments) -> str`."""
    name: str
    description: str
    parameters: dict
    fn: Optional[Callable[..., str]] = None  # None: the client runs it (OpenAI `tools` from a request)

    def schema(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def __call__(self, arguments: dict) -> str:
        if self.fn is None:
            raise ToolError(f"the tool {self.name!r} is run by the client, not here")
        required = self.parameters.get("required", [])
        missing = [k for k in required if k not in arguments]
        if missing:
            raise ToolError(f"{self.name} needs the argument(s) {missing}")
        allowed = set(self.parameters.get("properties", {}))
        extra = [k for k in arguments if k not in allowed]
        if extra:
            raise ToolError(f"{self.name} takes {sorted(allowed)}, not {extra}")
        return self.fn(**arguments)


def calculator_tool() -> Tool:
    return Tool("calculator", "Evaluate an arithmetic expression exactly (+ - * / // % ** and parentheses).",
                {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 37 * 48"}},
                 "required": ["expression"]}, fn=lambda expression: calculate(expression))


def search_tool(index, k: int = 3) -> Tool:
    """Search over a PassageIndex (retrieval.py): the top k passages, each with its citation."""
    def search(query: str) -> str:
        hits = index.search(query, k=k)
        return "\n".join(f"[{i + 1}] {h.passage.citation()}" for i, h in enumerate(hits)) or "no passages found"

    return Tool("search", f"Search {index.name} for passages about a question; returns the top {k} with their "
                          f"source.", {"type": "object", "properties": {"query": {"type": "string"}},
                                       "required": ["query"]}, fn=search)


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""

    def text(self) -> str:
        """The call as the model writes it."""
        return f"{CALL_OPEN}{json.dumps({'name': self.name, 'arguments': self.arguments}, ensure_ascii=False)}{CALL_CLOSE}"


def parse_tool_call(text: str) -> Optional[ToolCall]:
    """The first `<tool_call>{...}</tool_call>` in a reply, or None when the reply calls no tool or
    the call is not JSON with a string "name" and an object "arguments" (then it is plain text)."""
    m = _CALL.search(text)
    if m is None:
        return None
    try:
        body = json.loads(m.group(1))
    except json.JSONDecodeError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return None
    args = body.get("arguments", {})
    if isinstance(args, str):  # OpenAI sends arguments as a JSON string; accept both
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(body["name"], args) if isinstance(args, dict) else None


def tools_system_prompt(tools: list, system: Optional[str] = None) -> str:
    """The system message that offers `tools` (Tool objects or OpenAI schemas), after `system`."""
    schemas = [t.schema() if isinstance(t, Tool) else t for t in tools]
    lines = [json.dumps(s.get("function", s), ensure_ascii=False, separators=(",", ":")) for s in schemas]
    head = (system + "\n\n") if system else ""
    return (f"{head}You can call tools. To call one, reply with only "
            f'{CALL_OPEN}{{"name": <tool name>, "arguments": <JSON object>}}{CALL_CLOSE}; the result comes back in '
            f"a tool message. Tools:\n" + "\n".join(lines))


def with_tools(messages: list, tools: list) -> list:
    """messages with the tools offered in the system message (merged into an existing one)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": tools_system_prompt(tools, messages[0]["content"])}] + list(messages[1:])
    return [{"role": "system", "content": tools_system_prompt(tools)}] + list(messages)


def run_tool(call: ToolCall, tools: dict) -> str:
    """The tool's result, or 'error: ...' (which the model reads like any result)."""
    if call.name not in tools:
        return f"error: there is no tool {call.name!r}; the tools are {', '.join(tools)}"
    try:
        return str(tools[call.name](call.arguments))
    except ToolError as e:
        return f"error: {e}"
    except TypeError as e:  # arguments of the wrong type for the function
        return f"error: bad arguments for {call.name}: {e}"


@dataclass
class ToolTurn:
    """The outcome of run_with_tools: the final reply and every call made on the way."""
    reply: str
    messages: list  # the whole conversation, tool calls and results included
    calls: list = field(default_factory=list)  # (ToolCall, result) pairs


def run_with_tools(respond: Callable[[list], str], messages: list, tools: list, max_calls: int = 3) -> ToolTurn:
    """Answer `messages` with tools: respond(messages) -> the model's next turn (its text, generated
    with CALL_STOP as a stop string or not). A turn that calls a tool gets the result back as a tool
    message and the model goes on; after max_calls calls the next turn is the reply whatever it says."""
    return run_with_tools_batch(lambda convos: [respond(c) for c in convos], [messages], tools, max_calls)[0]


def run_with_tools_batch(respond_many: Callable[[list], list], conversations: list, tools: list,
                         max_calls: int = 3) -> list:
    """run_with_tools for many conversations at once: respond_many(list of conversations) -> their
    next turns (one generated batch); each round, only the conversations still calling tools go on."""
    by_name = {t.name: t for t in tools}
    convos = [with_tools(m, tools) for m in conversations]
    calls = [[] for _ in convos]
    done = [None] * len(convos)
    active = list(range(len(convos)))
    while active:
        texts = respond_many([convos[i] for i in active])
        still = []
        for i, text in zip(active, texts):
            call = parse_tool_call(text) if len(calls[i]) < max_calls else None
            if call is None:
                done[i] = ToolTurn(text.strip(), convos[i] + [{"role": "assistant", "content": text.strip()}], calls[i])
                continue
            result = run_tool(call, by_name)
            calls[i].append((call, result))
            convos[i] = convos[i] + [{"role": "assistant", "content": call.text()}, {"role": "tool", "content": result}]
            still.append(i)
        active = still
    return done
