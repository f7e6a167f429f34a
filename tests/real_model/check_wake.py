"""Wake-on-demand and readiness with a real model, through the gateway, with the official
OpenAI Python SDK unchanged (SPEC §12). run.sh drives it:

    check_wake.py request --stream|--whole --record FILE
        one request for a hibernating LLM: the gateway sends the publisher `wake`, its
        recipe starts llama.cpp, its probe finds it ready, and the request is served.
        Checks the answer and appends what it measured to FILE (one JSON line).
    check_wake.py figures --label L --record FILE --publisher-log F --llama-log F
        pairs the k-th request of FILE with the k-th wake in the publisher's log
        (`the gateway asks to wake it` → `awake`) and the k-th start in llama.cpp's log
        (`ready after X s`), checks there was exactly one wake and one start per request,
        and prints `-- wake (L) k, stream: first token after X s, recipe Y s, model ready
        after Z s (...)`: X the client's request to its first streamed token (or to the
        whole answer), Y the publisher's wake from the wake frame to the probe that found
        llama.cpp ready (the recipe itself returns at once; the probe runs every second),
        Z serve_model.py's own start to its /v1/models answering.
    check_wake.py together --armed-file F --started-file F --publisher-log F --llama-log F
        makes its client, writes --armed-file, and polls /v1/models every 20 ms; run.sh
        then starts llama.cpp and the publisher at the same moment, and writes that moment
        (epoch seconds) into --started-file. As soon as the LLM is listed it calls it,
        whole then streamed, and must be answered (a relayed "Loading model" 503 fails).
        Checks from the publisher's log that the LLM was registered not ready (else this
        proves nothing), and prints when llama.cpp was ready and when the LLM was listed.

Env: GATEWAY (the gateway's base URL), LLM (the published name).
"""
import argparse
import datetime
import json
import os
import re
import sys
import time

llm = os.environ["LLM"]
messages = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]
params = dict(model=llm, messages=messages, max_tokens=24, temperature=0)


def sdk():
    """The OpenAI client; imported only where needed (`figures` reads logs, and
    importing the SDK takes most of a second)."""
    from openai import OpenAI

    return OpenAI(
        base_url=os.environ["GATEWAY"] + "/v1",
        api_key=os.environ.get("TOKEN", "unused"),
        timeout=180,  # a wake: llama.cpp starts and loads, then the model answers
        max_retries=0,  # a failure must show, not be retried away
    )


def whole(client) -> dict:
    sent_at = time.time()
    started = time.monotonic()
    answer = client.chat.completions.create(**params)
    total = time.monotonic() - started
    text = answer.choices[0].message.content or ""
    assert text.strip(), f"empty answer: {answer}"
    assert answer.choices[0].finish_reason in ("stop", "length"), answer
    if answer.usage is not None:
        assert 0 < answer.usage.completion_tokens <= params["max_tokens"], answer.usage
    return {"kind": "whole", "sent_at": sent_at, "total_s": total, "text": text}


def streamed(client) -> dict:
    sent_at = time.time()
    started = time.monotonic()
    arrivals = []  # (seconds since the request, content)
    for event in client.chat.completions.create(**params, stream=True):
        now = time.monotonic() - started
        if event.choices and event.choices[0].delta.content:
            arrivals.append((now, event.choices[0].delta.content))
    ended = time.monotonic() - started
    text = "".join(content for _, content in arrivals)
    assert text.strip(), "the stream carried no text"
    assert len(arrivals) >= 2, f"want at least 2 content chunks, got {len(arrivals)}: {arrivals}"
    first = arrivals[0][0]
    assert first < ended and ended - first >= 0.005, (
        f"the first content chunk came {first:.4f}s in and the stream ended at {ended:.4f}s: "
        f"not streamed as produced"
    )
    return {"kind": "stream", "sent_at": sent_at, "first_token_s": first, "total_s": ended,
            "chunks": len(arrivals), "text": text}


def describe(r: dict) -> str:
    if r["kind"] == "stream":
        return (f"streamed {r['chunks']} chunks, first after {r['first_token_s']:.2f}s, "
                f"end after {r['total_s']:.2f}s {r['text']!r}")
    return f"whole in {r['total_s']:.2f}s {r['text']!r}"


