#!/usr/bin/env bash
# fpmgate load test: fpmgate against nginx, HAProxy and Caddy in front of PHP-FPM and of a
# fast FastCGI responder. Each proxy runs one worker pinned to one core; the load generator
# (and the responder) run on the other. See loadtest/README.md for the method.
#
#   loadtest/run.sh                  full run: 3 interleaved rounds, ~17 min → loadtest/RESULTS.md
#   loadtest/run.sh --quick          smoke run: 1 round, 2 s per run, ~2 min (report to stdout)
#   loadtest/run.sh --only fast-h1,idle [--proxies nginx,fpmgate] [--rounds N] [--out FILE]
#
# Scenarios: fast-h1 fast-h2 hello-h1 hello-h2 big-h1 post-h1 idle-h1 idle-tls saturation
# (groups: fast, hello, idle). Loopback only; every process started here is stopped on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# The real interpreter, not a version-manager shim (those cost ~0.2 s per call).
PY=$(python3 -c 'import sys; print(sys.executable)')
LT="$PY $HERE/lt.py"
ALL_SCENARIOS="fast-h1 fast-h2 hello-h1 hello-h2 big-h1 post-h1 idle-h1 idle-tls saturation"
ALL_PROXIES="nginx haproxy h2o caddy fpmgate"
ARGS_TEXT="$*"

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

MODE=full
ONLY=""
PROXIES=$ALL_PROXIES
ROUNDS=""
OUT=""
KEEP=0
INSTALL=1
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) MODE=quick ;;
        --only) ONLY=${2:?--only needs a scenario list}; shift ;;
        --only=*) ONLY=${1#*=} ;;
        --proxies) PROXIES=${2:?--proxies needs a list}; shift ;;
        --proxies=*) PROXIES=${1#*=} ;;
        --rounds) ROUNDS=${2:?--rounds needs a number}; shift ;;
        --out) OUT=${2:?--out needs a file}; shift ;;
        --keep) KEEP=1 ;;
        --no-install) INSTALL=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
PROXIES=${PROXIES//,/ }

# Scenario selection (groups expand).
SCENARIOS=""
if [ -z "$ONLY" ]; then
    SCENARIOS=$ALL_SCENARIOS
else
    for s in ${ONLY//,/ }; do
        case "$s" in
            fast) SCENARIOS+=" fast-h1 fast-h2" ;;
            hello) SCENARIOS+=" hello-h1 hello-h2" ;;
            idle) SCENARIOS+=" idle-h1 idle-tls" ;;
            big) SCENARIOS+=" big-h1" ;;
            post) SCENARIOS+=" post-h1" ;;
            fast-h1|fast-h2|hello-h1|hello-h2|big-h1|post-h1|idle-h1|idle-tls|saturation) SCENARIOS+=" $s" ;;
            *) echo "run.sh: unknown scenario $s (one of: $ALL_SCENARIOS; groups fast hello idle)" >&2; exit 2 ;;
        esac
    done
fi
for p in $PROXIES; do
    case " $ALL_PROXIES " in *" $p "*) ;; *) echo "run.sh: unknown proxy $p" >&2; exit 2 ;; esac
done

# Durations (seconds) and counts. Full: ~14 min of runs; quick: ~2 min.
if [ "$MODE" = quick ]; then
    : "${ROUNDS:=1}"
    D_FAST=2 D_HELLO=2 D_BIG=2 D_POST=2 D_SAT=3 IDLE_N=1000
else
    : "${ROUNDS:=3}"
    D_FAST=8 D_HELLO=6 D_BIG=5 D_POST=5 D_SAT=8 IDLE_N=5000
fi
H1_CONNS=64       # wrk -t1 -c64
H2_CONNS=16       # h2load -c16 -m16
H2_STREAMS=16
SAT_CONNS=64
PROXY_CPU=${LT_PROXY_CPU:-0}
LOAD_CPU=${LT_LOAD_CPU:-1}

# Where the report goes: a complete default full run refreshes loadtest/RESULTS.md; any other
# run prints its report and writes it to --out or /tmp/fpmgate-loadtest-last.md.
if [ -z "$OUT" ]; then
    if [ "$MODE" = full ] && [ -z "$ONLY" ] && [ "$PROXIES" = "$ALL_PROXIES" ] && [ "$ROUNDS" = 3 ]; then
        OUT=$HERE/RESULTS.md
    else
        OUT=/tmp/fpmgate-loadtest-last.md
    fi
