#!/usr/bin/env python3
"""How long a running stream stalls while another client's long prompt is prefilled.

Starts `petal serve` (the binary given) on SmolLM2 with `--prefill-chunk N` for each N given,
streams one completion, sends a long prompt from a second client while it runs, and prints
the stream's largest and median gap between events, with and without the long prompt in the
window. Loopback only; bounded (one stream of --tokens tokens per setting).

    python3 tools/bench/serve_long_prompt.py target/release/petal 256 100000
"""
import json, socket, statistics, sys, threading, time

from serve import PORT, start


def post(body):
    s = socket.create_connection(("127.0.0.1", PORT))
    b = json.dumps(body)
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(b)}\r\n\r\n{b}".encode())
    return s


def run(petal, chunk, tokens, long_words):
    p = start(petal, ["--prefill-chunk", str(chunk)])
    try:
        s = post({"prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0,
                  "stream": True})
        times, buf, long_at, long_done = [], b"", [None], [None]

        def long_client():
            time.sleep(2.0)
            long_at[0] = time.time()
            c = post({"prompt": " ".join(["the cat sat on the mat."] * long_words),
                      "max_tokens": 1})
            data = b""
            while b"}" not in data[-4:]:
                d = c.recv(65536)
                if not d:
                    break
                data += d
            long_done[0] = time.time()

        t = threading.Thread(target=long_client)
        t.start()
        while b"[DONE]" not in buf:
            d = s.recv(65536)
            if not d:
                break
            buf += d
            times.append((time.time(), d.count(b"data: ")))
        t.join()
        stamps = [at for at, n in times for _ in range(n)]
        gaps = [(b - a) for a, b in zip(stamps, stamps[1:])]
        during = [g for (a, b), g in zip(zip(stamps, stamps[1:]), gaps)
                  if long_at[0] and b >= long_at[0] and a <= long_done[0]]
        print(json.dumps({"prefill_chunk": chunk, "events": len(stamps),
                          "median_gap_s": round(statistics.median(gaps), 4),
                          "max_gap_s": round(max(gaps), 3),
                          "max_gap_while_long_prompt_s": round(max(during), 3) if during else None,
                          "long_prompt_answered_in_s": round(long_done[0] - long_at[0], 2)}))
    finally:
        p.terminate()
        p.wait()


if __name__ == "__main__":
    petal = sys.argv[1]
    for chunk in sys.argv[2:] or ["256", "100000"]:
        run(petal, int(chunk), tokens=300, long_words=250)
