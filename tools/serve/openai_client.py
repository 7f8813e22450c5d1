#!/usr/bin/env python3
"""The official `openai` client against a running `petal serve` (SmolLM2, served as `smollm2`):
completions and chat, whole and streamed, `n`, `logprobs` with `echo`, chat `logprobs`, and the
error cases as the client's own exceptions. Exits non-zero with the failed check's message.

    python tools/serve/openai_client.py http://127.0.0.1:PORT/v1
"""
import sys

import openai

base = sys.argv[1]
c = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
M = "smollm2"
PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
checks = []


def check(name, ok, detail=""):
    checks.append(name)
    if not ok:
        sys.exit(f"openai client check failed: {name}: {detail}")


ids = [m.id for m in c.models.list().data]
check("models lists the base model", M in ids, ids)

r = c.completions.create(model=M, prompt=PROMPT, max_tokens=8, temperature=0)
text = r.choices[0].text
check("completion", text and r.usage.completion_tokens <= 8
      and r.choices[0].finish_reason in ("length", "stop") and r.object == "text_completion", r)
s = c.completions.create(model=M, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
check("streamed completion = whole one", "".join(ch.choices[0].text for ch in s if ch.choices) == text)

r = c.chat.completions.create(model=M, messages=QUESTION, max_tokens=16, temperature=0)
answer = r.choices[0].message.content
check("chat answers Paris", "Paris" in answer and r.choices[0].message.role == "assistant", answer)
s = c.chat.completions.create(model=M, messages=QUESTION, max_tokens=16, temperature=0, stream=True)
streamed = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
check("streamed chat = whole one", streamed == answer, (streamed, answer))

r = c.chat.completions.create(model=M, messages=QUESTION, max_tokens=4, temperature=0,
                              logprobs=True, top_logprobs=2)
lp = r.choices[0].logprobs.content
check("chat logprobs", len(lp) >= 1 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)
      and abs(lp[0].logprob - max(a.logprob for a in lp[0].top_logprobs)) < 1e-5, lp)

r = c.completions.create(model=M, prompt=PROMPT, n=3, max_tokens=6, temperature=1.0, seed=3)
check("n = 3 choices", [ch.index for ch in r.choices] == [0, 1, 2], r.choices)

r = c.completions.create(model=M, prompt=PROMPT, echo=True, logprobs=1, max_tokens=1, temperature=0)
lp = r.choices[0].logprobs
check("echo with logprobs", r.choices[0].text.startswith(PROMPT) and lp.token_logprobs[0] is None
      and all(v <= 0 for v in lp.token_logprobs[1:]) and len(lp.tokens) == len(lp.text_offset), lp)

for name, call, kind, word in [
    ("unknown model", lambda: c.completions.create(model="nope", prompt="x"), openai.NotFoundError, "nope"),
    ("temperature out of range", lambda: c.completions.create(model=M, prompt="x", temperature=3),
     openai.BadRequestError, "temperature"),
    ("empty messages", lambda: c.chat.completions.create(model=M, messages=[]), openai.BadRequestError,
     "messages"),
    ("n = 0", lambda: c.completions.create(model=M, prompt="x", n=0), openai.BadRequestError, "`n`"),
]:
    try:
        call()
        check(name, False, "no error")
    except kind as e:
        check(name, word in str(e), str(e))

print(f"{len(checks)} checks passed with openai {openai.__version__}")
