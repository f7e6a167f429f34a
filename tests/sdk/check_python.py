"""The official OpenAI Python SDK against the gateway, unchanged: whole, streamed,
models, and a typed error for an unknown model."""
import os

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

assert [m.id for m in client.models.list().data] == ["demo"]

try:
    client.chat.completions.create(model="nope", messages=msg("x"))
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as e:
    assert e.status_code == 404 and "nope" in str(e), e

print("python openai sdk: whole, streamed, models and errors ok")
