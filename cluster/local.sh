#!/usr/bin/env bash
# A single-node Ray head on 127.0.0.1 for local testing of `ray job submit`.
#
#   cluster/local.sh up        # start it (token authentication on), print how to submit
#   cluster/local.sh status    # is it running; its addresses
#   cluster/local.sh down      # stop it: only the processes this script started
#
#   eval "$(cluster/local.sh env)"   # export RAY_ADDRESS, RAY_AUTH_MODE (and the token path)
#   ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
#       python jobs/train.py --config jobs/configs/mnist_cnn.yaml --data-dir "$PWD/../shared/datasets/mnist"
#
# Everything listens on 127.0.0.1 only (node, GCS, raylet, dashboard/job API, client
# server, Serve's HAProxy with its stats and metrics ports), on free ports picked at start, with a private --temp-dir, so the head never
# collides with another Ray on the same machine. `down` never runs `ray stop` (that kills
# every Ray process on the machine): it sends SIGTERM to the `ray start --block` it launched
# (under setsid, so the head and all it spawns form their own session), then ends what is
# left of exactly this head: processes in that session, and job drivers (Ray gives each a
# session of its own) whose working directory lies in the head's private temp dir.
#
# Settings (environment):
#   CNNRAY_LOCAL_HOME  state folder (pid, addresses, log); default ~/.cnnray/local
#   CNNRAY_NUM_CPUS    logical CPUs the head offers; default: all cores (nproc)
#   CNNRAY_NUM_GPUS    GPUs the head offers; default: Ray's own detection
#   CNNRAY_OBJECT_STORE_BYTES  shared-memory object store; default 1 GiB (cnnray moves
#                      tensors through files and the network, not the object store)
#   CNNRAY_DRAIN_TIMEOUT_S  how long `down` lets the node drain first; default 5 s
#   RAY_BIN            the `ray` executable; default: .venv/bin/ray of this checkout, else `ray`
#   RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN  the token (default ~/.ray/auth_token, created
#                      with `ray get-auth-token --generate` if missing)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${CNNRAY_LOCAL_HOME:-$HOME/.cnnray/local}"
ENV_FILE="$STATE/head.env"
LOG="$STATE/head.log"

if [[ -n "${RAY_BIN:-}" ]]; then :
elif [[ -x "$REPO/.venv/bin/ray" ]]; then RAY_BIN="$REPO/.venv/bin/ray"
else RAY_BIN="$(command -v ray || true)"; fi
[[ -n "$RAY_BIN" && -x "$RAY_BIN" ]] || { echo "local.sh: no 'ray' executable (install the package, or set RAY_BIN)" >&2; exit 2; }
# Job entrypoints run `python ...`: it must be the interpreter that has Ray and cnnray.
BIN_DIR="$(cd "$(dirname "$RAY_BIN")" && pwd)"
PYTHON="$BIN_DIR/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

die() { echo "local.sh: $*" >&2; exit 2; }

# Read the state of a head started earlier (sets PID, SID, TEMP_DIR, RAY_ADDRESS, ...).
load_state() {
    [[ -f "$ENV_FILE" ]] || return 1
    # shellcheck disable=SC1090
    source "$ENV_FILE"
}

# The head is alive while its pid runs `ray start` with its private temp dir (not a reused pid).
alive() { [[ -n "${PID:-}" ]] && tr '\0' ' ' 2>/dev/null <"/proc/$PID/cmdline" | grep -qF -- "--temp-dir $TEMP_DIR"; }

# Our live processes: those in the head's session, plus job drivers (Ray starts each in a
# new session) whose working directory is inside the head's private temp dir. Zombies
# (already dead, waiting to be reaped) are skipped.
our_pids() {
    "$PYTHON" - "${SID:-}" "${TEMP_DIR:-}" <<'EOF'
import os, sys
sid, temp_dir = sys.argv[1], sys.argv[2]
try:  # the session is ours while its leader is gone or is our `ray start` (no pid reuse)
    leader = open(f"/proc/{sid}/cmdline", "rb").read().decode(errors="replace")
    if temp_dir not in leader:
        sid = ""
except OSError:
    pass
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2:].split()[:4]
        if state == "Z":
            continue  # already dead, waiting to be reaped
        if sid and session == sid:
            print(pid)
        elif temp_dir and os.readlink(f"/proc/{pid}/cwd").startswith(temp_dir + "/"):
            print(pid)
    except (OSError, ValueError):
        pass  # exited meanwhile, or not ours to inspect
