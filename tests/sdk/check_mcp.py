"""The official Python MCP SDK against the reference gateway's /mcp: an echo publisher
publishes the LLM `demo` and the agent `poet` over it; the client lists the tools,
calls `agent-poet`, and is told when the tool list changes (a register adds an agent)
and sees the new tool. Needs GATEWAY (and TOKEN, if the gateway has tokens).

The SDK logs "Session termination failed: 202" when it closes: the Rust SDK answers
the session's DELETE with 202 Accepted, where this one looks for 200 or 204. The
session is closed either way."""

import json
import os
import urllib.request

import anyio
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

GATEWAY = os.environ["GATEWAY"]
TOKEN = os.environ.get("TOKEN", "anything")
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
# Each run adds an agent of its own (the registry keeps an earlier run's).
RUN = os.environ.get("RUN", "1")
CRITIC = f"critic-{RUN}"


def register_critic() -> None:
    """Publishes an LLM and the agent CRITIC over it, as a publisher registers."""
    body = json.dumps(
        {
            "protocolVersion": 2,
            "llms": [{"name": f"extra-{RUN}", "type": "openai", "model": "m"}],
            "agents": [{"name": CRITIC, "llm": f"extra-{RUN}", "description": "Finds fault"}],
        }
    ).encode()
    request = urllib.request.Request(
        f"{GATEWAY}/api/v1/llms/_provider-register",
        data=body,
        headers={**HEADERS, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request) as answer:
        assert answer.status == 200, answer.status


async def main() -> None:
    changed = anyio.Event()

    async def on_message(message) -> None:
        method = getattr(message, "method", None) or getattr(getattr(message, "root", None), "method", None)
        if method == "notifications/tools/list_changed":
            changed.set()

    async with httpx2.AsyncClient(headers=HEADERS, timeout=httpx2.Timeout(30, read=300)) as http:
        async with streamable_http_client(f"{GATEWAY}/mcp", http_client=http) as (read, write):
            async with ClientSession(read, write, message_handler=on_message) as session:
                await session.initialize()
                tools = (await session.list_tools()).tools
                names = sorted(t.name for t in tools)
                assert "agent-poet" in names and f"agent-{CRITIC}" not in names, names
                poet = next(t for t in tools if t.name == "agent-poet")
                assert poet.description == "Answers in verse", poet.description
                assert poet.input_schema["required"] == ["message"], poet.input_schema

                result = await session.call_tool("agent-poet", {"message": "roses are red"})
                assert not result.is_error, result
                texts = [c.text for c in result.content if c.type == "text"]
                assert texts == ["roses are red"], texts

                # The tool list follows the registry, and the client is told.
                register_critic()
                with anyio.fail_after(10):
                    await changed.wait()
                names = sorted(t.name for t in (await session.list_tools()).tools)
                assert "agent-poet" in names and f"agent-{CRITIC}" in names, names

                try:
                    await session.call_tool("agent-nobody", {"message": "x"})
                except MCPError as e:
                    assert "agent-nobody" in str(e), e
                else:
                    raise AssertionError("an unknown tool is an error")
    print("python mcp sdk: tools listed, agent called, list change told")


anyio.run(main)
