"""The official OpenAI Python SDK against `client proxy` (driven by tests/tests/openai_sdk.rs).

Usage: openai_sdk.py BASE_URL MODEL
Prints one JSON object with what it saw; exits non-zero on any failed check.
"""

import json
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="not-needed-locally", max_retries=0)

ids = [m.id for m in client.models.list()]
assert ids == [model], ids

messages = [{"role": "user", "content": "Name three primary colours."}]
whole = client.chat.completions.create(
    model=model, messages=messages, max_tokens=16, temperature=0
)
assert whole.object == "chat.completion", whole
assert whole.choices[0].finish_reason in ("stop", "length"), whole
assert whole.usage.completion_tokens > 0, whole.usage
text = whole.choices[0].message.content

stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=16,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
streamed = "".join(pieces)
assert streamed == text, (streamed, text)
assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage
assert finish == whole.choices[0].finish_reason, finish
assert len(pieces) > 1, pieces

try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

print(json.dumps({"models": ids, "text": text, "pieces": len(pieces), "finish": finish}))
