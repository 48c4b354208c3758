#!/usr/bin/env python3
"""The load test's report (for loadtest/lt.py `report` and `line`): medians of the rounds,
ratios to nginx, the targets table. Python 3 standard library only."""

import json
import os
import statistics
import sys

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
