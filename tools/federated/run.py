#!/usr/bin/env python3
"""Federated fine-tuning with petal on Flower, on this machine. With the Deployment Engine (the
default): one `flower-superlink`, one `flower-supernode` per client (each `partition-id` is one
data file), and `flwr run python/flower` submitting petal's ServerApp/ClientApp
(python/flower/petal_flower); all processes on loopback, stopped at the end; plain connections, or
TLS with `--tls` (a CA and a server certificate made for the run by `openssl`).
With `--engine simulation`: Flower's Simulation Engine, one `flower-superlink --simulation` whose
Ray backend runs the clients as actors (`num-supernodes` = the partitions, `--client-cpus` each),
no SuperNode processes; needs `flwr[simulation]` (python/flower/requirements-simulation.txt).

Only the adapter's tensors travel. The server writes OUT/adapter (the global adapter, a PEFT
folder), OUT/round-R/adapter, OUT/rounds.jsonl (held-out loss, bytes and time per round) and
OUT/train_metrics.json (Flower's aggregated client metrics per round).

    python3 tools/federated/run.py --flwr target/venv-flower/bin --petal target/release/petal \\
        --model asset:smollm2 --partitions A.txt,B.txt --val-data V.txt --out runs/fed \\
        --rounds 3 --local-steps 4

Needs flwr (python/flower/requirements.txt) in the venv given by --flwr. Exit status 0 only
when Flower reports the run `finished:completed`; otherwise its status details are printed.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "python" / "flower"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def make_certificates(folder):
    """A CA and a server certificate signed by it for 127.0.0.1 / localhost (2 days), made by
    `openssl` in `folder`: (CA certificate, server certificate, server key), as paths."""
    if shutil.which("openssl") is None:
        sys.exit("--tls: no `openssl` on PATH (it makes the run's certificates; apt install openssl)")
    folder.mkdir(parents=True)
    f = {n: str(folder / n) for n in ("ca.crt", "ca.key", "server.csr", "server.pem", "server.key", "san")}
    Path(f["san"]).write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for cmd in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=petal-federated-ca",
                 "-keyout", f["ca.key"], "-out", f["ca.crt"]],
                ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                 "-keyout", f["server.key"], "-out", f["server.csr"]],
                ["x509", "-req", "-days", "2", "-in", f["server.csr"], "-CA", f["ca.crt"], "-CAkey", f["ca.key"],
                 "-CAcreateserial", "-extfile", f["san"], "-out", f["server.pem"]]):
        o = subprocess.run(["openssl", *cmd], capture_output=True, text=True)
        if o.returncode != 0:
            sys.exit(f"--tls: openssl {cmd[0]} failed: {o.stderr.strip()[-300:]}")
    return f["ca.crt"], f["server.pem"], f["server.key"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flwr", required=True, help="the venv's bin folder with flwr, flower-superlink, flower-supernode")
    ap.add_argument("--engine", default="deployment", choices=["deployment", "simulation"],
                    help="Flower's Deployment Engine (a SuperNode process per client) or its Simulation Engine (Ray)")
    ap.add_argument("--client-cpus", type=int, default=os.cpu_count() or 1,
                    help="simulation: CPUs Ray reserves for each client (all of them: one client at a time)")
    ap.add_argument("--petal", default=str(ROOT / "target/release/petal"))
    ap.add_argument("--model", default="asset:smollm2")
    ap.add_argument("--partitions", required=True, help="client data files, comma-separated: client i trains on file i")
    ap.add_argument("--val-data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedprox", "legend"])
    ap.add_argument("--legend-send", default="own", choices=["own", "all"],
                    help="legend: what travels down, a client's own layers (default) or the whole global "
                         "adapter, the rest merged into the client's base (its update on the global model)")
    ap.add_argument("--legend-fixed", action="store_true",
                    help="legend's rounds and accounting, every client on every layer at full rank (the baseline)")
    ap.add_argument("--slowdowns", default="", help="simulated devices: client i's seconds times factor i, comma-separated")
    ap.add_argument("--step-seconds", type=float, default=0.0,
                    help="tests: every client's step measured as this many seconds (LEGEND's depths then "
                         "follow --slowdowns alone); 0 measures them")
    ap.add_argument("--proximal-mu", type=float, default=0.01)
    ap.add_argument("--task-type", default="", choices=["", "seq-cls"],
                    help="seq-cls: a classifier on a BERT encoder (data: JSONL text/label; rounds.jsonl gains accuracy)")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--r", type=int, default=8, help="the method's rank (0: a method without one)")
    ap.add_argument("--alpha", type=float, default=16, help="the method's alpha (0: a method without one)")
    ap.add_argument("--method-options", default="",
                    help="the method's own options as KEY=VALUE, separated by ';' (petal train --set)")
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--max-eval-examples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-client-adapters", action="store_true")
    ap.add_argument("--round-timeout", type=float, default=3600, help="seconds a round waits for its clients")
    ap.add_argument("--inject", action="append", default=[], metavar="KEY=PID:ROUND",
                    help="tests: a client fault, fail-at=1:2 (client 1 fails in round 2) or misshape-at=0:1")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before the run is stopped")
    ap.add_argument("--tls", action="store_true",
                    help="TLS between every process and the SuperLink (certificates made for the run by openssl)")
    a = ap.parse_args()

    bin_dir = Path(a.flwr)
    for tool in ("flwr", "flower-superlink", "flower-supernode"):
        if not (bin_dir / tool).exists():
            sys.exit(f"--flwr {a.flwr}: no `{tool}` there (pip install -r python/flower/requirements.txt into a venv)")
    if a.engine == "simulation" and not any((bin_dir.parent / "lib").glob("python3*/site-packages/ray")):
        sys.exit(f"--engine simulation: no Ray in the venv of --flwr {a.flwr} "
                 "(pip install -r python/flower/requirements-simulation.txt)")
    parts = [str(Path(p).resolve()) for p in a.partitions.split(",") if p]
    for p in parts + [a.val_data]:
        if not Path(p).exists():
            sys.exit(f"{p}: no such file")
    if len(parts) < 2:
        sys.exit("--partitions: give at least two client data files")
    try:  # the clients read these: a typo would fail every one of them, after Flower started
        factors = [float(x) for x in a.slowdowns.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"--slowdowns {a.slowdowns}: expected a comma list of numbers (e.g. 1,2.5)")
    if any(not f > 0 for f in factors):
        sys.exit(f"--slowdowns {a.slowdowns}: every factor must be > 0")
    petal = str(Path(a.petal).resolve())
    if not os.access(petal, os.X_OK):
        sys.exit(f"--petal {a.petal}: not an executable")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "rounds.jsonl").unlink(missing_ok=True)  # an earlier run's: not this one's to follow

    home = Path(tempfile.mkdtemp(prefix="petal-flwr-"))
    link = free_port()
    # who talks to the SuperLink (its SuperNodes, the flwr CLI) trusts the run's CA, or nothing
    link_tls, node_tls, cli_tls = ["--insecure"], ["--insecure"], "insecure = true"
    if a.tls:
        ca, cert, key = make_certificates(home / "certificates")
        link_tls = ["--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key]
        node_tls = ["--root-certificates", ca]
        cli_tls = f'root-certificates = "{ca}"'
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "deploy"\n\n'
        f'[superlink.deploy]\naddress = "127.0.0.1:{link}"\n{cli_tls}\n')
    # Flower starts its own helpers (flower-superexec, flwr-clientapp) by name: the venv's bin first
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PYTHONUNBUFFERED="1", PATH=f"{bin_dir.resolve()}{os.pathsep}{os.environ.get('PATH', '')}")
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    procs = []

    def start(name, cmd):
        f = open(logs / f"{name}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True), f))

    def stop():
        for p, f in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p, f in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
            f.close()
        # what Flower started on its own and left when the run was cut short (flwr-simulation
        # and its Ray processes, app processes): their own process groups, found by our port
        groups = set()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if f"127.0.0.1:{link}".encode() in cmdline.read_bytes():
                    groups.add(os.getpgid(int(cmdline.parent.name)))
            except (OSError, ProcessLookupError):
                continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for g in groups - {os.getpgid(0)}:
                try:
                    os.killpg(g, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM and groups:
                time.sleep(3)
        shutil.rmtree(home, ignore_errors=True)

    status = "not started"
    # a stop by signal still stops Flower's processes (the finally below): SIGTERM as an exit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        simulation = ["--simulation"] if a.engine == "simulation" else []
        start("superlink", [bin_dir / "flower-superlink", *link_tls, "--port", str(link),
                            "--disable-runtime-dependency-installation", *simulation])
        deadline = time.time() + 60
        while True:  # the SuperLink listens
            try:
                socket.create_connection(("127.0.0.1", link), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or procs[0][0].poll() is not None:
                    raise SystemExit(f"flower-superlink did not start (see {logs / 'superlink.log'})")
                time.sleep(0.3)
        for i in range(len(parts) if a.engine == "deployment" else 0):
            start(f"supernode-{i}", [bin_dir / "flower-supernode", *node_tls,
                                     "--superlink", f"127.0.0.1:{link}", "--port", str(free_port()),
                                     "--node-config", f"partition-id={i} num-partitions={len(parts)}"])
        rc = {"petal": petal, "model": a.model, "partitions": "|".join(parts),
              "val-data": str(Path(a.val_data).resolve()), "out": str(out),
              "num-server-rounds": a.rounds, "num-clients": len(parts), "strategy": a.strategy,
              "proximal-mu": a.proximal_mu, "method": a.method, "r": a.r, "alpha": a.alpha,
              "method-options": a.method_options,
              "lr": a.lr, "local-steps": a.local_steps, "batch-size": a.batch_size,
              "seq-len": a.seq_len, "max-eval-examples": a.max_eval_examples, "seed": a.seed,
              "keep-client-adapters": a.keep_client_adapters, "legend-adapt": not a.legend_fixed,
              "legend-send": a.legend_send,
              "slowdowns": a.slowdowns, "step-seconds": a.step_seconds, "round-timeout": a.round_timeout, "task-type": a.task_type}
        for item in a.inject:
            key, _, value = item.partition("=")
            if key not in ("fail-at", "misshape-at"):
                sys.exit(f"--inject {item}: the faults are fail-at and misshape-at")
            rc[key] = value
        run_config = " ".join(f"{k}={toml_value(v)}" for k, v in rc.items())
        t0 = time.time()
        federation = []
        if a.engine == "simulation":  # Ray's actors: one per `client-cpus`, partition-id 0..N-1
            federation = ["--federation-config", f"num-supernodes={len(parts)} "
                          f"client-resources-num-cpus={a.client_cpus} init-args-logging-level=\"ERROR\""]
        sub = subprocess.run([bin_dir / "flwr", "run", str(APP), "deploy", "--run-config", run_config,
                              *federation, "--format", "json"], capture_output=True, text=True, env=env,
                             timeout=120)
        try:
            run_id = json.loads(sub.stdout)["run-id"]
        except (ValueError, KeyError):
            raise SystemExit(f"flwr run: {(sub.stdout + sub.stderr).strip()[-500:]}")
        print(f"run {run_id}: {len(parts)} clients, {a.rounds} rounds, {a.strategy}, {a.engine} engine "
              f"(logs in {logs})", flush=True)
        seen = 0
        while True:
            time.sleep(2)
            try:  # a busy machine can make `flwr ls` slow: ask again, the run goes on
                ls = subprocess.run([bin_dir / "flwr", "ls", "deploy", "--run-id", str(run_id), "--format", "json"],
                                    capture_output=True, text=True, env=env, timeout=120)
            except subprocess.TimeoutExpired:
                continue
            try:
                run = json.loads(ls.stdout)["runs"][0]
            except (ValueError, KeyError, IndexError):
                continue
            status = run.get("status", "?")
            rounds = (out / "rounds.jsonl").read_text().splitlines() if (out / "rounds.jsonl").exists() else []
            for line in rounds[seen:]:
                r = json.loads(line)
                acc = f", accuracy {r['eval_accuracy']:.3f}" if "eval_accuracy" in r else ""
                print(f"round {r['round']}: held-out loss {r['eval_loss']:.4f}{acc} ({r['seconds']:.0f} s)", flush=True)
            seen = len(rounds)
            if status.startswith("finished"):
                break
            if time.time() - t0 > a.timeout:
                raise SystemExit(f"run {run_id}: still {status} after {a.timeout:.0f} s; stopped")
        if status != "finished:completed":
            details = run.get("status-details", "") or run.get("sub-status", "")
            raise SystemExit(f"run {run_id}: {status} {details}".strip())
        # a round in which no client's update arrived trained nothing: say so; none in any
        # round is a failed run, whatever the server's status
        empty = [r for r in map(json.loads, rounds) if r["round"] > 0
                 and len(r.get("failed", [])) + len(r.get("refused", [])) >= len(parts)]
        for r in empty:
            why = (r.get("failed") or r.get("refused"))[0]["error"]
            print(f"round {r['round']}: no client's update arrived (first: {why})", flush=True)
        if empty and len(empty) == len([r for r in map(json.loads, rounds) if r["round"] > 0]):
            raise SystemExit(f"no round received a client's update: the adapter is untrained (logs in {logs})")
        print(f"done in {time.time() - t0:.0f} s: {out / 'adapter'}")
    finally:
        stop()


if __name__ == "__main__":
    main()
