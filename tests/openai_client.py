"""The official `openai` package against `moelab serve`, unchanged: list models, chat whole and
streamed (reading `reasoning_content`), a completion, and errors mapped to the package's
exception types. Prints one JSON object for tests/serve.rs to check.

usage: python tests/openai_client.py BASE_URL QUESTION [API_KEY]
"""
import json
import sys

import openai
from openai import OpenAI

base, question = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else "unused"
client = OpenAI(base_url=base, api_key=key, max_retries=0)

models = [m.id for m in client.models.list()]
model = models[0]
msgs = [{"role": "user", "content": question}]

whole = client.chat.completions.create(model=model, messages=msgs, max_tokens=200)
msg = whole.choices[0].message

stream = client.chat.completions.create(
    model=model, messages=msgs, max_tokens=200, stream=True, stream_options={"include_usage": True}
)
reasoning, content, finish, usage, chunks = "", "", None, None, 0
for chunk in stream:
    chunks += 1
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    if not chunk.choices:
        continue
    delta = chunk.choices[0].delta
    reasoning += getattr(delta, "reasoning_content", None) or ""
    content += delta.content or ""
    finish = chunk.choices[0].finish_reason or finish

completion = client.completions.create(model=model, prompt="12 + 34", max_tokens=8)

errors = {}
try:
    client.chat.completions.create(model=model, messages=msgs, max_tokens=-1)
except openai.BadRequestError as e:
    errors["bad_request"] = e.status_code
try:
    OpenAI(base_url=base, api_key="ml-wrong", max_retries=0).models.list()
except openai.AuthenticationError as e:
    errors["auth"] = e.status_code

print(json.dumps({
    "models": models,
    "whole": {
        "content": msg.content,
        "reasoning_content": getattr(msg, "reasoning_content", None),
        "finish_reason": whole.choices[0].finish_reason,
        "usage": whole.usage.model_dump(),
    },
    "stream": {"content": content, "reasoning_content": reasoning, "finish_reason": finish,
               "usage": usage, "chunks": chunks},
    "completion": {"text": completion.choices[0].text,
                   "completion_tokens": completion.usage.completion_tokens},
    "errors": errors,
    "openai_version": openai.__version__,
}))
