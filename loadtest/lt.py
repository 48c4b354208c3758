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
import statistics
import sys
import time

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


# --------------------------------------------------------------------------------------
# Report

SCENARIO_TITLES = {
    "fast-h1": "fast-h1: HTTP/1.1 keep-alive → FastCGI responder (proxy-bound)",
    "fast-h2": "fast-h2: HTTP/2 over TLS → FastCGI responder (proxy-bound)",
    "hello-h1": "hello-h1: HTTP/1.1 → hello.php on PHP-FPM (2 pools × 64 workers)",
    "hello-h2": "hello-h2: HTTP/2 over TLS → hello.php on PHP-FPM",
    "big-h1": "big-h1: 1 MiB response from PHP-FPM (HTTP/1.1)",
    "post-h1": "post-h1: 100 KiB POST body to PHP-FPM (HTTP/1.1)",
}
LOAD_SCENARIOS = list(SCENARIO_TITLES)
PROXY_ORDER = ["nginx", "haproxy", "h2o", "caddy", "fpmgate"]
PEERS = ["nginx", "haproxy", "h2o", "caddy"]
# Slowest connection's rate / the mean below this: the proxy left some connections unserved.
FAIR_MIN = 0.5


def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def _fmt(v, digits=None):
    if v is None:
        return "–"
    if digits is None:
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return f"{v:.{digits}f}"


