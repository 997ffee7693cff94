"""Agent templates: write tool definitions, tool calls and tool results as plain message text.

`agent_template` (or a row with tools under a chat template that cannot render them) rewrites a
conversation so that any chat template can render it: tools go into the system turn, an assistant's
`tool_calls` are appended to its content (so they are trained on), tool results become user turns
(never trained on). Formats: `hermes` (Qwen/Hermes `<tool_call>` JSON) and `react_en` (ReAct).
"""

from __future__ import annotations

import json
from typing import Any

from surogate.errors import UserError

AGENT_TEMPLATES = ("hermes", "react_en")


def _fn(call: dict) -> tuple[str, str]:
    fn = call.get("function", call)
    args = fn.get("arguments", fn.get("parameters", {}))
    return str(fn.get("name", "")), args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _tool_name(tool: dict) -> str:
    return str(tool.get("function", tool).get("name", ""))


def _hermes_system(tools: list[dict]) -> str:
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{lines}\n</tools>\n\nFor each function call, return a json object with function name and "
            "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _react_system(tools: list[dict]) -> str:
    described = "\n".join(f"{_tool_name(t)}: {json.dumps(t.get('function', t), ensure_ascii=False)}" for t in tools)
    names = ", ".join(_tool_name(t) for t in tools)
    return ("Answer the following questions as best you can. You have access to the following tools:\n\n"
            f"{described}\n\nUse the following format:\n\nThought: think about what to do\n"
            f"Action: the action to take, one of [{names}]\nAction Input: the input to the action\n"
            "Observation: the result of the action\n... (Thought/Action/Action Input/Observation can repeat)\n"
            "Final Answer: the final answer")


def apply_agent_template(name: str, messages: list[dict[str, Any]], tools: list[dict] | None) -> list[dict[str, Any]]:
    """Return `messages` rewritten by agent template `name` (tools folded in; no `tool` role remains)."""
    if name not in AGENT_TEMPLATES:
        raise UserError(f"agent_template: unknown agent template {name!r}; choose one of {', '.join(AGENT_TEMPLATES)}")
    out: list[dict[str, Any]] = []
    if tools:
        text = _hermes_system(tools) if name == "hermes" else _react_system(tools)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + text})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": text})
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [_fn(c) for c in message["tool_calls"]]
            if name == "hermes":
                content += "".join(f'\n<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>' for n, a in calls)
            else:
                content += "".join(f"\nAction: {n}\nAction Input: {a}" for n, a in calls)
            out.append({"role": "assistant", "content": content.lstrip("\n")})
        elif role == "tool":
            body = f"<tool_response>\n{content}\n</tool_response>" if name == "hermes" else f"Observation: {content}"
            out.append({"role": "user", "content": body})
        else:
            out.append({"role": role, "content": content})
    return out
