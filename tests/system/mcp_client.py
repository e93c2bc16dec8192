"""A client of the official MCP Python SDK (`mcp` on PyPI), driven by the system tests.

    mcp_client.py STEPS.json stdio COMMAND [ARG...]
    mcp_client.py STEPS.json http URL [TOKEN]

Connects with the SDK's own stdio or Streamable HTTP client, initializes, runs the steps and
prints one JSON document: what each step saw. A step is an object:

    {"op": "list_tools"}
    {"op": "call", "tool": NAME, "args": {...}, "progress": true, "timeout": SECONDS}
    {"op": "read", "uri": URI}
    {"op": "list_resources"}
    {"op": "subscribe", "uri": URI}
    {"op": "updates", "uri": URI, "timeout": SECONDS}   (waits for an update of URI)
    {"op": "read_all", "workspace": W, "process": P, "timeout": SECONDS}
        (read_process_output from offset 0, each read from the last one's next_offset, until
        the process has ended and all its output is read)
    {"op": "sleep", "secs": N}

A call with "timeout" is abandoned after it (the SDK then sends notifications/cancelled).
An error of the session or transport is reported as {"op": ..., "exception": TEXT}.
"""

import json
import sys

import anyio
import httpx2
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
import mcp_types as types


def dump(model):
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def describe(e):
    """An exception in words, with those an exception group holds (anyio wraps them)."""
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(describe(x) for x in e.exceptions)
    return f"{type(e).__name__}: {e}"


def resolve(value, out):
    """"$N.key" in a call's arguments: the structured content's `key` of step N's result
    (steps count from the initialize, 0)."""
    if isinstance(value, dict):
        return {k: resolve(v, out) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("$") and "." in value:
        n, key = value[1:].split(".", 1)
        return out[int(n)]["result"]["structuredContent"][key]
    return value


async def run_steps(read, write, steps):
    updates = []
    updated = anyio.Event()

    async def on_message(message):
        nonlocal updated
        root = getattr(message, "root", message)
        if isinstance(root, types.ResourceUpdatedNotification):
            updates.append(root.params.uri)
            updated.set()

    out = []
    async with ClientSession(read, write, message_handler=on_message) as session:
        init = await session.initialize()
        out.append({"op": "initialize", "result": dump(init)})
        for step in steps:
            op = step["op"]
            seen = {"op": op}
            try:
                if op == "list_tools":
                    seen["tools"] = [dump(t) for t in (await session.list_tools()).tools]
                elif op == "call":
                    progress = []

                    async def on_progress(p, total, message):
                        progress.append({"progress": p, "message": message})

                    r = await session.call_tool(
                        step["tool"],
                        resolve(step.get("args", {}), out),
                        read_timeout_seconds=step.get("timeout"),
                        progress_callback=on_progress if step.get("progress") else None,
                    )
                    seen["result"] = dump(r)
                    seen["progress"] = progress
                elif op == "read":
                    seen["result"] = dump(await session.read_resource(step["uri"]))
                elif op == "list_resources":
                    seen["result"] = dump(await session.list_resources())
                elif op == "subscribe":
                    await session.subscribe_resource(step["uri"])
                elif op == "updates":
                    with anyio.move_on_after(step.get("timeout", 30)):
                        while step["uri"] not in updates:
                            updated = anyio.Event()
                            await updated.wait()
                    seen["updates"] = list(updates)
                elif op == "read_all":
                    args = resolve({"workspace": step["workspace"], "process": step["process"]}, out)
                    text, offset, reads = "", 0, []
                    with anyio.fail_after(step.get("timeout", 60)):
                        while True:
                            r = await session.call_tool(
                                "read_process_output", {**args, "offset": offset, "wait_secs": 10}
                            )
                            got = r.structured_content
                            reads.append(got)
                            text += got["output"]
                            offset = got["next_offset"]
                            if got["ended"]:
                                break
                    seen["output"], seen["reads"] = text, reads
                elif op == "sleep":
                    await anyio.sleep(step["secs"])
            except Exception as e:  # what went wrong is the test's to judge
                seen["exception"] = describe(e)
            out.append(seen)
    return out


async def main():
    steps = json.load(open(sys.argv[1]))
    transport = sys.argv[2]
    if transport == "stdio":
        params = StdioServerParameters(command=sys.argv[3], args=sys.argv[4:])
        async with stdio_client(params) as (read, write):
            out = await run_steps(read, write, steps)
    else:
        url = sys.argv[3]
        headers = {"Authorization": f"Bearer {sys.argv[4]}"} if len(sys.argv) > 4 else {}
        timeout = httpx2.Timeout(30, read=300)
        async with httpx2.AsyncClient(headers=headers, timeout=timeout) as client:
            async with streamable_http_client(url, http_client=client) as (read, write):
                out = await run_steps(read, write, steps)
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        anyio.run(main)
    except BaseException as e:  # a refused connection ends here: say so as JSON
        if isinstance(e, SystemExit):
            raise
        print(json.dumps([{"op": "connect", "exception": describe(e)}]))
