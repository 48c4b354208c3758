#!/usr/bin/env bash
# Runs the local demo: two PHP-FPM masters (pool php-a on TCP 127.0.0.1:9101, pool php-b on
# a unix socket) and a release build of fpmgate with config/local.yaml in front of them.
# Everything it starts is recorded in pidfiles under deploy/local/.run/ (git-ignored), and
# deploy/local/down.sh stops exactly that. Running it again while up only prints the URLs.
#
# Needs php8.2-fpm (installed with apt-get when missing, which needs root) and, because
# FPM must see the demo app at the absolute root named in config/local.yaml, a symlink
# /srv/fpmgate-demo -> deploy/local/www (created here; root or an existing link needed).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
RUN=$ROOT/deploy/local/.run
WWW=$ROOT/deploy/local/www
DEMO_LINK=/srv/fpmgate-demo
CONFIG=$ROOT/config/local.yaml
HTTP_PORT=8080
ADMIN_PORT=9180
PHP_A_PORT=9101

die() {
    echo "error: $*" >&2
    exit 1
}

# True while pid $1 runs (a zombie awaiting its reaper counts as gone).
running() {
    local stat state
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    state=${stat##*) }   # fields after "(comm) "; the first is the state
    [ "${state%% *}" != Z ]
}

# A pidfile whose process is running.
alive() {
    [ -s "$RUN/$1.pid" ] && running "$(cat "$RUN/$1.pid")"
}

# Something already accepts connections on 127.0.0.1:$1 (bash's /dev/tcp, no extra tools).
port_busy() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

print_urls() {
    cat <<EOF

fpmgate local demo is up:
  site on pool php_a   http://127.0.0.1:$HTTP_PORT/
  site on pool php_b   http://b.localhost:$HTTP_PORT/   (curl resolves *.localhost itself)
                       curl -H 'Host: b.localhost' http://127.0.0.1:$HTTP_PORT/
  metrics              http://127.0.0.1:$ADMIN_PORT/metrics
  status               http://127.0.0.1:$ADMIN_PORT/status
  logs                 deploy/local/.run/*.log
  stop                 deploy/local/down.sh
EOF
}

find_fpm() {
    command -v php-fpm8.2 || command -v php-fpm ||
        { [ -x /usr/sbin/php-fpm8.2 ] && echo /usr/sbin/php-fpm8.2; } ||
        { [ -x /usr/sbin/php-fpm ] && echo /usr/sbin/php-fpm; } || true
}

if alive fpmgate && alive php-a && alive php-b; then
    echo "already up (deploy/local/down.sh stops it)"
    print_urls
    exit 0
fi
if compgen -G "$RUN/*.pid" >/dev/null; then
    echo "==> a previous run is partly up: stopping it first"
    bash "$ROOT/deploy/local/down.sh"
fi

# --- dependencies ---------------------------------------------------------------------
missing=()
[ -n "$(find_fpm)" ] || missing+=(php8.2-fpm php8.2-cli)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] ||
        die "missing ${missing[*]}; install as root: apt-get install -y ${missing[*]}"
    echo "==> installing ${missing[*]}"
    # policy-rc.d exit 101 keeps the Debian php8.2-fpm service from starting: the demo
    # runs its own masters. An existing policy-rc.d is left alone.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
fi
FPM=$(find_fpm)
[ -n "$FPM" ] || die "php-fpm not found after install"

# --- ports ----------------------------------------------------------------------------
for port in "$PHP_A_PORT" "$HTTP_PORT" "$ADMIN_PORT"; do
    if port_busy "$port"; then
        die "127.0.0.1:$port is already in use; stop whatever listens there (ss -ltnp) or change the port in config/local.yaml and deploy/local/up.sh"
    fi
done

# --- document root as FPM sees it -----------------------------------------------------
if [ -L "$DEMO_LINK" ] || [ ! -e "$DEMO_LINK" ]; then
    if [ "$(readlink "$DEMO_LINK" || true)" != "$WWW" ]; then
        ln -sfn "$WWW" "$DEMO_LINK" 2>/dev/null ||
            die "cannot create $DEMO_LINK; as root run: ln -sfn '$WWW' $DEMO_LINK"
    fi
else
    die "$DEMO_LINK exists and is not a symlink; move it away (the demo links it to deploy/local/www)"
fi

# --- build ----------------------------------------------------------------------------
echo "==> cargo build --release"
cargo build --release
FPMGATE=$ROOT/target/release/fpmgate

mkdir -p "$RUN"
# The run dir ignores itself, so nothing in it is ever committed.
printf '*\n' >"$RUN/.gitignore"

# From here on, a failure stops whatever was started.
started=0
cleanup_on_failure() {
    if [ "$started" = 1 ]; then
        echo "==> start failed; stopping what was started" >&2
        bash "$ROOT/deploy/local/down.sh" >&2 || true
    fi
}
trap cleanup_on_failure EXIT

# --- PHP-FPM --------------------------------------------------------------------------
# As root, workers run as www-data when it can read the app; a checkout under a private
# home directory cannot be read by www-data, and then the demo falls back to root (-R),
# acceptable only because everything listens on loopback.
fpm_flags=()
user_lines=""
if [ "$(id -u)" -eq 0 ]; then
    if id www-data >/dev/null 2>&1 &&
        runuser -u www-data -- test -r "$DEMO_LINK/index.php" 2>/dev/null; then
        user_lines=$'user = www-data\ngroup = www-data'
    else
        echo "note: www-data cannot read $WWW; FPM workers will run as root (local demo only)"
        user_lines=$'user = root\ngroup = root'
        fpm_flags+=(-R)
    fi
fi

write_fpm_conf() {
    local name=$1 listen=$2
    cat >"$RUN/$name.conf" <<EOF
; Generated by deploy/local/up.sh for the local demo (pool $name).
[global]
pid = $RUN/$name.pid
error_log = $RUN/$name.log
daemonize = yes
; A graceful stop (SIGQUIT) waits this long for in-flight requests.
process_control_timeout = 10s

[$name]
$user_lines
listen = $listen
listen.mode = 0660
pm = dynamic
pm.max_children = 5
pm.start_servers = 2
pm.min_spare_servers = 1
pm.max_spare_servers = 3
pm.max_requests = 500
; fpmgate health-checks /ping and scrapes /fpm-status (config/local.yaml).
ping.path = /ping
ping.response = pong
pm.status_path = /fpm-status
catch_workers_output = yes
decorate_workers_output = no
env[APP_POOL] = $name
; Recommended for any FPM behind a proxy: only .php files run, and PHP never walks up
; a path to find a script (fpmgate already sends SCRIPT_FILENAME and PATH_INFO split).
security.limit_extensions = .php
php_admin_value[cgi.fix_pathinfo] = 0
EOF
}

start_fpm() {
    local name=$1
    # With daemonize = yes, php-fpm returns only once the master is ready (or failed).
    if ! "$FPM" "${fpm_flags[@]}" -y "$RUN/$name.conf" -p "$RUN"; then
        tail -n 20 "$RUN/$name.log" >&2 || true
        die "php-fpm pool $name did not start (log: deploy/local/.run/$name.log)"
    fi
    echo "    php-fpm $name: pid $(cat "$RUN/$name.pid")"
}

echo "==> starting PHP-FPM pools"
write_fpm_conf php-a "127.0.0.1:$PHP_A_PORT"
write_fpm_conf php-b "$RUN/php-b.sock"
started=1
start_fpm php-a
start_fpm php-b

# --- fpmgate --------------------------------------------------------------------------
echo "==> starting fpmgate"
# One log per run, so a failure's tail below is about this run.
nohup "$FPMGATE" run --config "$CONFIG" >"$RUN/fpmgate.log" 2>&1 </dev/null &
echo $! >"$RUN/fpmgate.pid"
echo "    fpmgate: pid $(cat "$RUN/fpmgate.pid"), log deploy/local/.run/fpmgate.log"

# Wait (bounded) until both vhosts serve a page: health checks must mark the pools up.
deadline=$((SECONDS + 30))
until curl -fs -o /dev/null --max-time 2 "http://127.0.0.1:$HTTP_PORT/" &&
    curl -fs -o /dev/null --max-time 2 -H 'Host: b.localhost' "http://127.0.0.1:$HTTP_PORT/"; do
    if ! alive fpmgate; then
        tail -n 30 "$RUN/fpmgate.log" >&2 || true
        die "fpmgate exited (log: deploy/local/.run/fpmgate.log)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        tail -n 30 "$RUN/fpmgate.log" >&2 || true
        die "no page from http://127.0.0.1:$HTTP_PORT/ after 30 s"
    fi
    sleep 0.5
done

started=0
trap - EXIT
print_urls
