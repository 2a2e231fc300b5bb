"""Drives `multilora serve` with the official OpenAI Python client.

Usage: openai_client.py BASE_URL API_KEY BASE_MODEL ADAPTER
Exits non-zero with a message on the first check that fails.
"""
import sys

import openai

base_url, api_key, base_model, adapter = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)


def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")


# /v1/models: the base model and the adapter, with vLLM's parent/root.
models = {m.id: m for m in client.models.list().data}
check(base_model in models and adapter in models, f"models listed: {sorted(models)}")
check(getattr(models[adapter], "parent", None) == base_model, "adapter parent is the base model")
check(client.models.retrieve(adapter).id == adapter, "models.retrieve(adapter)")
try:
    client.models.retrieve("no-such-model")
    check(False, "retrieving an unknown model succeeded")
except openai.NotFoundError as e:
    check(e.status_code == 404, "unknown model retrieve is 404")

# Completion with vLLM's extra sampling fields.
c = client.completions.create(
    model=adapter, prompt="Hello, my name is", max_tokens=6, temperature=0,
    extra_body={"ignore_eos": True, "min_tokens": 6, "top_k": 5},
)
check(c.usage.completion_tokens == 6, f"completion tokens: {c.usage}")
check(c.choices[0].finish_reason == "length", f"finish reason {c.choices[0].finish_reason}")
check(isinstance(c.choices[0].text, str), "completion text")

# Chat completion through the model's chat template.
r = client.chat.completions.create(
    model=base_model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4,
    extra_body={"ignore_eos": True},
)
check(r.choices[0].message.role == "assistant", "chat role")
check(r.usage.completion_tokens == 4, f"chat usage {r.usage}")

# Streams, with usage at the end.
for kind in ("completion", "chat"):
    if kind == "completion":
        stream = client.completions.create(
            model=adapter, prompt="Once upon a time", max_tokens=8, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    else:
        stream = client.chat.completions.create(
            model=adapter, messages=[{"role": "user", "content": "Tell a story"}], max_tokens=8,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    chunks = list(stream)
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8,
          f"{kind} stream usage: {chunks[-1]}")
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    check(finishes == ["length"], f"{kind} stream finish reasons {finishes}")

# vLLM's stop_reason (the matched stop string) and continuous usage stats.
full = client.completions.create(
    model=base_model, prompt="The", max_tokens=10, temperature=0, extra_body={"ignore_eos": True},
).choices[0].text
stop = full.strip()[:2]
if len(stop) == 2 and "\ufffd" not in stop:
    c = client.completions.create(
        model=base_model, prompt="The", max_tokens=10, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True},
    )
    check(getattr(c.choices[0], "stop_reason", None) == stop, f"stop_reason {c.choices[0]}")
chunks = list(client.chat.completions.create(
    model=adapter, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True,
    stream_options={"include_usage": True}, extra_body={"ignore_eos": True,
    "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
))
check(all(c.usage is not None for c in chunks), "continuous usage on every chunk")

# Errors surface as the client's typed exceptions.
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    check(False, "unknown model accepted")
except openai.NotFoundError as e:
    check(e.status_code == 404, "unknown model is 404")
try:
    client.completions.create(model=base_model, prompt=[5] * 5000, max_tokens=1)
    check(False, "over-long prompt accepted")
except openai.BadRequestError as e:
    check(e.code == "context_length_exceeded", f"over-long prompt code {e.code}")
try:
    client.completions.create(model=base_model, prompt="x", temperature=-2)
    check(False, "negative temperature accepted")
except openai.BadRequestError as e:
    check(e.param == "temperature", f"bad temperature param {e.param}")
# vLLM's structured-output fields are refused by name, never silently ignored.
try:
    client.chat.completions.create(
        model=adapter, messages=[{"role": "user", "content": "yes or no?"}], max_tokens=4,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    check(False, "guided_choice accepted")
except openai.BadRequestError as e:
    check(e.param == "guided_choice", f"guided_choice refusal param {e.param}")
try:
    client.completions.create(model=base_model, prompt="x", max_tokens=1, logprobs=0)
    check(False, "logprobs=0 accepted")
except openai.BadRequestError as e:
    check(e.param == "logprobs", f"logprobs refusal param {e.param}")
try:
    bad = openai.OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0)
    bad.models.list()
    check(False, "wrong key accepted")
except openai.AuthenticationError as e:
    check(e.status_code == 401, "wrong key is 401")

print("OK")
