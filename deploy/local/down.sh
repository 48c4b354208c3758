#!/usr/bin/env bash
# Stops the local demo started by deploy/local/up.sh: exactly the processes named in its
# pidfiles (fpmgate first, so no request is in flight when the FPM masters go), and the
# /srv/fpmgate-demo link if it still points at this checkout. Logs stay in .run/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
RUN=$ROOT/deploy/local/.run
WWW=$ROOT/deploy/local/www
DEMO_LINK=/srv/fpmgate-demo

# True while pid $1 runs (a zombie awaiting its reaper counts as gone).
running() {
    local stat state
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    state=${stat##*) }   # fields after "(comm) "; the first is the state
    [ "${state%% *}" != Z ]
}

# stop NAME EXPECTED_COMMAND SIGNAL
stop() {
    local name=$1 expect=$2 sig=$3 pidfile="$RUN/$1.pid" pid comm
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if ! running "$pid"; then
        echo "$name: not running (stale pidfile removed)"
        rm -f "$pidfile"
        return 0
    fi
    # The pid may have been reused since up.sh ran: only signal the program we started.
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    if [[ "$comm" != "$expect"* ]]; then
        echo "$name: pid $pid is now '$comm', not $expect; leaving it alone"
        rm -f "$pidfile"
        return 0
    fi
    echo "$name: stopping pid $pid (SIG$sig)"
    kill -s "$sig" "$pid"
    local deadline=$((SECONDS + 15))
    while running "$pid"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "$name: still running after 15 s, sending SIGKILL"
            kill -s KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$pidfile"
}

if ! compgen -G "$RUN/*.pid" >/dev/null; then
    echo "local demo is not running"
else
    # fpmgate drains in-flight requests on SIGTERM; FPM's SIGQUIT is its graceful stop.
    stop fpmgate fpmgate TERM
    stop php-b php-fpm QUIT
    stop php-a php-fpm QUIT
fi

if [ -L "$DEMO_LINK" ] && [ "$(readlink "$DEMO_LINK")" = "$WWW" ]; then
    rm -f "$DEMO_LINK" 2>/dev/null || echo "note: could not remove $DEMO_LINK (not root?)"
fi
echo "local demo stopped"
