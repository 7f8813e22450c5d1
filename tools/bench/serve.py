#!/usr/bin/env python3
"""Load test of `petal serve` on loopback: throughput, time to first token and inter-token
latency at several concurrencies, with a mix of adapters and prompt lengths, plain and with a
hostile client in the mix (a long prompt, or a client that stalls its body).

Starts the given petal binary on SmolLM2 with the adapters given, runs every scenario at every
concurrency (each client sends --requests streamed completions one after another, each through
the base model or one of the adapters, short or medium prompt, in turn), prints one row per run
and writes them as JSON lines with --json. Bounded: clients x requests completions of
--max-tokens tokens per run. Python's standard library only.

    python3 tools/bench/serve.py target/release/petal --adapter a=runs/x/adapter \\
        --adapter b=runs/y/adapter --concurrency 1,4,16,64 --json docs/bench/serve.jsonl
"""
import argparse, json, socket, statistics, subprocess, threading, time

PORT = 8793
SHORT = "Write one line about the sea."
MEDIUM = " ".join(["The quick brown fox jumps over the lazy dog."] * 12) + " Go on:"


def start(petal, extra, log=None):
    """`petal serve` on SmolLM2 on PORT with `extra` arguments; back once it accepts."""
    args = [petal, "serve", "--model", "asset:smollm2", "--port", str(PORT)] + extra
    p = subprocess.Popen(args, stderr=open(log, "w") if log else subprocess.DEVNULL)
    for _ in range(900):
        try:
            socket.create_connection(("127.0.0.1", PORT)).close()
            return p
        except OSError:
            time.sleep(0.1)
    raise SystemExit("petal serve did not start")


def stream(body):
    """One streamed completion: (time to first text, gaps between texts, tokens, error)."""
    t0 = time.time()
    s = socket.create_connection(("127.0.0.1", PORT))
    s.settimeout(600)
    b = json.dumps(body)
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
              f"Content-Length: {len(b)}\r\n\r\n{b}".encode())
    buf, arrivals, tokens, head = b"", [], 0, None
    while True:
        d = s.recv(65536)
        if not d:
            break
        now = time.time()
        buf += d
        if head is None and b"\r\n\r\n" in buf:
            head, buf = buf.split(b"\r\n\r\n", 1)
            if not head.startswith(b"HTTP/1.1 200"):
                return None, [], 0, head.split(b"\r\n")[0].decode()
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            data = ev.split(b"data: ", 1)[-1]
            if data.startswith(b"[DONE]"):
                s.close()
                ttft = arrivals[0] - t0 if arrivals else None
                return ttft, [b - a for a, b in zip(arrivals, arrivals[1:])], tokens, None
            # strip the chunk-size lines of the chunked encoding around the JSON
            j = data[data.find(b"{"):data.rfind(b"}") + 1]
            try:
                obj = json.loads(j)
            except ValueError:
                continue
            if "error" in obj:
                return None, [], 0, obj["error"]["message"]
            if obj["choices"][0].get("text"):
                arrivals.append(now)
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    return None, [], 0, "the stream ended early"


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4)


def run(models, concurrency, requests, max_tokens, hostile):
    ttfts, gaps, tokens, errors = [], [], [0], []
    lock = threading.Lock()

    def client(c):
        for r in range(requests):
            i = c * requests + r
            body = {"model": models[i % len(models)], "prompt": [SHORT, MEDIUM][i % 2],
                    "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
                    "stream": True}
            ttft, g, n, err = stream(body)
            with lock:
                if err:
                    errors.append(err)
                else:
                    if ttft is not None:  # None: no text came (held back, or empty)
                        ttfts.append(ttft)
                    gaps.extend(g)
                    tokens[0] += n

    extra = []
    if hostile == "long-prompt":
        body = {"prompt": " ".join(["the cat sat on the mat."] * 250), "max_tokens": 1}
        extra.append(threading.Thread(target=lambda: stream(dict(body, stream=True))))
    stalled = None
    if hostile == "stalled-client":
        stalled = socket.create_connection(("127.0.0.1", PORT))
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"pro")
    t0 = time.time()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    for t in threads + extra:
        t.start()
    for t in threads + extra:
        t.join()
    wall = time.time() - t0
    if stalled:
        stalled.close()
    return {"scenario": hostile, "concurrency": concurrency,
            "completions": concurrency * requests, "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "tokens_per_s": round(tokens[0] / wall, 1), "wall_s": round(wall, 1),
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99),
            "itl_p50_s": pct(gaps, 0.5), "itl_p99_s": pct(gaps, 0.99)}


def memory(pid):
    """The server's resident memory now and at its peak so far, in MB."""
    kb = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                kb[k] = int(v.split()[0])
    return {"rss_mb": round(kb.get("VmRSS", 0) / 1024), "peak_rss_mb": round(kb.get("VmHWM", 0) / 1024)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("petal")
    ap.add_argument("--adapter", action="append", default=[])
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--scenarios", default="plain,long-prompt,stalled-client")
    ap.add_argument("--base-name", default="smollm2", help="the base model's served name")
    ap.add_argument("--json")
    ap.add_argument("--server-log", help="write the server's stderr (its request log) here")
    a = ap.parse_args()
    models = [a.base_name] + [x.split("=", 1)[0] for x in a.adapter]
    extra = ["--max-batch", str(a.max_batch)]
    for x in a.adapter:
        extra += ["--adapter", x]
    p = start(a.petal, extra, a.server_log)
    rows = []
    try:
        stream({"prompt": SHORT, "max_tokens": 4, "stream": True})  # warm up
        for sc in a.scenarios.split(","):
            for c in [int(x) for x in a.concurrency.split(",")]:
                row = run(models, c, a.requests, a.max_tokens, sc)
                row.update(max_batch=a.max_batch, max_tokens=a.max_tokens,
                           adapters=len(a.adapter), **memory(p.pid))
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        p.terminate()
        p.wait()
    if a.json:
        with open(a.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