EOF
}

# Wait up to N half-seconds for this head's processes to end; `left` holds the survivors.
wait_gone() {
    for _ in $(seq 1 "$1"); do
        left="$(our_pids)"; [[ -z "$left" ]] && return 0
        sleep 0.5
    done
    return 1
}

cmd_env() {
    load_state || die "no local head (run: cluster/local.sh up)"
    echo "export RAY_ADDRESS=$RAY_ADDRESS RAY_AUTH_MODE=token"
    if [[ -n "${TOKEN_PATH:-}" ]]; then echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_PATH"; fi
}

cmd_status() {
    if ! load_state; then echo "local head: not running"; return 3; fi
    if ! alive; then echo "local head: not running (stale state in $STATE; run: cluster/local.sh down)"; return 3; fi
    echo "local head: running (pid $PID, $NUM_CPUS CPUs, temp dir $TEMP_DIR)"
    echo "  job API / dashboard: $RAY_ADDRESS"
    echo "  GCS address:         $GCS_ADDRESS"
    echo "  log:                 $LOG"
    # Ask the head itself, through the authenticated job API.
    if env RAY_ADDRESS="$RAY_ADDRESS" RAY_AUTH_MODE=token ${TOKEN_PATH:+RAY_AUTH_TOKEN_PATH="$TOKEN_PATH"} \
        "$RAY_BIN" job list --log-style record >/dev/null 2>&1; then
        echo "  job API answers (token accepted)"
    else
        echo "  job API does not answer yet"; return 1
    fi
}