fi

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------
# Tools: install what is missing (Debian packages), build fpmgate and the responder.

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

php_fpm_bin() {
    if [ -n "${FPMGATE_PHP_FPM:-}" ]; then echo "$FPMGATE_PHP_FPM"; return; fi
    local n d
    for n in php-fpm8.2 php-fpm; do
        for d in $(echo "$PATH" | tr ':' ' ') /usr/sbin; do
            [ -x "$d/$n" ] && { echo "$d/$n"; return; }
        done
    done
    # Any other Debian PHP version.
    ls /usr/sbin/php-fpm* 2>/dev/null | sort -V | tail -n1
}

install_missing() {
    local pkgs=()
    have nginx || pkgs+=(nginx-light)
    have haproxy || pkgs+=(haproxy)
    have h2o || pkgs+=(h2o)
    have caddy || pkgs+=(caddy)
    have wrk || pkgs+=(wrk)
    have h2load || pkgs+=(nghttp2-client)
    have openssl || pkgs+=(openssl)
    have curl || pkgs+=(curl)
    have taskset || pkgs+=(util-linux)
    have ss || pkgs+=(iproute2)
    [ -n "$(php_fpm_bin)" ] || pkgs+=(php-fpm)
    [ ${#pkgs[@]} -eq 0 ] && return 0
    [ "$INSTALL" = 1 ] || die "missing: ${pkgs[*]} (rerun without --no-install)"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    log "installing ${pkgs[*]}"
    # Packages must not start their system services (nginx on :80, haproxy, caddy): a
    # policy-rc.d that says "no" for the duration of the install, unless one exists.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
        made_policy=1
    fi
    local rc=0
    $sudo apt-get update -qq || rc=$?
    [ $rc = 0 ] && { DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null || rc=$?; }
    [ $made_policy = 1 ] && $sudo rm -f "$policy"
    [ $rc = 0 ] || die "apt-get install ${pkgs[*]} failed"
}

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
FPMGATE_BIN=${FPMGATE_BIN:-$TARGET/release/fpmgate}
RESPONDER_BIN=${RESPONDER_BIN:-$TARGET/release/examples/fcgi_responder}

build() {
    local try
    for try in 1 2 3; do
        log "cargo build --release --bin fpmgate --example fcgi_responder (try $try)"
        if (cd "$ROOT" && nice cargo build --release --bin fpmgate --example fcgi_responder >"$RUN/build.log" 2>&1); then
            return 0
        fi
        tail -n 20 "$RUN/build.log" >&2
        # Others edit the tree in parallel: a broken build may be fixed in a moment.
        [ $try -lt 3 ] && { log "build failed; retrying in 30 s"; sleep 30; }
    done
    die "cargo build failed (see above)"
}

# ---------------------------------------------------------------------------------------
# Process bookkeeping: everything started here is stopped on exit.

RUN=$(mktemp -d /tmp/fpmgate-loadtest.XXXXXX)
BG_PIDS=()          # long-lived helpers (FPM master, responder), stopped at exit
PROXY_PID=""        # the proxy of the current run
FPM_PID=""
# PHP writes every request body over 16 KiB to a temporary file (post.php's 100 KiB bodies:
# one create, write and unlink per request). On a disk filesystem that measures the journal
# and its write-back, which carries over from one run to the next (post-h1 moved between
# 5k and 8k req/s for the same proxy); on tmpfs it measures the proxies.
PHP_TMP=$(mktemp -d /dev/shm/fpmgate-loadtest-php.XXXXXX 2>/dev/null) || PHP_TMP=""

stop_pid() { # pid [grace seconds]
    local pid=$1 grace=${2:-10} i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 20; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "$PROXY_PID" ] && stop_pid "$PROXY_PID" 5
    local fpm_workers=""
    [ -n "$FPM_PID" ] && fpm_workers=$(pgrep -P "$FPM_PID" 2>/dev/null || true)
    local i
    for ((i = ${#BG_PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${BG_PIDS[$i]}" 10
    done
    # FPM workers exit with their master; SIGKILL any that did not (still php-fpm only).
    for pid in $fpm_workers; do
        case "$(cat "/proc/$pid/comm" 2>/dev/null)" in php-fpm*) kill -KILL "$pid" 2>/dev/null || true ;; esac
    done
    [ -n "$PHP_TMP" ] && rm -rf "$PHP_TMP"
    if [ "$KEEP" = 1 ] || [ $rc != 0 ]; then
        log "run directory kept: $RUN"
    else
        rm -rf "$RUN"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------
# Setup

install_missing
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
H2O=$(command -v h2o || echo /usr/sbin/h2o)
CADDY=$(command -v caddy)
FPM=$(php_fpm_bin)
# LT_NO_BUILD=1 uses the binaries as they are (FPMGATE_BIN / RESPONDER_BIN may point elsewhere).
[ "${LT_NO_BUILD:-0}" = 1 ] || build
[ -x "$FPMGATE_BIN" ] || die "no fpmgate binary at $FPMGATE_BIN"
[ -x "$RESPONDER_BIN" ] || die "no responder binary at $RESPONDER_BIN"

NCPU=$(nproc)
if [ "$NCPU" -lt 2 ]; then
    log "WARNING: $NCPU CPU: proxy and load generator share it (no pinning)"
    PIN_PROXY=""
    PIN_LOAD=""
else
    PIN_PROXY="taskset -c $PROXY_CPU"
    PIN_LOAD="taskset -c $LOAD_CPU"
fi

# 5,000 idle clients and as many proxy sockets, plus upstreams.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if [ "$NOFILE" != unlimited ] && [ "$NOFILE" -lt $((IDLE_N * 2 + 512)) ]; then
    IDLE_N=$(((NOFILE - 512) / 2))
    log "WARNING: ulimit -n is $NOFILE: idle test uses $IDLE_N connections"
fi

read -r H1 TLS ADMIN RP P1 P2 S1 S2 <<<"$($LT ports 8)"
DOCROOT=$HERE/php
mkdir -p "$RUN/tls" "$RUN/conf" "$RUN/logs" "$RUN/nginx" "$RUN/h2o" "$RUN/fpm" "$RUN/caddy" "$RUN/out"
log "run directory $RUN; ports: http $H1, https $TLS, responder $RP, fpm $P1 $P2, sat $S1 $S2"

# Self-signed certificate (ECDSA P-256) for 127.0.0.1 / localhost.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$RUN/tls/key.pem" -out "$RUN/tls/cert.pem" 2>/dev/null
cat "$RUN/tls/cert.pem" "$RUN/tls/key.pem" >"$RUN/tls/combined.pem"

# Config templates → $RUN/conf.
CPUMASK="1$(printf '%*s' "$PROXY_CPU" '' | tr ' ' 0)"
USER_LINE="" H2O_USER=""
[ "$(id -u)" = 0 ] && USER_LINE="user root root;" && H2O_USER="user: root"
render() { # template output
    sed -e "s|@H1@|$H1|g; s|@TLS@|$TLS|g; s|@ADMIN@|$ADMIN|g; s|@RP@|$RP|g" \
        -e "s|@P1@|$P1|g; s|@P2@|$P2|g; s|@S1@|$S1|g; s|@S2@|$S2|g" \
        -e "s|@RUN@|$RUN|g; s|@DOCROOT@|$DOCROOT|g; s|@PROXY_CPU@|$PROXY_CPU|g" \
        -e "s|@CERT@|$RUN/tls/cert.pem|g; s|@KEY@|$RUN/tls/key.pem|g; s|@PEM@|$RUN/tls/combined.pem|g" \
        -e "s|@NGINX_CPUMASK@|$CPUMASK|g; s|@USER_LINE@|$USER_LINE|g; s|@H2O_USER@|$H2O_USER|g" "$1" >"$2"
}
render "$HERE/conf/nginx.conf.in" "$RUN/conf/nginx.conf"
render "$HERE/conf/haproxy.cfg.in" "$RUN/conf/haproxy.cfg"
render "$HERE/conf/h2o.conf.in" "$RUN/conf/h2o.conf"
render "$HERE/conf/Caddyfile.in" "$RUN/conf/Caddyfile"
render "$HERE/conf/fpmgate.yaml.in" "$RUN/conf/fpmgate.yaml"
"$FPMGATE_BIN" check --config "$RUN/conf/fpmgate.yaml" >/dev/null || die "fpmgate check failed"
"$NGINX" -t -q -p "$RUN/nginx" -c "$RUN/conf/nginx.conf" -e "$RUN/nginx/error.log" || die "nginx -t failed"
"$HAPROXY" -c -q -f "$RUN/conf/haproxy.cfg" || die "haproxy -c failed"
"$H2O" -t -c "$RUN/conf/h2o.conf" >/dev/null 2>&1 || die "h2o -t failed: $("$H2O" -t -c "$RUN/conf/h2o.conf" 2>&1 | tail -n 2)"

# PHP-FPM: one master, pools a/b (64 workers each) for the PHP scenarios, s1/s2 (4 each) for
# saturation. Generated as the test harness does (tests/support/fpm.rs): stock php.ini,
# static workers, no request limit; FPM is not pinned (it shares both cores).
fpm_pool() { # name port workers
    echo "[$1]"
    [ "$(id -u)" = 0 ] && printf 'user = root\ngroup = root\n'
    cat <<EOF
listen = 127.0.0.1:$2
listen.backlog = 511
pm = static
pm.max_children = $3
pm.max_requests = 0
catch_workers_output = yes
decorate_workers_output = no
security.limit_extensions = .php
php_admin_flag[log_errors] = on
php_admin_flag[display_errors] = off
php_admin_value[memory_limit] = 128M
php_admin_value[upload_tmp_dir] = ${PHP_TMP:-$RUN/fpm}

EOF
}
{
    cat <<EOF
; Generated by loadtest/run.sh.
[global]
pid = $RUN/fpm/php-fpm.pid
error_log = $RUN/fpm/fpm-error.log
log_level = notice
daemonize = no
process_control_timeout = 5s

EOF
    fpm_pool a "$P1" 64
    fpm_pool b "$P2" 64
    fpm_pool s1 "$S1" 4
    fpm_pool s2 "$S2" 4
} >"$RUN/fpm/php-fpm.conf"

log "starting PHP-FPM ($FPM) and the FastCGI responder"
"$FPM" -F -R -y "$RUN/fpm/php-fpm.conf" -p "$RUN/fpm" >"$RUN/fpm/stderr.log" 2>&1 &
FPM_PID=$!
BG_PIDS+=("$FPM_PID")
$PIN_LOAD "$RESPONDER_BIN" "127.0.0.1:$RP" >"$RUN/logs/responder.log" 2>&1 &
BG_PIDS+=("$!")
for port in $RP $P1 $P2 $S1 $S2; do
    $LT wait-port "$port" 15 || { cat "$RUN/fpm/fpm-error.log" "$RUN/fpm/stderr.log" >&2 2>/dev/null; die "nothing listens on $port"; }
done
for ((i = 0; i < 200; i++)); do
    grep -q "ready to handle connections" "$RUN/fpm/fpm-error.log" 2>/dev/null && break
    sleep 0.05
done

# 100 KiB body for h2load warm-ups of post-h1 (wrk uses post.lua).
$PY -c 'import sys; sys.stdout.write("0123456789abcdef" * 6400)' >"$RUN/post.bin"

# ---------------------------------------------------------------------------------------
# Proxies

# Process ids whose CPU is counted (all) and whose memory is counted (the serving processes:
# nginx's master only forks and supervises, its pages are shared with the worker).
proxy_cpu_pids() { echo "$PROXY_PID" $(pgrep -P "$PROXY_PID" 2>/dev/null || true); }
proxy_mem_pids() {
    if [ "$CUR_PROXY" = nginx ]; then
        pgrep -P "$PROXY_PID" 2>/dev/null || echo "$PROXY_PID"
    else
        echo "$PROXY_PID"
    fi
}

start_proxy() { # proxy logfile
    CUR_PROXY=$1
    local logf=$2
    case "$1" in
        nginx) $PIN_PROXY "$NGINX" -p "$RUN/nginx" -c "$RUN/conf/nginx.conf" -e "$RUN/nginx/error.log" >"$logf" 2>&1 & ;;
        haproxy) $PIN_PROXY "$HAPROXY" -db -f "$RUN/conf/haproxy.cfg" >"$logf" 2>&1 & ;;
        h2o) $PIN_PROXY "$H2O" -m worker -c "$RUN/conf/h2o.conf" >"$logf" 2>&1 & ;;
        caddy) HOME=$RUN/caddy XDG_DATA_HOME=$RUN/caddy XDG_CONFIG_HOME=$RUN/caddy GOMAXPROCS=1 \
            $PIN_PROXY "$CADDY" run --config "$RUN/conf/Caddyfile" --adapter caddyfile >"$logf" 2>&1 & ;;
        fpmgate) RUST_LOG=${LT_RUST_LOG:-warn} $PIN_PROXY "$FPMGATE_BIN" run --config "$RUN/conf/fpmgate.yaml" >"$logf" 2>&1 & ;;
    esac
    PROXY_PID=$!
    $LT wait-port "$H1" 10 && $LT wait-port "$TLS" 10 || return 1
    # nginx forks its worker after binding: wait for it.
    if [ "$1" = nginx ]; then
        for ((i = 0; i < 100; i++)); do
            [ -n "$(pgrep -P "$PROXY_PID" 2>/dev/null)" ] && break
            sleep 0.02
        done
    fi
    kill -0 "$PROXY_PID" 2>/dev/null
}

