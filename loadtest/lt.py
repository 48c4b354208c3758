#!/usr/bin/env python3
"""Helpers for loadtest/run.sh (Python 3 standard library only).

Subcommands:
  ports N                      print N free loopback TCP ports
  cpu PID...                   utime+stime (clock ticks) summed over the processes
  hwm PID...                   VmHWM (peak RSS, KiB) summed over the processes
  wait-port PORT [SECS]        exit 0 once 127.0.0.1:PORT accepts, 1 on time-out
  idle --port P [--tls] ...    open N idle keep-alive clients, print RSS KiB per connection
  record ...                   parse one load-tool output into a JSON line (results.jsonl)
  report RESULTS.jsonl ...     the markdown report: medians of rounds, ratios to nginx
"""

import argparse
import asyncio
import json
import os
import re
import socket
import ssl
import sys
import time

from lt_report import cmd_line, cmd_report

# --------------------------------------------------------------------------------------
# /proc helpers


def proc_ticks(pid):
    """utime + stime of a process (all its threads), in clock ticks; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def proc_status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pids):
    return sum(proc_status_kib(p, "VmRSS") for p in pids)


def cmd_ports(args):
    socks = []
    for _ in range(args.n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def cmd_cpu(args):
    print(sum(proc_ticks(p) for p in args.pids))


def cmd_hwm(args):
    print(sum(proc_status_kib(p, "VmHWM") for p in args.pids))


def cmd_wait_port(args):
    deadline = time.monotonic() + args.secs
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", args.port), timeout=0.2):
                return 0
        except OSError:
            time.sleep(0.05)
    return 1


# --------------------------------------------------------------------------------------
# Idle keep-alive clients


async def _one_idle(port, ctx, path, sem, conns, errors):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx else None
                ),
                10,
            )
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: lt-idle\r\n\r\n".encode()
            )
            status, _ = await asyncio.wait_for(_read_response(reader), 10)
            if status != 200:
                errors.append(f"status {status}")
            conns.append((reader, writer))
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(type(e).__name__)


async def _idle(args):
    ctx = None
    if args.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
    pids = args.pids
    before = rss_kib(pids)
    conns, errors = [], []
    sem = asyncio.Semaphore(args.parallel)
    t0 = time.monotonic()
    await asyncio.gather(
        *(_one_idle(args.port, ctx, args.path, sem, conns, errors) for _ in range(args.n))
    )
    opened = time.monotonic() - t0
    await asyncio.sleep(args.settle)
    after = rss_kib(pids)
    alive = sum(1 for r, w in conns if not r.at_eof() and not w.is_closing())
    for _, w in conns:
        w.close()
    per_conn = (after - before) / len(conns) if conns else None
    return {
        "tls": bool(args.tls),
        "n": args.n,
        "ok": len(conns),
        "alive": alive,
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:5],
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_conn": per_conn,
        "open_secs": round(opened, 2),
    }


def cmd_idle(args):
    out = asyncio.run(_idle(args))
    print(json.dumps(out))


# --------------------------------------------------------------------------------------
# Saturation client: closed-loop keep-alive HTTP/1.1 clients that also account for the
# requests a load generator like wrk silently drops (still waiting when the run ends).


async def _read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if m:
        await reader.readexactly(int(m.group(1)))
    elif re.search(rb"(?i)\r\ntransfer-encoding:\s*chunked", head):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            await reader.readexactly(size + 2)
    keep = not re.search(rb"(?i)\r\nconnection:\s*close", head)
    return status, keep


async def _sat(args):
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    end = t0 + args.duration
    lat, pending = [], []
    counts = {"non2xx": 0, "timeouts": 0, "sock_errors": 0}
    done_per_conn = [0] * args.conns
    req = f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: lt-sat\r\n\r\n".encode()

    async def client(i):
        reader = writer = None
        while loop.time() < end:
            start = loop.time()
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", args.port), max(0.001, end - start)
                    )
                writer.write(req)
                deadline = min(start + args.timeout, end)
                status, keep = await asyncio.wait_for(
                    _read_response(reader), max(0.001, deadline - loop.time())
                )
            except asyncio.TimeoutError:
                if start + args.timeout <= end:
                    counts["timeouts"] += 1
                else:
                    pending.append((end - start) * 1000.0)
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                counts["sock_errors"] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.01)
                continue
            lat.append((loop.time() - start) * 1000.0)
            done_per_conn[i] += 1
            if not 200 <= status < 400:
                counts["non2xx"] += 1
            if not keep:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client(i) for i in range(args.conns)))
    secs = loop.time() - t0
    done = sorted(lat)
    # Percentiles over finished requests plus the ones still waiting at the end, counted
    # at their age then (a lower bound): a starved request must not vanish from the tail.
    both = sorted(lat + pending)
    return {
        "requests": len(done),
        "secs": secs,
        "rps": len(done) / secs if secs else 0,
        "p50_ms": _percentile(both, 50),
        "p99_ms": _percentile(both, 99),
        "max_ms": both[-1] if both else None,
        "pending_at_end": len(pending),
        "pending_max_ms": max(pending) if pending else 0,
        "starved_conns": sum(1 for d in done_per_conn if d == 0),
        "non2xx": counts["non2xx"],
        "timeouts": counts["timeouts"],
        "sock_errors": counts["sock_errors"],
        "errors": counts["non2xx"] + counts["timeouts"] + counts["sock_errors"],
    }


def cmd_sat(args):
    print(json.dumps(asyncio.run(_sat(args))))


# --------------------------------------------------------------------------------------
# Load-tool output parsing

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _dur_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        return None
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(text):
    """wrk --latency output → dict."""
    r = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if m:
        r["requests"] = int(m.group(1))
        r["secs"] = float(m.group(2)) * _UNITS_MS[m.group(3)] / 1000.0
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r["rps"] = float(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        if m:
            r[key] = _dur_ms(m.group(1))
    m = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", text, re.M)
    if m:
        r["max_ms"] = _dur_ms(m.group(1))
    sock = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        sock = dict(zip(sock, map(int, m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    non2xx = int(m.group(1)) if m else 0
    # wrk counts a read error for every connection the server closes; only a non-2xx answer
    # or a time-out is a failed request from the client's point of view, but report all.
    r["non2xx"] = non2xx
    r["timeouts"] = sock["timeout"]
    r["sock_errors"] = sock["connect"] + sock["read"] + sock["write"]
    r["errors"] = non2xx + sock["timeout"] + sock["connect"]
    return r


def parse_h2load(text, log_path=None):
    """h2load output (+ its --log-file for percentiles) → dict."""
    r = {}
    m = re.search(r"finished in ([\d.]+)(us|ms|s|m), ([\d.]+) req/s", text)
    if m:
        r["secs"] = float(m.group(1)) * _UNITS_MS[m.group(2)] / 1000.0
        r["rps"] = float(m.group(3))
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    )
    if m:
        total, started, done, succeeded, failed, errored, timeout = map(int, m.groups())
        r["requests"] = done
        r["timeouts"] = timeout
        r["sock_errors"] = errored
        r["failed"] = failed
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    non2xx = 0
    if m:
        non2xx = int(m.group(3)) + int(m.group(4))
    r["non2xx"] = non2xx
    # h2load's "failed" already includes non-2xx/3xx answers and errored streams.
    r["errors"] = max(r.get("failed", 0), non2xx + r.get("sock_errors", 0))
    m = re.search(r"time for request:\s+\S+\s+(\S+)", text)
    if m:
        r["max_ms"] = _dur_ms(m.group(1))
    # Per-connection rates (min max mean sd): a proxy that serves some connections and
    # leaves others waiting shows a slowest connection far below the mean.
    m = re.search(r"^req/s\s*:\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", text, re.M)
    if m:
        r["conn_min_rps"] = float(m.group(1))
        r["conn_mean_rps"] = float(m.group(3))
        if r["conn_mean_rps"] > 0:
            r["conn_fairness"] = r["conn_min_rps"] / r["conn_mean_rps"]
    if log_path and os.path.exists(log_path):
        lat = []
        with open(log_path) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    try:
                        lat.append(int(parts[2]) / 1000.0)
                    except ValueError:
                        pass
        if lat:
            lat.sort()
            r["p50_ms"] = _percentile(lat, 50)
            r["p99_ms"] = _percentile(lat, 99)
            r["max_ms"] = lat[-1]
    return r


def _percentile(sorted_vals, pct):
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(pct / 100.0 * len(sorted_vals))) - 1))
    return sorted_vals[k]


def cmd_record(args):
    rec = {"scenario": args.scenario, "proxy": args.proxy, "round": args.round}
    if args.error:
        rec["error"] = args.error
    text = ""
    if args.out and os.path.exists(args.out):
        with open(args.out, errors="replace") as f:
            text = f.read()
    if args.tool == "wrk":
        rec.update(parse_wrk(text))
    elif args.tool == "h2load":
        rec.update(parse_h2load(text, args.log))
    elif args.tool == "sat":
        for line in text.splitlines():
            if line.strip().startswith("{"):
                rec.update(json.loads(line))
    elif args.tool == "idle":
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("{"):
                d = json.loads(line)
                key = "idle_tls" if d.get("tls") else "idle_plain"
                rec[key] = d
    if args.cpu0 is not None and args.cpu1 is not None and args.ticks:
        cpu_s = (args.cpu1 - args.cpu0) / args.ticks
        rec["cpu_s"] = cpu_s
        if rec.get("requests"):
            rec["cpu_per_10k"] = cpu_s / rec["requests"] * 10000
    if args.php_cpu0 is not None and args.php_cpu1 is not None and args.ticks:
        php_s = (args.php_cpu1 - args.php_cpu0) / args.ticks
        rec["php_cpu_s"] = php_s
        if rec.get("requests"):
            rec["php_cpu_per_10k"] = php_s / rec["requests"] * 10000
    if args.hwm is not None:
        rec["hwm_kib"] = args.hwm
    if args.tool in ("wrk", "h2load", "sat") and not rec.get("requests") and "error" not in rec:
        rec["error"] = "no requests completed (see " + os.path.basename(args.out or "?") + ")"
    print(json.dumps(rec, sort_keys=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ports")
    p.add_argument("n", type=int)
    p.set_defaults(fn=cmd_ports)
    p = sub.add_parser("cpu")
    p.add_argument("pids", nargs="*", type=int)
    p.set_defaults(fn=cmd_cpu)
    p = sub.add_parser("hwm")
    p.add_argument("pids", nargs="*", type=int)
    p.set_defaults(fn=cmd_hwm)
    p = sub.add_parser("wait-port")
    p.add_argument("port", type=int)
    p.add_argument("secs", type=float, nargs="?", default=10.0)
    p.set_defaults(fn=cmd_wait_port)
    p = sub.add_parser("idle")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--path", default="/fast/")
    p.add_argument("--parallel", type=int, default=128)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--pids", type=int, nargs="+", required=True)
    p.set_defaults(fn=cmd_idle)
    p = sub.add_parser("sat")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/sleep.php")
    p.add_argument("--conns", type=int, default=64)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(fn=cmd_sat)
    p = sub.add_parser("record")
    p.add_argument("--scenario", required=True)
    p.add_argument("--proxy", required=True)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--tool", choices=["wrk", "h2load", "sat", "idle", "none"], required=True)
    p.add_argument("--out")
    p.add_argument("--log")
    p.add_argument("--cpu0", type=int)
    p.add_argument("--cpu1", type=int)
    p.add_argument("--ticks", type=int, default=os.sysconf("SC_CLK_TCK"))
    p.add_argument("--hwm", type=int)
    p.add_argument("--php-cpu0", type=int)
    p.add_argument("--php-cpu1", type=int)
    p.add_argument("--error")
    p.set_defaults(fn=cmd_record)
    p = sub.add_parser("line")
    p.set_defaults(fn=cmd_line)
    p = sub.add_parser("report")
    p.add_argument("results")
    p.add_argument("--meta")
    p.add_argument("--out")
    p.set_defaults(fn=cmd_report)
    args = ap.parse_args()
    rc = args.fn(args)
    sys.exit(rc or 0)


if __name__ == "__main__":
    main()