free_ports() {  # N free TCP ports on 127.0.0.1, all held open while picking so they differ
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# The token readable by its owner only (0600), in a folder only its owner can list (0700,
# for the default ~/.ray); files of other users and symlinks are left alone.
secure_token() {
    local token="$1"
    if [[ -z "${RAY_AUTH_TOKEN_PATH:-}" && -d "$HOME/.ray" && ! -L "$HOME/.ray" && -O "$HOME/.ray" ]]; then
        chmod go-rwx "$HOME/.ray"
    fi
    if [[ -f "$token" && ! -L "$token" && -O "$token" ]]; then
        chmod go-rwx "$token"
    fi
}

cmd_up() {
    if load_state; then
        if alive; then
            echo "local head already running ($RAY_ADDRESS); cluster/local.sh down first to restart"; return 0
        fi
        cmd_down >/dev/null  # a head that died: clear what is left of it first
    fi
    mkdir -p "$STATE"
    # Token authentication stays on: find or create the token, and pin the mode.
    local token_path="${RAY_AUTH_TOKEN_PATH:-}"
    if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "$token_path" && ! -s "$HOME/.ray/auth_token" ]]; then
        # umask 077: Ray writes the token with the umask's mode (0644 by default), readable
        # by every local user, who could then submit jobs as us.
        mkdir -p -m 700 "$HOME/.ray"
        (umask 077 && "$RAY_BIN" get-auth-token --generate >/dev/null)
    fi
    secure_token "${token_path:-$HOME/.ray/auth_token}"
    local num_cpus="${CNNRAY_NUM_CPUS:-$(nproc)}"
    local temp_dir
    # Short path: Ray puts Unix sockets under it (108-byte limit).
    temp_dir="$(mktemp -d /tmp/cnnray-ray.XXXXXX)"
    read -r gcs_port dash_port agent_port client_port <<<"$(free_ports 4)"
    local args=(start --head --block --disable-usage-stats
        --node-ip-address 127.0.0.1 --port "$gcs_port"
        --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" --include-dashboard true
        --dashboard-agent-listen-port "$agent_port" --ray-client-server-port "$client_port"
        --temp-dir "$temp_dir" --num-cpus "$num_cpus"
        --object-store-memory "${CNNRAY_OBJECT_STORE_BYTES:-1073741824}")
    [[ -n "${CNNRAY_NUM_GPUS:-}" ]] && args+=(--num-gpus "$CNNRAY_NUM_GPUS")
    # setsid: the head and everything it spawns get a session of their own, which is how
    # `down` finds them. PATH: job entrypoints find this environment's python.
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's single-machine mode (its default on
    # macOS): without it Ray replaces a loopback --node-ip-address by the machine's
    # routable address. RAY_API_SERVER_ADDRESS: Ray components that call the state API
    # from inside the cluster (Ray Train's placement-group cleaner) otherwise look for
    # "the" local GCS process and fail when other Ray instances run on the machine.
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S: on SIGTERM the head first drains (lets Serve
    # proxies hand traffic over); after any job that runs into Ray's 30 s default, and a
    # local test head has nothing to hand over.
    # ingress_env: Ray Serve's fast ingress for apps served from this head (`jobs/serve.py`,
    # `serve deploy`): HAProxy in front of the replicas, its stats and metrics ports free
    # ones on 127.0.0.1, its files in the head's temp dir (cnnray/serve/ingress.py).
    local ingress_env
    ingress_env="$("$PYTHON" -m cnnray.serve.ingress --print-env "$temp_dir/h")" \
        || die "cannot prepare Ray Serve's fast ingress (is cnnray installed for $PYTHON?)"
    # shellcheck disable=SC2086  # NAME=VALUE words without spaces
    env $ingress_env \
    RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PATH="$BIN_DIR:$PATH" \
        RAY_API_SERVER_ADDRESS="http://127.0.0.1:$dash_port" \
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${CNNRAY_DRAIN_TIMEOUT_S:-5}" \
        setsid "$RAY_BIN" "${args[@]}" >"$LOG" 2>&1 </dev/null &
    local pid=$!
    sleep 0.2
    # setsid execs in place (the background job is no group leader), so pid = session id.
    [[ "$(ps -o sid= -p "$pid" | tr -d ' ')" == "$pid" ]] || die "setsid did not give the head its own session"
    cat >"$ENV_FILE" <<EOF
PID=$pid
SID=$pid
TEMP_DIR=$temp_dir
NUM_CPUS=$num_cpus
GCS_ADDRESS=127.0.0.1:$gcs_port
RAY_ADDRESS=http://127.0.0.1:$dash_port
TOKEN_PATH=$token_path
EOF
    load_state
    # Ready when the job API answers an authenticated request.
    local deadline=$((SECONDS + ${CNNRAY_UP_TIMEOUT:-180}))
    until RAY_ADDRESS="$RAY_ADDRESS" RAY_AUTH_MODE=token "$RAY_BIN" job list --log-style record >/dev/null 2>&1; do
        if ! alive; then
            echo "local.sh: the head exited during start-up; its log ($LOG):" >&2
            tail -n 30 "$LOG" >&2; cmd_down >/dev/null 2>&1 || true; exit 1
        fi
        if ((SECONDS > deadline)); then
            echo "local.sh: the job API did not answer in time; log: $LOG" >&2; cmd_down || true; exit 1
        fi
        sleep 1
    done
    echo "local head up: Ray $("$RAY_BIN" --version | awk '{print $NF}'), $num_cpus CPUs, temp dir $temp_dir"
    echo "  job API / dashboard: $RAY_ADDRESS (127.0.0.1 only)"
    echo "  GCS address:         $GCS_ADDRESS"
    echo "Submit jobs with token authentication:"
    echo "  eval \"\$(cluster/local.sh env)\"    # RAY_ADDRESS=$RAY_ADDRESS RAY_AUTH_MODE=token"
    echo "  ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/train.py --config jobs/configs/mnist_cnn.yaml"
}

cmd_down() {
    if ! load_state; then echo "local head: not running"; return 0; fi
    # SIGTERM to `ray start --block`: it drains the node and stops every Ray process it
    # started (seconds; the GCS and raylet are slow on a busy machine). Whatever of this
    # head is still alive after that gets SIGTERM, then SIGKILL.
    if alive; then kill -TERM "$PID" 2>/dev/null || true; fi
    if ! wait_gone 60; then
        # shellcheck disable=SC2086
        kill -TERM $left 2>/dev/null || true
        if ! wait_gone 20; then
            # shellcheck disable=SC2086
            kill -KILL $left 2>/dev/null || true
            wait_gone 20 || true
        fi
    fi
    [[ -z "$left" ]] || { echo "local.sh: processes still alive after SIGKILL: $left" >&2; exit 1; }
    # The temp dir holds this head's session logs and sockets; nothing else uses it.
    [[ "$TEMP_DIR" == /tmp/cnnray-ray.* ]] && rm -rf -- "$TEMP_DIR"
    rm -f -- "$ENV_FILE"
    echo "local head down"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: cluster/local.sh up|down|status|env" >&2; exit 2 ;;
esac