stop_proxy() {
    [ -n "$PROXY_PID" ] && stop_pid "$PROXY_PID" 5
    PROXY_PID=""
}

# Isolation: the next run starts only when no connection to FPM or the responder is left
# (idle kept connections of one proxy would pin FPM workers and starve the next).
wait_drain() {
    local filter="( sport = :$RP or sport = :$P1 or sport = :$P2 or sport = :$S1 or sport = :$S2 )"
    local i n=0
    for ((i = 0; i < 300; i++)); do
        # Sockets FPM (or the responder) still holds open: served, or waiting in its backlog.
        # FIN-WAIT/LAST-ACK/TIME-WAIT ones are closed on that side and pin nothing.
        n=$(ss -Htan state established state close-wait state syn-recv "$filter" | wc -l)
        [ "$n" -eq 0 ] && return 0
        sleep 0.05
    done
    log "WARNING: $n FastCGI connections still open after 15 s"
}

# ---------------------------------------------------------------------------------------
# Scenarios

URL_H1=http://127.0.0.1:$H1
URL_TLS=https://127.0.0.1:$TLS

scenario_path() {
    case "$1" in
        fast-*|idle-*) echo /fast/ ;;
        hello-*) echo /hello.php ;;
        big-h1) echo /big.php ;;
        post-h1) echo /post.php ;;
        saturation) echo /sleep.php ;;
    esac
}

