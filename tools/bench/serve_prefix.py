#!/usr/bin/env python3
"""What prefix caching saves: `petal serve` on SmolLM2 with `--prefix-cache-mb` on and off (0),
in one invocation, on two workloads sent one request at a time:

- few-shot: one long shared prefix (worked examples) and a different question each request;
- chat: a conversation of several turns, each request carrying the earlier turns and answers
  behind a long system prompt.

Prints, per setting and workload, the median seconds a request takes (greedy, --tokens new
tokens), the prompt tokens and the cached ones (`usage.prompt_tokens_details.cached_tokens`),
and the ratio off / on. Loopback only; bounded (--requests per workload).

    python3 tools/bench/serve_prefix.py target/release/petal [--requests 6] [--tokens 8]
"""
import argparse, json, socket, statistics, time

from serve import PORT, start

EXAMPLES = [("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7. #### 7"),
            ("A box holds 12 pens. How many pens are in 5 boxes?", "12 * 5 = 60. #### 60"),
            ("Sara reads 15 pages a day. How many pages does she read in a week?", "15 * 7 = 105. #### 105"),
            ("A train goes 60 km an hour. How far does it go in 3 hours?", "60 * 3 = 180. #### 180"),
            ("Ben had 40 marbles and gave away 17. How many are left?", "40 - 17 = 23. #### 23"),
            ("Each of 8 tables seats 6 people. How many people can sit?", "8 * 6 = 48. #### 48")]
QUESTIONS = [f"A shop sells {a} cakes a day for {b} days. How many cakes does it sell?"
             for a, b in [(7, 3), (12, 4), (9, 9), (25, 2), (31, 3), (14, 6), (8, 11), (16, 5)]]
SYSTEM = ("You are a careful assistant for a bakery. " +
          " ".join(f"Rule {i}: answer in one short sentence, name the item, and never invent prices."
                   for i in range(1, 25)))


def post(path, body):
    s = socket.create_connection(("127.0.0.1", PORT))
    s.settimeout(600)
    b = json.dumps(body)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
              f"Content-Length: {len(b)}\r\n\r\n{b}".encode())
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"{path}: {data[:300]!r}")
    return json.loads(body)


def few_shot(n, tokens):
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in EXAMPLES * 2)
    for q in QUESTIONS[:n]:
        t0 = time.time()
        r = post("/v1/completions", {"prompt": f"{shots}Question: {q}\nAnswer:",
                                     "max_tokens": tokens, "temperature": 0})
        yield time.time() - t0, r["usage"]


def chat(n, tokens):
    messages = [{"role": "system", "content": SYSTEM}]
    for q in QUESTIONS[:n]:
        messages.append({"role": "user", "content": q})
        t0 = time.time()
        r = post("/v1/chat/completions", {"messages": messages, "max_tokens": tokens,
                                          "temperature": 0})
        yield time.time() - t0, r["usage"]
        messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("petal")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=8)
    a = ap.parse_args()
    rows = {}
    for mb in ["0", "1024"]:
        p = start(a.petal, ["--prefix-cache-mb", mb])
        try:
            for name, work in [("few-shot", few_shot), ("chat", chat)]:
                got = list(work(a.requests, a.tokens))
                # the first request of each finds nothing cached: the median is over the rest
                secs = [s for s, _ in got[1:]]
                row = {"prefix_cache_mb": int(mb), "workload": name, "requests": len(got),
                       "median_s": round(statistics.median(secs), 3),
                       "first_s": round(got[0][0], 3),
                       "prompt_tokens": [u["prompt_tokens"] for _, u in got],
                       "cached_tokens": [u.get("prompt_tokens_details", {}).get("cached_tokens")
                                         for _, u in got]}
                rows[(mb, name)] = row
                print(json.dumps(row), flush=True)
        finally:
            p.terminate()
            p.wait()
    for name in ["few-shot", "chat"]:
        off, on = rows[("0", name)]["median_s"], rows[("1024", name)]["median_s"]
        print(f"{name}: median {off:.3f} s off, {on:.3f} s on: {off / on:.2f}x")


if __name__ == "__main__":
    main()
