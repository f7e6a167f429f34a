"""A real model end to end, with the official OpenAI Python SDK unchanged:
client -> gateway -> publisher -> llama.cpp (SmolLM2-135M), whole and streamed.

Env: GATEWAY (the gateway's base URL), LLM (the published name).
"""
import os
import time

from openai import OpenAI

llm = os.environ["LLM"]
client = OpenAI(
    base_url=os.environ["GATEWAY"] + "/v1",
    api_key=os.environ.get("TOKEN", "unused"),
    timeout=120,
    max_retries=0,  # a failure must show, not be retried away
)
messages = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]
params = dict(model=llm, messages=messages, max_tokens=24, temperature=0)

assert llm in [m.id for m in client.models.list().data], f"{llm} is not an active model"

# Whole.
started = time.monotonic()
answer = client.chat.completions.create(**params)
whole_s = time.monotonic() - started
text = answer.choices[0].message.content or ""
assert text.strip(), f"empty answer: {answer}"
assert answer.choices[0].finish_reason in ("stop", "length"), answer
# The client's request reaches llama.cpp as sent: max_tokens holds.
if answer.usage is not None:
    assert 0 < answer.usage.completion_tokens <= params["max_tokens"], answer.usage

# Streamed: every content chunk and the end of the stream are timestamped on arrival.
started = time.monotonic()
arrivals = []  # (seconds since the request, content)
for event in client.chat.completions.create(**params, stream=True):
    now = time.monotonic() - started
    if event.choices and event.choices[0].delta.content:
        arrivals.append((now, event.choices[0].delta.content))
ended = time.monotonic() - started
streamed = "".join(content for _, content in arrivals)
assert streamed.strip(), "the stream carried no text"
assert len(arrivals) >= 2, f"want at least 2 content chunks, got {len(arrivals)}: {arrivals}"
first = arrivals[0][0]
spread = arrivals[-1][0] - first
# A relay that buffered the answer would hand every chunk over at once, at the end.
assert first < ended and ended - first >= 0.005, (
    f"the first content chunk came {first:.4f}s in and the stream ended at {ended:.4f}s: "
    f"not streamed as produced"
)
assert spread > 0, f"all {len(arrivals)} content chunks arrived at the same instant"

print(
    f"{llm}: whole {len(text)} chars in {whole_s:.2f}s {text!r}; streamed {len(arrivals)} "
    f"chunks, first after {first * 1000:.0f} ms, last after {arrivals[-1][0] * 1000:.0f} ms, "
    f"end after {ended * 1000:.0f} ms {streamed!r}"
)