# One request with curl, checking that the proxy routes it where it should: the responder
# says "hello", PHP says "Hello, PHP", big.php sends 1 MiB, post.php echoes the body length.
check_response() { # scenario
    local sc=$1 path body expect
    path=$(scenario_path "$sc")
    local curl=(curl -sS --max-time 10)
    case "$sc" in
        *-h2|idle-tls) curl+=(-k --http2 "$URL_TLS$path") ;;
        *) curl+=("$URL_H1$path") ;;
    esac
    case "$sc" in
        fast-*|idle-*) expect="hello" ;;
        hello-*) expect="Hello, PHP" ;;
        big-h1) expect="1048576" ;;
        post-h1) expect="102400 " ;;
        saturation) expect="slept" ;;
    esac
    if [ "$sc" = big-h1 ]; then
        body=$("${curl[@]}" -o /dev/null -w '%{size_download}' 2>&1) || true
    elif [ "$sc" = post-h1 ]; then
        body=$("${curl[@]}" --data-binary "@$RUN/post.bin" -H 'Content-Type: application/octet-stream' 2>&1) || true
    else
        body=$("${curl[@]}" 2>&1) || true
    fi
    case "$body" in
        "$expect"*) return 0 ;;
        *) echo "unexpected response to $path: $(echo "$body" | head -c 120 | tr '\n' ' ')"; return 1 ;;
    esac
}

