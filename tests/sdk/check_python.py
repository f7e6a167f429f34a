"""The official OpenAI Python SDK against the gateway, unchanged: chat whole and
streamed (with usage), completions whole and streamed, embeddings, models listed and
retrieved, and a typed error for an unknown model."""
import base64
import os
import struct

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["GATEWAY"] + "/v1", api_key=os.environ.get("TOKEN", "unused"))
msg = lambda text: [{"role": "user", "content": text}]

answer = client.chat.completions.create(model="demo", messages=msg("hello python sdk"))
assert answer.choices[0].message.content == "hello python sdk", answer
assert answer.choices[0].finish_reason == "stop", answer

chunks = [
    event.choices[0].delta.content
    for event in client.chat.completions.create(model="demo", messages=msg("one two three"), stream=True)
    if event.choices and event.choices[0].delta.content
]
assert chunks == ["one", " two", " three"], chunks

assert answer.usage.prompt_tokens == 3 and answer.usage.completion_tokens == 3, answer.usage

events = list(
    client.chat.completions.create(
        model="demo", messages=msg("count these words"), stream=True, stream_options={"include_usage": True}
    )
)
assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == "count these words", events
assert events[-1].choices == [] and events[-1].usage.completion_tokens == 3, events[-1]
assert events[-1].usage.total_tokens == 6, events[-1]

# Completions: the prompt comes back, whole and streamed.
text = client.completions.create(model="demo", prompt="complete  me please")
assert text.object == "text_completion" and text.choices[0].text == "complete me please", text
assert text.usage.prompt_tokens == 3 and text.usage.completion_tokens == 3, text.usage
pieces = [
    c.choices[0].text
    for c in client.completions.create(
        model="demo", prompt="a streamed prompt", stream=True, stream_options={"include_usage": True}
    )
    if c.choices
]
assert "".join(pieces) == "a streamed prompt", pieces
assert pieces[:3] == ["a", " streamed", " prompt"], pieces

# Embeddings: 8 numbers per input, the same for the same text. The SDK asks for base64
# by default and decodes it; floats are asked for explicitly.
vectors = client.embeddings.create(model="demo", input=["hello", "world", "hello"])
assert [d.index for d in vectors.data] == [0, 1, 2], vectors
assert all(len(d.embedding) == 8 for d in vectors.data), vectors
assert vectors.data[0].embedding == vectors.data[2].embedding != vectors.data[1].embedding
assert abs(sum(x * x for x in vectors.data[0].embedding) - 1) < 1e-5, vectors.data[0]
assert vectors.usage.prompt_tokens == 3, vectors.usage
floats = client.embeddings.create(model="demo", input="hello", encoding_format="float")
assert len(floats.data[0].embedding) == 8, floats
assert all(abs(a - b) < 1e-6 for a, b in zip(floats.data[0].embedding, vectors.data[0].embedding))
raw = client.embeddings.with_raw_response.create(model="demo", input="hello", encoding_format="base64")
packed = raw.http_response.json()["data"][0]["embedding"]
unpacked = struct.unpack("<8f", base64.b64decode(packed))
assert all(abs(a - b) < 1e-6 for a, b in zip(unpacked, floats.data[0].embedding)), (unpacked, floats)

slashed = "meta-llama/Llama-3.1-8B-Instruct"
assert [m.id for m in client.models.list().data] == ["demo", slashed]
model = client.models.retrieve("demo")
assert model.id == "demo" and model.object == "model", model
assert client.models.retrieve(slashed).id == slashed

# A name with '/' (a vLLM model id) on every endpoint.
answer = client.chat.completions.create(model=slashed, messages=msg("slashed name"))
assert answer.choices[0].message.content == "slashed name", answer
assert client.completions.create(model=slashed, prompt="p").choices[0].text == "p"
assert len(client.embeddings.create(model=slashed, input="e").data[0].embedding) == 8
try:
    client.models.retrieve("nope")
    raise AssertionError("an unknown model must not be retrieved")
except openai.NotFoundError as e:
    assert e.status_code == 404, e

try:
    client.chat.completions.create(model="nope", messages=msg("x"))
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as e:
    assert e.status_code == 404 and "nope" in str(e), e

print("python openai sdk: chat, completions, embeddings, models and errors ok")
