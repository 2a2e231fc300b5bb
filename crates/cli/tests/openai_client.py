"""Drives `multilora serve` with the official OpenAI Python client.

Usage: openai_client.py BASE_URL API_KEY BASE_MODEL ADAPTER GOLDEN_LOGLIKELIHOOD_JSON
ADAPTER serves the demo adapter demo-r8-000; the JSON holds transformers' loglikelihoods of
context/continuation pairs on the demo model (scripts/make_golden_logprobs.py).
Exits non-zero with a message on the first check that fails.
"""
import json
import sys

import openai

base_url, api_key, base_model, adapter, golden_path = sys.argv[1:6]
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
# vLLM's structured outputs: the answer is one of the choices; a bad regex is refused by name.
c = client.chat.completions.create(
    model=adapter, messages=[{"role": "user", "content": "yes or no?"}], max_tokens=8,
    temperature=1.0, seed=1, extra_body={"guided_choice": ["yes", "no"]},
)
check(c.choices[0].message.content in ("yes", "no"), f"guided_choice answer {c.choices[0].message.content!r}")
check(c.choices[0].finish_reason == "stop", f"guided_choice finish {c.choices[0].finish_reason}")
try:
    client.completions.create(model=base_model, prompt="x", max_tokens=4, extra_body={"guided_regex": "[a-z"})
    check(False, "a broken guided_regex accepted")
except openai.BadRequestError as e:
    check(e.param == "guided_regex", f"guided_regex refusal param {e.param}")
try:
    client.completions.create(model=base_model, prompt="x", max_tokens=1, logprobs=21)
    check(False, "logprobs=21 accepted")
except openai.BadRequestError as e:
    check(e.param == "logprobs", f"logprobs refusal param {e.param}")

# Loglikelihood as lm-evaluation-harness computes it (local-completions): context +
# continuation token ids as the prompt, echo, logprobs=1, max_tokens=1; the sum of
# token_logprobs[ctxlen:-1] and whether each was the top token, against transformers.
with open(golden_path) as f:
    pairs = json.load(f)["pairs"]
for p in pairs:
    model = adapter if p["lora"] == "demo-r8-000" else base_model
    ctx, cont = p["context_ids"], p["continuation_ids"]
    c = client.completions.create(
        model=model, prompt=[ctx + cont], max_tokens=1, temperature=0, logprobs=1, echo=True,
    )
    lp = c.choices[0].logprobs
    n = len(ctx)
    check(len(lp.tokens) == n + len(cont) + 1, f"echoed tokens: {len(lp.tokens)}")
    check(lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, "first prompt token has none")
    got = sum(lp.token_logprobs[n:-1])
    check(abs(got - p["loglikelihood"]) < 1e-4,
          f"loglikelihood of {p['continuation']!r} ({p['lora']}): {got} vs transformers {p['loglikelihood']}")
    greedy = all(t == max(top.values()) for t, top in zip(lp.token_logprobs[n:-1], lp.top_logprobs[n:-1]))
    check(greedy == p["is_greedy"], f"is_greedy {greedy} vs {p['is_greedy']}")
    check(lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0, "text offsets")
# With --batch_size > 1 it sends a model's pairs as a list of prompts in one request and reads
# the choices sorted by index: the same numbers.
for model in (adapter, base_model):
    batch = [p for p in pairs if (adapter if p["lora"] == "demo-r8-000" else base_model) == model]
    if not batch:
        continue
    c = client.completions.create(
        model=model, prompt=[p["context_ids"] + p["continuation_ids"] for p in batch], max_tokens=1,
        temperature=0, logprobs=1, echo=True,
    )
    choices = sorted(c.choices, key=lambda ch: ch.index)
    check([ch.index for ch in choices] == list(range(len(batch))), f"batch indices {[ch.index for ch in c.choices]}")
    for ch, p in zip(choices, batch):
        n = len(p["context_ids"])
        got = sum(ch.logprobs.token_logprobs[n:-1])
        check(abs(got - p["loglikelihood"]) < 1e-4,
              f"batched loglikelihood of {p['continuation']!r}: {got} vs transformers {p['loglikelihood']}")

# logprobs=0 still gives each token's own logprob; chat gives top_logprobs alternatives.
c = client.completions.create(model=base_model, prompt="Hi", max_tokens=3, logprobs=0,
                              extra_body={"ignore_eos": True})
lp = c.choices[0].logprobs
check(len(lp.token_logprobs) == 3 and all(x is not None and x <= 0 for x in lp.token_logprobs),
      f"logprobs=0: {lp.token_logprobs}")
r = client.chat.completions.create(
    model=adapter, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=True,
    top_logprobs=2, extra_body={"ignore_eos": True},
)
content = r.choices[0].logprobs.content
check(len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content), f"chat logprobs {content}")
check(all(t.top_logprobs[0].logprob >= t.logprob for t in content), "the top alternative is the most likely")
try:
    bad = openai.OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0)
    bad.models.list()
    check(False, "wrong key accepted")
except openai.AuthenticationError as e:
    check(e.status_code == 401, "wrong key is 401")

print("OK")