warmup() { # scenario out
    local sc=$1 out=$2 path
    path=$(scenario_path "$sc")
    local t=(timeout -k 2 20)
    case "$sc" in
        *-h2) "${t[@]}" $PIN_LOAD h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -n 2000 "$URL_TLS$path" ;;
        big-h1) "${t[@]}" $PIN_LOAD h2load --h1 -t1 -c16 -n 64 "$URL_H1$path" ;;
        post-h1) "${t[@]}" $PIN_LOAD h2load --h1 -t1 -c16 -n 500 -d "$RUN/post.bin" "$URL_H1$path" ;;
        # One client: a concurrent warm-up would already saturate the 8 workers.
        saturation) "${t[@]}" $PIN_LOAD h2load --h1 -t1 -c1 -n 8 "$URL_H1$path" ;;
        *) "${t[@]}" $PIN_LOAD h2load --h1 -t1 -c16 -n 500 "$URL_H1$path" ;;
    esac >"$out" 2>&1 || true
    grep -qE 'requests: [0-9]+ total, [0-9]+ started, [0-9]+ done, [1-9][0-9]* succeeded, 0 failed' "$out"
}

# Runs the measured load; prints the tool name for `lt.py record`.
measure() { # scenario out h2log
    local sc=$1 out=$2 h2log=$3 path
    path=$(scenario_path "$sc")
    # Every tool is bounded by its duration; `timeout` is only a safety net.
    local PIN_LOAD="timeout -k 5 120 $PIN_LOAD"
    case "$sc" in
        fast-h1) $PIN_LOAD wrk -t1 -c$H1_CONNS -d${D_FAST}s --latency "$URL_H1$path" >"$out" 2>&1; echo wrk ;;
        hello-h1) $PIN_LOAD wrk -t1 -c$H1_CONNS -d${D_HELLO}s --latency "$URL_H1$path" >"$out" 2>&1; echo wrk ;;
        big-h1) $PIN_LOAD wrk -t1 -c$H1_CONNS -d${D_BIG}s --latency "$URL_H1$path" >"$out" 2>&1; echo wrk ;;
        post-h1) $PIN_LOAD wrk -t1 -c$H1_CONNS -d${D_POST}s --latency -s "$HERE/post.lua" "$URL_H1$path" >"$out" 2>&1; echo wrk ;;
        saturation) $PIN_LOAD $LT sat --port "$H1" --path "$path" --conns $SAT_CONNS --duration "$D_SAT" --timeout 5 >"$out" 2>&1; echo sat ;;
        fast-h2) $PIN_LOAD h2load -t1 -c$H2_CONNS -m$H2_STREAMS -D $D_FAST --log-file="$h2log" "$URL_TLS$path" >"$out" 2>&1; echo h2load ;;
        hello-h2) $PIN_LOAD h2load -t1 -c$H2_CONNS -m$H2_STREAMS -D $D_HELLO --log-file="$h2log" "$URL_TLS$path" >"$out" 2>&1; echo h2load ;;
        idle-h1) $PIN_LOAD $LT idle --port "$H1" --n "$IDLE_N" --pids $(proxy_mem_pids) >"$out" 2>&1; echo idle ;;
        idle-tls) $PIN_LOAD $LT idle --port "$TLS" --tls --n "$IDLE_N" --pids $(proxy_mem_pids) >"$out" 2>&1; echo idle ;;
    esac
}

