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

# The legacy completions API: a raw prompt, no chat template, streamed and not.
prompt = "The capital of France is"
legacy = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
assert legacy.object == "text_completion", legacy
assert legacy.id.startswith("cmpl-"), legacy.id
assert legacy.choices[0].finish_reason in ("stop", "length"), legacy
assert legacy.usage.completion_tokens > 0, legacy.usage
legacy_text = legacy.choices[0].text
legacy_pieces, legacy_usage = [], None
for chunk in client.completions.create(
    model=model,
    prompt=prompt,
    max_tokens=12,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        legacy_usage = chunk.usage
    for choice in chunk.choices:
        legacy_pieces.append(choice.text)
assert "".join(legacy_pieces) == legacy_text, (legacy_pieces, legacy_text)
assert legacy_usage is not None and legacy_usage.total_tokens == legacy.usage.total_tokens, legacy_usage
# Default length: OpenAI's 16 tokens.
default = client.completions.create(model=model, prompt=prompt, temperature=0)
assert default.usage.completion_tokens <= 16, default.usage

try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

print(json.dumps({"models": ids, "text": text, "pieces": len(pieces), "finish": finish, "legacy": legacy_text}))