def log_time(line: str) -> float:
    """The timestamp opening a tracing log line, as epoch seconds."""
    stamp = line.split(None, 1)[0]
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def publisher_lines(path: str) -> list:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [strip_ansi(line.rstrip("\n")) for line in f]


def names(line: str, name: str) -> bool:
    return re.search(rf"\bllm={re.escape(name)}(\s|$)", line) is not None


def ready_times(path: str) -> list:
    """Each start's `ready after X s` in serve_model.py's log."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [float(m.group(1)) for m in re.finditer(r"ready after ([0-9.]+) s", f.read())]


def request(args) -> None:
    client = sdk()
    result = streamed(client) if args.stream else whole(client)
    print(f"{llm} through a wake: {describe(result)}")
    with open(args.record, "a") as f:
        f.write(json.dumps(result) + "\n")


def figures(args) -> None:
    with open(args.record) as f:
        requests = [json.loads(line) for line in f if line.strip()]
    lines = [l for l in publisher_lines(args.publisher_log) if names(l, llm)]
    asked = [log_time(l) for l in lines if "the gateway asks to wake it" in l]
    awake = [log_time(l) for l in lines if re.search(r"readiness: awake\b", l)]
    failed = [l for l in lines if "wake failed" in l]
    assert not failed, f"a wake failed: {failed}"
    ready = ready_times(args.llama_log)
    counts = (len(requests), len(asked), len(awake), len(ready))
    assert len(set(counts)) == 1, (
        f"want one wake and one llama.cpp start per request; requests, wake frames, "
        f"awake, starts: {counts}"
    )
    for k, (r, a, b, z) in enumerate(zip(requests, asked, awake, ready), 1):
        # The client's clock and the publisher's log are the same machine's wall clock.
        if r["kind"] == "stream":
            seen, until = "first token", r["first_token_s"]
        else:
            seen, until = "answer", r["total_s"]
        print(f"-- wake ({args.label}) {k}, {r['kind']}: {seen} after {until:.2f} s, "
              f"recipe {b - a:.2f} s, model ready after {z:.2f} s (request to wake frame "
              f"{a - r['sent_at']:.3f} s, ready to {seen} {r['sent_at'] + until - b:.2f} s)")


def together(args) -> None:
    client = sdk()
    # Armed: run.sh starts llama.cpp and the publisher now, and writes when into
    # --started-file; the SDK is imported and the client made before that.
    with open(args.armed_file, "w"):
        pass
    deadline = time.monotonic() + 120
    polls = 0
    while llm not in [m.id for m in client.models.list().data]:
        assert time.monotonic() < deadline, f"{llm} not listed in /v1/models within 120 s"
        polls += 1
        time.sleep(0.02)
    listed_at = time.time()
    assert polls > 0, f"{llm} was listed at the first look: this did not call as soon as it was"
    # At once, as a client that saw it listed would.
    first = whole(client)
    second = streamed(client)
    # The check means something only if the row was registered while llama.cpp could not
    # answer yet: then it was the probe that listed it.
    states = [m.group(1) for l in publisher_lines(args.publisher_log) if names(l, llm)
              for m in [re.search(r'upstream state(?: changed)? llm=\S+ state="(\w+)"', l)] if m]
    assert states and states[0] != "ready", (
        f"{llm} was registered ready: llama.cpp answered before the publisher first probed "
        f"it, so this run did not test readiness (states logged: {states})"
    )
    assert states[-1] == "ready", states
    ready = ready_times(args.llama_log)
    assert len(ready) == 1, f"want one llama.cpp start, its log says {ready}"
    with open(args.started_file) as f:
        listed = listed_at - float(f.read().strip().replace(",", "."))
    print(f"{llm}: started together with llama.cpp; registered {states[0]}; llama.cpp ready "
          f"after {ready[0]:.2f}s, the LLM listed after {listed:.2f}s ({polls} looks before) and "
          f"answered at once: "
          f"{describe(first)}; {describe(second)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("request")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--stream", action="store_true")
    how.add_argument("--whole", action="store_true")
    p.add_argument("--record", required=True)
    p = sub.add_parser("figures")
    for flag in ("--label", "--record", "--publisher-log", "--llama-log"):
        p.add_argument(flag, required=True)
    p = sub.add_parser("together")
    for flag in ("--armed-file", "--started-file", "--publisher-log", "--llama-log"):
        p.add_argument(flag, required=True)
    args = parser.parse_args()
    {"request": request, "figures": figures, "together": together}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