RESULTS=$RUN/results.jsonl
: >"$RESULTS"

run_one() { # scenario proxy round
    local sc=$1 px=$2 rd=$3
    local base=$RUN/out/$sc.$px.$rd
    local err="" tool=none c0="" c1="" hwm="" f0="" f1="" fpids=""
    if ! start_proxy "$px" "$base.proxy.log"; then
        err="$px did not start: $(tail -n 3 "$base.proxy.log" | tr '\n' ' ')"
    elif ! err=$(check_response "$sc"); then
        :
    elif ! warmup "$sc" "$base.warmup"; then
        err="warm-up failed: $(grep -E '^(requests|status codes):' "$base.warmup" | tr '\n' ' ')"
    else
        err=""
        local pids
        pids=$(proxy_cpu_pids)
        # PHP's CPU too where PHP serves: what PHP spends per request behind this proxy.
        case "$sc" in fast-*|idle-*) ;; *) fpids=$(pgrep -P "$FPM_PID" 2>/dev/null || true) ;; esac
        [ -n "$fpids" ] && f0=$($LT cpu $fpids)
        c0=$($LT cpu $pids)
        tool=$(measure "$sc" "$base.out" "$base.h2log") || true
        c1=$($LT cpu $pids)
        [ -n "$fpids" ] && f1=$($LT cpu $fpids)
        hwm=$($LT hwm $(proxy_mem_pids))
        if [ "$tool" = h2load ] && ! grep -q 'Application protocol: h2' "$base.out"; then
            err="h2load did not negotiate h2"
        fi
    fi
    stop_proxy
    wait_drain
    local rec=(--scenario "$sc" --proxy "$px" --round "$rd" --tool "$tool" --out "$base.out" --log "$base.h2log")
    [ -n "$c0" ] && rec+=(--cpu0 "$c0" --cpu1 "$c1" --hwm "$hwm")
    [ -n "$f0" ] && rec+=(--php-cpu0 "$f0" --php-cpu1 "$f1")
    [ -n "$err" ] && rec+=(--error "$err")
    $LT record "${rec[@]}" >>"$RESULTS"
    rm -f "$base.h2log"
    log "$(tail -n 1 "$RESULTS" | $LT line)"
}