def _short(text, n=90):
    text = " ".join(str(text).replace("|", "/").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _ratio(v, base):
    if v is None or base in (None, 0):
        return ""
    return f" ({v / base:.2f})"


def _cell(v, base, digits=None):
    return _fmt(v, digits) + _ratio(v, base)


def summarize(records):
    """(scenario, proxy) → medians over rounds of each figure."""
    groups = {}
    for r in records:
        groups.setdefault((r["scenario"], r["proxy"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        good = [r for r in rs if "error" not in r]
        s = {
            "rounds": len(rs),
            "good": len(good),
            "failures": [r["error"] for r in rs if "error" in r],
        }
        for f in ("rps", "p50_ms", "p99_ms", "max_ms", "cpu_per_10k", "php_cpu_per_10k", "requests",
                  "starved_conns", "pending_at_end", "pending_max_ms",
                  "conn_min_rps", "conn_mean_rps", "conn_fairness"):
            s[f] = _median([r.get(f) for r in good])
        s["hwm_mib"] = _median([r["hwm_kib"] / 1024.0 for r in good if r.get("hwm_kib")])
        for f in ("errors", "non2xx", "timeouts", "sock_errors"):
            vals = [r.get(f, 0) for r in good]
            s[f + "_total"] = sum(vals) if vals else None
        for kind in ("idle_plain", "idle_tls"):
            ds = [r[kind] for r in good if kind in r]
            if ds:
                s[kind] = {
                    "kib_per_conn": _median([d.get("kib_per_conn") for d in ds]),
                    "alive": min(d.get("alive", 0) for d in ds),
                    "n": max(d.get("n", 0) for d in ds),
                    "errors": sum(d.get("errors", 0) for d in ds),
                }
        out[key] = s
    # idle-h1 and idle-tls (separate proxy runs) are reported together as "idle".
    for px in {k[1] for k in out if k[0] in ("idle-h1", "idle-tls")}:
        merged = {"rounds": 0, "good": 0, "failures": []}
        for sc in ("idle-h1", "idle-tls"):
            s = out.get((sc, px))
            if not s:
                continue
            merged["rounds"] += s["rounds"]
            merged["good"] += s["good"]
            merged["failures"] += s["failures"]
            for kind in ("idle_plain", "idle_tls"):
                if kind in s:
                    merged[kind] = s[kind]
        out[("idle", px)] = merged
    return out


def _paired(records, sc, px, base, f="rps"):
    """Per-round ratios px/base for figure f (rounds where both ran), as text."""
    by = {}
    for r in records:
        if r["scenario"] == sc and "error" not in r and r.get(f):
            by.setdefault(r["round"], {})[r["proxy"]] = r[f]
    vals = [v[px] / v[base] for _, v in sorted(by.items()) if px in v and base in v]
    return ", ".join(f"{x:.2f}" for x in vals)


def _targets(summ, proxies, records=()):
    rows = []

    def rounds(sc, base, f="rps"):
        t = _paired(records, sc, "fpmgate", base, f)
        return f" (per round: {t})" if t and "," in t else ""

    def get(sc, px, f):
        return summ.get((sc, px), {}).get(f)

    def best_peer(sc, f="rps"):
        cands = [(get(sc, p, f), p) for p in PEERS if p in proxies and get(sc, p, f)]
        return max(cands) if cands else (None, None)

    def verdict(ok):
        return "met" if ok else "**not met**"

    if "fpmgate" not in proxies:
        return rows
    sc = "fast-h1"
    bp_rps, bp = best_peer(sc)
    fg_rps, fg_cpu = get(sc, "fpmgate", "rps"), get(sc, "fpmgate", "cpu_per_10k")
    if bp and fg_rps:
        bp_cpu = get(sc, bp, "cpu_per_10k")
        r1 = fg_rps / bp_rps
        r2 = fg_cpu / bp_cpu if fg_cpu and bp_cpu else None
        rows.append(
            (
                "fast-h1: ≥ 1.2× best peer req/s, ≤ 0.8× its CPU/request",
                f"{r1:.2f}× {bp} req/s{rounds(sc, bp)}, {_fmt(r2, 2)}× its CPU"
                f"{rounds(sc, bp, 'cpu_per_10k')}",
                verdict(r1 >= 1.2 and r2 is not None and r2 <= 0.8),
            )
        )
    sc = "fast-h2"
    bp_rps, bp = best_peer(sc)
    fg_rps, ng = get(sc, "fpmgate", "rps"), get(sc, "nginx", "rps")
    if bp and fg_rps:
        # The target names h2o; without an h2o run, HAProxy (the other h2-strong peer) stands in.
        h2o = "h2o" if get(sc, "h2o", "rps") else "haproxy"
        hp = get(sc, h2o, "rps")
        parts = []
        ok = True
        if hp:
            parts.append(f"{fg_rps / hp:.2f}× {h2o}{rounds(sc, h2o)}")
            ok &= fg_rps >= hp
        if ng:
            parts.append(f"{fg_rps / ng:.2f}× nginx{rounds(sc, 'nginx')}")
            ok &= fg_rps >= 1.3 * ng
        label = "h2o" if h2o == "h2o" else "h2o-class peers (HAProxy here)"
        rows.append(
            (
                f"fast-h2 (TLS): ≥ 1.0× {label}, ≥ 1.3× nginx",
                ", ".join(parts),
                verdict(ok),
            )
        )
    for sc in ("hello-h1", "hello-h2"):
        bp_rps, bp = best_peer(sc)
        fg_rps, fg_p99 = get(sc, "fpmgate", "rps"), get(sc, "fpmgate", "p99_ms")
        if bp and fg_rps:
            p99s = [get(sc, p, "p99_ms") for p in PEERS if p in proxies and get(sc, p, "p99_ms")]
            lo = min(p99s) if p99s else None
            text = (
                f"{fg_rps / bp_rps:.2f}× {bp} req/s{rounds(sc, bp)}; p99 {_fmt(fg_p99)} ms vs lowest peer "
                f"{_fmt(lo)} ms"
            )
            # A peer that leaves some connections unserved has figures of the served ones
            # only (see the fairness table): say how fpmgate compares with the others too.
            unfair = [p for p in PEERS if p in proxies
                      and get(sc, p, "conn_fairness") is not None
                      and get(sc, p, "conn_fairness") < FAIR_MIN]
            fair = [p for p in PEERS if p in proxies and p not in unfair and get(sc, p, "rps")]
            if unfair and fair:
                fb = max(fair, key=lambda p: get(sc, p, "rps"))
                flo = min((get(sc, p, "p99_ms") for p in fair if get(sc, p, "p99_ms")), default=None)
                text += (
                    f" ({', '.join(unfair)} left connections unserved; against the others: "
                    f"{fg_rps / get(sc, fb, 'rps'):.2f}× {fb}, lowest p99 {_fmt(flo)} ms)"
                )
            rows.append(
                (
                    f"{sc}: ≥ best peer req/s, p99 ≤ best peer p99",
                    text,
                    verdict(fg_rps >= bp_rps and lo is not None and fg_p99 is not None and fg_p99 <= lo),
                )
            )
    sc = "big-h1"
    bp_rps, bp = best_peer(sc)
    fg_rps = get(sc, "fpmgate", "rps")
    if bp and fg_rps:
        rows.append(
            ("1 MiB: ≥ best peer req/s", f"{fg_rps / bp_rps:.2f}× {bp}{rounds(sc, bp)}", verdict(fg_rps >= bp_rps))
        )
    for kind, label in (("idle_plain", "plain"), ("idle_tls", "TLS")):
        fg = summ.get(("idle", "fpmgate"), {}).get(kind)
        ng = summ.get(("idle", "nginx"), {}).get(kind)
        if fg and ng and fg["kib_per_conn"] is not None and ng["kib_per_conn"]:
            rows.append(
                (
                    f"idle RSS per connection ({label}) ≤ nginx",
                    f"{fg['kib_per_conn']:.2f} KiB vs {ng['kib_per_conn']:.2f} KiB "
                    f"({fg['kib_per_conn'] / ng['kib_per_conn']:.2f}×)",
                    verdict(fg["kib_per_conn"] <= ng["kib_per_conn"]),
                )
            )
    s = summ.get(("saturation", "fpmgate"))
    if s and s.get("good"):
        errs = s.get("errors_total") or 0
        rows.append(
            (
                "saturation: p99 bounded (≤ queue timeout), no failure while the queue has room",
                f"p99 {_fmt(s.get('p99_ms'))} ms, {errs} failed requests",
                verdict(errs == 0 and s.get("p99_ms") is not None and s["p99_ms"] < 10000),
            )
        )
    return rows


def cmd_report(args):
    records = []
    with open(args.results) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    summ = summarize(records)
    proxies = [p for p in PROXY_ORDER if any(k[1] == p for k in summ)]
    proxies += sorted({k[1] for k in summ} - set(proxies))
    meta = {}
    if args.meta and os.path.exists(args.meta):
        with open(args.meta) as f:
            meta = json.load(f)
    L = []
    L.append("# fpmgate load test results")
    L.append("")
    L.append(
        "Generated by `loadtest/run.sh` — do not edit by hand; rerun the command to refresh. "
        "Method and how to read the tables: [README.md](README.md)."
    )
    L.append("")
    for k in ("command", "date", "machine", "mode", "versions", "notes"):
        if k in meta:
            v = meta[k]
            if isinstance(v, list):
                L.append(f"- **{k}**:")
                L.extend(f"  - {x}" for x in v)
            else:
                L.append(f"- **{k}**: {v}")
    L.append("")
    L.append(
        "Medians of the rounds. In parentheses: the ratio to nginx (for req/s higher is "
        "better, for every other column lower is better). CPU = the proxy's CPU seconds "
        "(user+system, all its processes) per 10,000 requests. PHP CPU = the same for all "
        "PHP-FPM workers, where PHP serves: what PHP spent per request behind that proxy. It "
        "grows with how many requests the proxy has PHP run at once, and with the machine's "
        "load; PHP shares the cores with the proxy, so it is also throughput lost. Peak RSS = the proxy's VmHWM "
        "summed over its processes, one fresh proxy per run. Errors = non-2xx answers + "
        "time-outs + connect errors, summed over the rounds."
    )
    L.append("")
    targets = _targets(summ, proxies, records)
    if targets:
        L.append("## fpmgate against the targets")
        L.append("")
        L.append("| target | measured | |")
        L.append("|---|---|---|")
        for t in targets:
            L.append(f"| {t[0]} | {t[1]} | {t[2]} |")
        L.append("")
    scenarios = [s for s in LOAD_SCENARIOS if any(k[0] == s for k in summ)]
    if scenarios:
        L.append("## Throughput, latency, CPU, memory")
        L.append("")
        L.append(
            "| scenario | proxy | req/s | p50 ms | p99 ms | CPU s/10k req | PHP CPU s/10k req "
            "| peak RSS MiB | errors |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|")
        for sc in scenarios:
            base = summ.get((sc, "nginx"), {})
            for px in proxies:
                s = summ.get((sc, px))
                if not s:
                    continue
                if not s["good"]:
                    L.append(f"| {sc} | {px} | failed: {_short(s['failures'][0])} | | | | | | |")
                    continue
                note = "" if s["good"] == s["rounds"] else f" ({s['rounds'] - s['good']} runs failed)"
                L.append(
                    f"| {sc} | {px} | {_cell(s['rps'], base.get('rps'))}{note} "
                    f"| {_cell(s['p50_ms'], base.get('p50_ms'))} "
                    f"| {_cell(s['p99_ms'], base.get('p99_ms'))} "
                    f"| {_cell(s['cpu_per_10k'], base.get('cpu_per_10k'), 3)} "
                    f"| {_cell(s['php_cpu_per_10k'], base.get('php_cpu_per_10k'), 3)} "
                    f"| {_cell(s['hwm_mib'], base.get('hwm_mib'), 1)} "
                    f"| {s['errors_total']} |"
                )
        L.append("")
        L.append("Scenarios:")
        for sc in scenarios:
            L.append(f"- {SCENARIO_TITLES[sc]}")
        L.append("")
        fair = [(sc, px) for sc in scenarios for px in proxies
                if (summ.get((sc, px)) or {}).get("conn_fairness") is not None]
        if fair:
            L.append("## Fairness across HTTP/2 connections")
            L.append("")
            L.append(
                "h2load's per-connection request rates: the slowest connection "
                "against their mean. Near 1 every client is served alike; near 0 some "
                "connections are served at full speed while others wait, and the req/s and "
                "latency above describe only the served ones."
            )
            L.append("")
            L.append("| scenario | proxy | slowest connection req/s | mean req/s | slowest / mean |")
            L.append("|---|---|---|---|---|")
            for sc, px in fair:
                s = summ[(sc, px)]
                L.append(
                    f"| {sc} | {px} | {_fmt(s['conn_min_rps'], 0)} | {_fmt(s['conn_mean_rps'], 0)} "
                    f"| {_fmt(s['conn_fairness'], 2)} |"
                )
            L.append("")
    if any(k[0] == "idle" for k in summ):
        L.append("## Idle keep-alive client connections")
        L.append("")
        L.append(
            "Each client connects, makes one request (to the responder), then stays idle; "
            "RSS growth of the proxy divided by the number of connections."
        )
        L.append("")
        L.append("| proxy | KiB/conn plain | KiB/conn TLS | connections (alive / opened) |")
        L.append("|---|---|---|---|")
        base = summ.get(("idle", "nginx"), {})
        for px in proxies:
            s = summ.get(("idle", px))
            if not s:
                continue
            if not s["good"]:
                L.append(f"| {px} | failed: {_short(s['failures'][0])} | | |")
                continue
            cells = []
            alive = []
            for kind in ("idle_plain", "idle_tls"):
                d = s.get(kind)
                b = base.get(kind, {}) or {}
                if d:
                    cells.append(_cell(d["kib_per_conn"], b.get("kib_per_conn"), 2))
                    alive.append(f"{d['alive']}/{d['n']}" + (f", {d['errors']} errors" if d["errors"] else ""))
                else:
                    cells.append("–")
            L.append(f"| {px} | {cells[0]} | {cells[1]} | {'; '.join(alive)} |")
        L.append("")
    if any(k[0] == "saturation" for k in summ):
        L.append("## Saturation: PHP is the bottleneck")
        L.append("")
        L.append(
            "sleep.php (50 ms) on 2 pools × 4 FPM workers (8 in all, ≤ 160 req/s), 64 HTTP/1.1 "
            "clients. fpmgate and HAProxy cap connections at 4 per endpoint and queue the rest "
            "(fpmgate queue size 128, timeout 10 s); nginx and Caddy leave the excess in "
            "FPM's listen backlog. Closed-loop keep-alive clients, time-out 5 s (then the "
            "client reconnects). Latency percentiles include the requests still waiting when "
            "the run ends, at their age then; starved clients = connections that completed "
            "no request in the whole run. Medians of rounds; error counts summed."
        )
        L.append("")
        L.append(
            "| proxy | req/s | p50 ms | p99 ms | max ms | non-2xx | time-outs | socket errors "
            "| starved clients | waiting at end (oldest ms) |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for px in proxies:
            s = summ.get(("saturation", px))
            if not s:
                continue
            if not s["good"]:
                L.append(f"| {px} | failed: {_short(s['failures'][0])} | | | | | | | | |")
                continue
            L.append(
                f"| {px} | {_fmt(s['rps'])} | {_fmt(s['p50_ms'])} | {_fmt(s['p99_ms'])} "
                f"| {_fmt(s['max_ms'])} | {s['non2xx_total']} | {s['timeouts_total']} "
                f"| {s['sock_errors_total']} | {_fmt(s['starved_conns'], 0)} "
                f"| {_fmt(s['pending_at_end'], 0)} ({_fmt(s['pending_max_ms'])}) |"
            )
        L.append("")
    rounds_all = sorted({r["round"] for r in records})
    if len(rounds_all) > 1 and scenarios:
        L.append("## Per round")
        L.append("")
        L.append(
            "req/s of each round (r1 / r2 / r3 …), to judge the noise behind the medians: the "
            "rounds are interleaved, so a load spike from elsewhere hits all proxies of a "
            "round alike only if it lasts the whole round."
        )
        L.append("")
        L.append("| scenario | " + " | ".join(proxies) + " |")
        L.append("|---|" + "---|" * len(proxies))
        for sc in scenarios + (["saturation"] if any(k[0] == "saturation" for k in summ) else []):
            cells = []
            for px in proxies:
                vals = []
                for rd in rounds_all:
                    r = next((x for x in records if x["scenario"] == sc and x["proxy"] == px and x["round"] == rd), None)
                    vals.append("×" if r is None or "error" in r or r.get("rps") is None else _fmt(r["rps"]))
                cells.append(" / ".join(vals))
            L.append(f"| {sc} | " + " | ".join(cells) + " |")
        L.append("")
    failed = [r for r in records if "error" in r]
    if failed:
        L.append("## Failed runs")
        L.append("")
        for r in failed:
            L.append(f"- {r['scenario']} / {r['proxy']} / round {r['round']}: {_short(r['error'], 400)}")
        L.append("")
    text = "\n".join(L)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


def cmd_line(args):
    """One progress line for the last record (read from stdin)."""
    r = json.loads(sys.stdin.read().strip().splitlines()[-1])
    head = f"{r['scenario']:<10} {r['proxy']:<8} r{r['round']}  "
    if "error" in r:
        print(head + "FAILED: " + r["error"])
        return
    d = r.get("idle_plain") or r.get("idle_tls")
    if d:
        kib = d.get("kib_per_conn")
        print(head + f"{_fmt(kib, 2)} KiB/conn, alive {d['alive']}/{d['n']}, errors {d['errors']}")
        return

    def g(k, f):
        return format(r[k], f) if r.get(k) is not None else "-"

    print(
        head
        + f"{g('rps', ',.0f')} req/s  p50 {g('p50_ms', '.2f')} p99 {g('p99_ms', '.2f')} ms  "
        + f"cpu/10k {g('cpu_per_10k', '.3f')} s  "
        + (f"php {g('php_cpu_per_10k', '.3f')} s  " if r.get("php_cpu_per_10k") else "")
        + f"peak {r.get('hwm_kib', 0) // 1024} MiB  "
        + f"errors {r.get('errors', 0)}"
    )


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
