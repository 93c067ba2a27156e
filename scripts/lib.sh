#!/usr/bin/env bash
# Shared helpers for the scripts in this directory. Source it; do not run it.
#
#   source "$(dirname "$0")/lib.sh"
#
# Provides: REPO_ROOT, PY (set by ensure_python_deps), ensure_python_deps,
# free_port, start_moto PORT (sets MOTO_PID, MOTO_URL, MOTO_DIR), stop_moto,
# moto_call_count OPERATION, export_local_aws_env.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT

log() {
  printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

die() {
  log "error: $*"
  exit 1
}

# Creates (or reuses) the project-local venv at .venv/ and makes sure moto's
# server and boto3 import from it. The venv sees the system site-packages, so a
# machine that already has moto and boto3 installs nothing. Sets PY.
ensure_python_deps() {
  local venv="$REPO_ROOT/.venv"
  local base_python="${PYTHON:-python3}"
  if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv (with system site-packages)"
    # No pip unless it is needed below: creating a venv with pip takes seconds.
    "$base_python" -m venv --system-site-packages --without-pip "$venv"
  fi
  PY="$venv/bin/python"
  export PY
  if ! "$PY" -c 'import moto.server, boto3' >/dev/null 2>&1; then
    log "installing moto[server] and boto3 into $venv"
    "$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip --default-pip >/dev/null
    "$PY" -m pip install --quiet --disable-pip-version-check 'moto[server]' boto3
    "$PY" -c 'import moto.server, boto3' || die "moto/boto3 still not importable after pip install"
  fi
}

# Prints a TCP port on 127.0.0.1 that was free a moment ago.
free_port() {
  "${PY:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# start_moto PORT: starts moto's server on 127.0.0.1:PORT in the background with
# request recording on, and waits (at most ~30 s) until it answers.
# Sets MOTO_PID, MOTO_URL and MOTO_DIR (temp dir holding moto.log and the recording).
start_moto() {
  local port="$1"
  MOTO_DIR="$(mktemp -d "${TMPDIR:-/tmp}/reset-worker-moto.XXXXXX")"
  MOTO_URL="http://127.0.0.1:$port"
  export MOTO_URL MOTO_DIR
  MOTO_ENABLE_RECORDING=True MOTO_RECORDER_FILEPATH="$MOTO_DIR/recording.jsonl" \
    "${PY:-python3}" -m moto.server -H 127.0.0.1 -p "$port" >"$MOTO_DIR/moto.log" 2>&1 &
  MOTO_PID=$!
  export MOTO_PID
  local deadline=$((SECONDS + 30))
  until curl -fsS -o /dev/null "$MOTO_URL/moto-api/data.json" 2>/dev/null; do
    if ! kill -0 "$MOTO_PID" 2>/dev/null; then
      cat "$MOTO_DIR/moto.log" >&2 || true
      MOTO_PID=""
      die "moto exited before answering on $MOTO_URL"
    fi
    if ((SECONDS >= deadline)); then
      cat "$MOTO_DIR/moto.log" >&2 || true
      stop_moto
      die "moto did not answer on $MOTO_URL within 30 s"
    fi
    sleep 0.2
  done
  # Recording is already on (MOTO_ENABLE_RECORDING); starting it again is harmless.
  curl -fsS -o /dev/null -X POST "$MOTO_URL/moto-api/recorder/start-recording" || true
  log "moto listening on $MOTO_URL (pid $MOTO_PID, log $MOTO_DIR/moto.log)"
}

# Stops the moto started by start_moto. Safe to call from a trap, twice, or
# when moto never started.
stop_moto() {
  if [[ -n "${MOTO_PID:-}" ]]; then
    kill "$MOTO_PID" 2>/dev/null || true
    wait "$MOTO_PID" 2>/dev/null || true
    MOTO_PID=""
  fi
  if [[ -n "${MOTO_DIR:-}" && -d "$MOTO_DIR" && -z "${KEEP_MOTO_DIR:-}" ]]; then
    rm -rf "$MOTO_DIR"
  fi
  return 0
}

# moto_call_count OPERATION: the number of calls of a Cognito operation
# (ForgotPassword, AdminResetUserPassword, ...) moto has recorded since it started.
moto_call_count() {
  curl -fsS "$MOTO_URL/moto-api/recorder/download-recording" | "${PY:-python3}" -c '
import json, sys
target = "AWSCognitoIdentityProviderService." + sys.argv[1]
n = 0
for line in sys.stdin:
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    headers = {k.lower(): v for k, v in entry.get("headers", {}).items()}
    if headers.get("x-amz-target") == target:
        n += 1
print(n)
' "$1"
}

# Points the worker (and the AWS SDK) at the local moto: dummy credentials,
# no instance metadata, the metrics listener on METRICS_ADDR, short long polls.
export_local_aws_env() {
  local moto_url="$1" metrics_addr="$2"
  export AWS_ENDPOINT_URL_SQS="$moto_url"
  export AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER="$moto_url"
  export AWS_REGION=us-east-1
  export AWS_ACCESS_KEY_ID=test
  export AWS_SECRET_ACCESS_KEY=test
  export AWS_EC2_METADATA_DISABLED=true
  export RESET_WORKER_METRICS__LISTEN="$metrics_addr"
  export RESET_WORKER_SQS__WAIT_TIME_SECONDS=1
}