# ---------------------------------------------------------------------------------------
# Main loop: rounds × scenarios × proxies, interleaved. Each round starts one proxy later,
# and every second round runs backwards (A B C D E, A E D C B, C D E A B, ...): no proxy
# always runs at the same place, and none always right after the same peer (rotation alone
# keeps every proxy's predecessor).

START=$(date +%s)
log "mode $MODE, $ROUNDS round(s); scenarios:$SCENARIOS; proxies: $PROXIES"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
read -r -a PROXY_LIST <<<"$PROXIES"
for ((round = 1; round <= ROUNDS; round++)); do
    ORDER=()
    NPX=${#PROXY_LIST[@]}
    for ((i = 0; i < NPX; i++)); do
        if ((round % 2 == 0)); then
            ORDER+=("${PROXY_LIST[(NPX - 1 - i + round - 1) % NPX]}")
        else
            ORDER+=("${PROXY_LIST[(i + round - 1) % NPX]}")
        fi
    done
    for sc in $SCENARIOS; do
        for px in "${ORDER[@]}"; do
            # h2o cannot balance FastCGI: half the workers of the others (see h2o.conf.in).
            [ "$px" = h2o ] && [ "$sc" = saturation ] && continue
            run_one "$sc" "$px" "$round"
        done
    done
done
ELAPSED=$(($(date +%s) - START))
log "runs took ${ELAPSED}s"
if grep -q '"error"' "$RESULTS"; then
    KEEP=1
    log "some runs failed: their configs, logs and tool output stay in $RUN/out"
fi

# ---------------------------------------------------------------------------------------
# Report

version_of() { "$@" 2>&1 | head -n 1 | tr -d '\r' || true; }
export META_COMMAND="loadtest/run.sh${ARGS_TEXT:+ $ARGS_TEXT}"
export META_DATE="$(date -u '+%Y-%m-%d %H:%M UTC')"
export META_MACHINE="$NCPU CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, Linux $(uname -r))"
export META_MODE="$MODE: $ROUNDS round(s), interleaved; durations fast ${D_FAST}s, hello ${D_HELLO}s, 1 MiB ${D_BIG}s, POST ${D_POST}s, saturation ${D_SAT}s; $IDLE_N idle connections; runs took ${ELAPSED}s"
export META_NOTES="proxy pinned to CPU $PROXY_CPU, wrk/h2load/responder pinned to CPU $LOAD_CPU, PHP-FPM unpinned; load average (1/5/15 min) before the runs: $LOAD_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg)"
export META_V_FPMGATE="$(version_of "$FPMGATE_BIN" --version) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ', with uncommitted changes'))"
export META_V_NGINX="$(version_of "$NGINX" -v)"
export META_V_HAPROXY="$(version_of "$HAPROXY" -v)"
export META_V_H2O="$(version_of "$H2O" --version)"
export META_V_CADDY="caddy $(version_of "$CADDY" version)"
export META_V_PHP="$(version_of "$FPM" -v)"
export META_V_TOOLS="$(version_of wrk -v), $(version_of h2load --version)"
$PY - "$RUN/meta.json" <<'EOF'
import json, os, sys
e = os.environ
meta = {
    "command": f"`{e['META_COMMAND']}`",
    "date": e["META_DATE"],
    "machine": e["META_MACHINE"],
    "mode": e["META_MODE"],
    "versions": [e[k] for k in ("META_V_FPMGATE", "META_V_NGINX", "META_V_HAPROXY", "META_V_H2O", "META_V_CADDY", "META_V_PHP", "META_V_TOOLS")],
    "notes": e["META_NOTES"],
}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
EOF
$LT report "$RESULTS" --meta "$RUN/meta.json" --out "$OUT" >/dev/null
# The raw per-run records beside the report (lt.py report FILE.jsonl re-renders it).
cp "$RESULTS" "${OUT%.md}.jsonl"
cat "$OUT"
echo
log "report written to $OUT"
