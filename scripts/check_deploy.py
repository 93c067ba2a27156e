#!/usr/bin/env python3
"""The checks of deploy/ that no tool does; scripts/check-deploy.sh runs them
after the tools (kubernetes-validate, check-jsonschema with deploy/schemas/,
yamllint, hadolint).

  split    RENDER_DIR      each render holds exactly the expected kinds; writes
                           every object to RENDER_DIR/objects/RENDER.KIND.NAME.yaml
                           for check-jsonschema
  static   RENDER_DIR      consistency between the objects, the worker's config,
                           the Dockerfile, the alerts and the dashboard; the PromQL
                           parses (promql-parser); the ledger's table
                           (deploy/cloudformation, deploy/terraform) is the one the
                           worker expects and deploy/iam names; the KEDA overlay's
                           replicas share one ledger and one rate budget. Without
                           renders, only the parts that need none.
  config   RENDER_DIR BIN  `BIN config` accepts the ConfigMap as mounted, with
                           the pod's environment, and prints no secret
  live     RENDER_DIR BIN  runs the base Deployment's command line against a
                           local stack (moto; RESET_WORKER_* from
                           scripts/local_stack.py in the environment; the ledger's
                           table made in moto with `BIN ledger init`), checks the
                           probes and SIGTERM, and that every metric the alerts
                           and the dashboard use is in /metrics

RENDER_DIR holds `kubectl kustomize` output: base.yaml, job.yaml, keda.yaml,
monitoring.yaml. Exits non-zero with one line per failed check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
CRD_SCHEMAS = DEPLOY / "schemas" / "kubernetes"
CONFIG_TEMPLATE = REPO / "config" / "reset-worker.toml"
# Keys the Kubernetes copy of the config sets to placeholders.
PLACEHOLDER_KEYS = {"sqs.queue_url", "sqs.dead_letter_queue_url", "cognito.client_id"}
RULES = DEPLOY / "monitoring" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "monitoring" / "grafana-dashboard.json"
CFN_LEDGER = DEPLOY / "cloudformation" / "ledger-table.yaml"
TF_LEDGER = DEPLOY / "terraform" / "ledger-table.tf"
# deploy/iam file -> (Sid, the DynamoDB actions it must allow on the ledger's table).
LEDGER_IAM = {
    "policy.json": ("CampaignLedger", {"dynamodb:UpdateItem", "dynamodb:BatchGetItem", "dynamodb:Query",
                                       "dynamodb:DeleteItem", "dynamodb:DescribeTable"}),
    "policy-ledger-init.json": ("CampaignLedgerInit", {"dynamodb:CreateTable", "dynamodb:DescribeTable",
                                                       "dynamodb:DescribeTimeToLive", "dynamodb:UpdateTimeToLive"}),
    # `report --refresh-status`: the report's Query and each user's status (UpdateItem).
    "policy-refresh-status.json": ("CampaignLedgerRefresh", {"dynamodb:Query", "dynamodb:UpdateItem"}),
}
# The table `reset-worker ledger init` makes and the worker checks (src/ledger/dynamodb.rs).
LEDGER_KEY = [("campaign", "HASH"), ("username", "RANGE")]
LEDGER_TTL_ATTRIBUTE = "expires_at"

NAME = "reset-worker"
BUILTIN_API_VERSIONS = {"v1", "apps/v1", "batch/v1"}
_BASE = [("v1", "ServiceAccount"), ("v1", "ConfigMap"), ("v1", "Service"), ("monitoring.coreos.com/v1", "PodMonitor")]
EXPECTED_KINDS = {
    "base": [*_BASE, ("apps/v1", "Deployment")],
    "job": [*_BASE, ("batch/v1", "Job")],
    "keda": [*_BASE, ("apps/v1", "Deployment"),
             ("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")],
    "monitoring": [("v1", "ConfigMap"), ("monitoring.coreos.com/v1", "PrometheusRule")],
}

METRIC_RE = re.compile(r"reset_worker_[a-z_]+")
# Counters the worker creates on their first event only, so a short healthy run
# cannot show them. Each must still be a name constant in src/telemetry.rs.
EVENT_ONLY_METRICS = {
    "reset_worker_throttled_total",  # first TooManyRequestsException
    "reset_worker_delete_failures_total",  # first delete that finally fails
    "reset_worker_sign_outs_total",  # first AdminUserGlobalSignOut (cognito.sign_out)
}
# Metrics the alerts or the dashboard must show.
DOCUMENTED_METRICS = {
    "reset_worker_jobs_total", "reset_worker_cognito_requests_total",
    "reset_worker_cognito_request_duration_seconds_bucket", "reset_worker_throttled_total",
    "reset_worker_in_flight_jobs", "reset_worker_sqs_requests_total", "reset_worker_job_age_seconds_bucket",
    "reset_worker_rate_limit_per_second", "reset_worker_ready", "reset_worker_delete_failures_total",
}
# Grafana's variables, replaced before PromQL is parsed.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "${namespace}": ".*", "$namespace": ".*"}
DUMMY_SECRET = "check-deploy-dummy-secret-0f3c"


class Checks:
    """Collects failures so one run reports all of them."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0

    def check(self, ok: object, what: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)
        return bool(ok)

    def finish(self, title: str) -> int:
        for f in self.failures:
            print(f"FAIL {title}: {f}", file=sys.stderr)
        print(f"{title}: {self.passed} passed, {len(self.failures)} failed", file=sys.stderr)
        return 1 if self.failures else 0


def load_render(render_dir: Path, name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((render_dir / f"{name}.yaml").read_text()) if d]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind and (name is None or get(d, "metadata", "name") == name)]


def get(obj: object, *path: object, default: object = None) -> object:
    for key in path:
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return default
    return obj


def worker_toml(docs: list[dict]) -> tuple[str, dict] | None:
    """The worker's TOML from the rendered ConfigMap: (file name, parsed)."""
    for cm in find(docs, "ConfigMap"):
        for key, text in (cm.get("data") or {}).items():
            if key.endswith(".toml"):
                return key, tomllib.loads(text)
    return None


def container(pod_spec: dict) -> dict:
    return next((c for c in pod_spec.get("containers") or [] if c.get("name") == NAME), {})


def env_of(ctr: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in ctr.get("env") or [] if "value" in e}


def config_path(ctr: dict) -> str | None:
    args = ctr.get("args") or []
    return args[args.index("--config") + 1] if "--config" in args[:-1] else None


def mount_of(pod: dict, path: PurePosixPath) -> tuple[dict | None, dict]:
    """The container's volume mount whose directory is `path`'s parent, and its volume."""
    mount = next((m for m in container(pod).get("volumeMounts") or []
                  if PurePosixPath(m["mountPath"]) == path.parent), None)
    volume = next((v for v in pod.get("volumes") or [] if mount and v["name"] == mount["name"]), {})
    return mount, volume


def selector_matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------- split


def cmd_split(render_dir: Path) -> int:
    c = Checks()
    out = render_dir / "objects"
    out.mkdir(exist_ok=True)
    for render, expected in EXPECTED_KINDS.items():
        docs = load_render(render_dir, render)
        got = sorted((d.get("apiVersion"), d.get("kind")) for d in docs)
        c.check(got == sorted(expected), f"{render}: objects {got}, expected {sorted(expected)}")
        for doc in docs:
            kind = str(doc.get("kind")).lower()
            if doc.get("apiVersion") not in BUILTIN_API_VERSIONS:
                c.check((CRD_SCHEMAS / f"{kind}.json").is_file(),
                        f"{render}: {doc.get('apiVersion')} {doc.get('kind')}: no schema {CRD_SCHEMAS.relative_to(REPO)}/{kind}.json")
            (out / f"{render}.{kind}.{get(doc, 'metadata', 'name')}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return c.finish("split")


# ---------------------------------------------------------------- static


def check_pod(c: Checks, where: str, pod: dict, docs: list[dict], toml: tuple[str, dict] | None) -> None:
    """What the pod's spec must agree with: the render, the worker's config."""
    ctr = container(pod)
    sa = pod.get("serviceAccountName")
    c.check(find(docs, "ServiceAccount", sa), f"{where}: serviceAccountName {sa!r} exists in the render")

    # --config names a key of a ConfigMap in the render, mounted as a directory.
    cfg = config_path(ctr)
    if c.check(cfg, f"{where}: args carry --config FILE"):
        mount, volume = mount_of(pod, PurePosixPath(cfg))
        if c.check(mount, f"{where}: --config {cfg}: its directory is a volume mount"):
            cm = find(docs, "ConfigMap", get(volume, "configMap", "name"))
            c.check(cm, f"{where}: --config {cfg} is mounted from a ConfigMap in the render "
                    f"(name {get(volume, 'configMap', 'name')!r}; no name-suffix hash: disableNameSuffixHash)")
            if cm:
                c.check(PurePosixPath(cfg).name in (cm[0].get("data") or {}), f"{where}: the ConfigMap has key {PurePosixPath(cfg).name}")

    env = env_of(ctr)
    secret_file = env.get("RESET_WORKER_COGNITO__CLIENT_SECRET_FILE")
    if c.check(secret_file, f"{where}: env RESET_WORKER_COGNITO__CLIENT_SECRET_FILE"):
        sf = PurePosixPath(secret_file)
        mount, volume = mount_of(pod, sf)
        if c.check(mount and "secret" in volume, f"{where}: the secret file's directory {sf.parent} is mounted from a Secret"):
            items = volume["secret"].get("items")
            c.check(items is None or any(i.get("path") == sf.name for i in items), f"{where}: the Secret volume has an item at path {sf.name}")

    if not toml:
        return
    cfg_toml = toml[1]
    grace = get(cfg_toml, "shutdown", "grace_seconds", default=25)
    timeout = get(cfg_toml, "cognito", "request_timeout_seconds", default=10)
    tgps = pod.get("terminationGracePeriodSeconds")
    c.check(isinstance(tgps, int) and tgps > grace + timeout + 5,
            f"{where}: terminationGracePeriodSeconds {tgps} must exceed shutdown.grace_seconds {grace} + "
            f"cognito.request_timeout_seconds {timeout} + 5 s delete flush = {grace + timeout + 5}")
    listen = str(get(cfg_toml, "metrics", "listen", default="0.0.0.0:9464"))
    host, _, port = listen.rpartition(":")
    c.check(host not in ("127.0.0.1", "localhost", "[::1]"), f"{where}: metrics.listen {listen} is loopback-only: probes cannot reach it")
    metrics_port = next((p for p in ctr.get("ports") or [] if p.get("name") == "metrics"), {})
    c.check(str(metrics_port.get("containerPort")) == port,
            f"{where}: containerPort {metrics_port.get('containerPort')} = metrics.listen port {port}")
    m = re.match(r"https://sqs\.([a-z0-9-]+)\.amazonaws\.com/", get(cfg_toml, "sqs", "queue_url", default="") or "")
    if m and env.get("AWS_REGION"):
        c.check(env["AWS_REGION"] == m.group(1), f"{where}: AWS_REGION {env['AWS_REGION']} = the queue URL's Region {m.group(1)}")


def check_observability(c: Checks, where: str, docs: list[dict], pod_labels: dict, ctr: dict) -> None:
    """The PodMonitor and the Service find the pod and its port."""
    port_names = {p.get("name") for p in ctr.get("ports") or []}
    for pm in find(docs, "PodMonitor"):
        c.check(selector_matches(get(pm, "spec", "selector", "matchLabels", default={}), pod_labels),
                f"{where}: PodMonitor selector {get(pm, 'spec', 'selector')} matches the pod labels {pod_labels}")
        for ep in get(pm, "spec", "podMetricsEndpoints") or []:
            c.check(ep.get("port") in port_names, f"{where}: PodMonitor port {ep.get('port')!r} is a container port name {port_names}")
        job_label = get(pm, "spec", "jobLabel")
        c.check(pod_labels.get(job_label) == NAME, f"{where}: PodMonitor jobLabel {job_label!r} gives job={NAME!r}, as the alerts select")
    svcs = find(docs, "Service", NAME)
    c.check(svcs, f"{where}: a Service named {NAME}")
    for svc in svcs:
        c.check(selector_matches(get(svc, "spec", "selector", default={}), pod_labels), f"{where}: Service selector matches the pod labels")
        for p in get(svc, "spec", "ports") or []:
            c.check(p.get("targetPort") in port_names or isinstance(p.get("targetPort"), int),
                    f"{where}: Service targetPort {p.get('targetPort')!r} is a container port")


def check_workload(c: Checks, where: str, docs: list[dict], kind: str) -> dict | None:
    found = find(docs, kind, NAME)
    if not c.check(found, f"{where}: a {kind} named {NAME}"):
        return None
    spec = found[0]["spec"]
    pod_labels = get(spec, "template", "metadata", "labels") or {}
    if kind == "Deployment":
        c.check(selector_matches(get(spec, "selector", "matchLabels", default={}), pod_labels),
                f"{where}: Deployment selector matches its pod labels")
    check_pod(c, f"{where} {kind}", spec["template"]["spec"], docs, worker_toml(docs))
    check_observability(c, where, docs, pod_labels, container(spec["template"]["spec"]))
    return found[0]


def normalized_pod(pod: dict) -> dict:
    pod = json.loads(json.dumps(pod))
    pod.pop("restartPolicy", None)
    for ctr in pod.get("containers") or []:
        ctr.pop("args", None)
    return pod


def check_base(c: Checks, docs: list[dict]) -> dict | None:
    for d in docs:
        c.check(get(d, "metadata", "namespace") == NAME, f"base: {d['kind']} in namespace {NAME}")
    c.check(worker_toml(docs), "base: a ConfigMap holds the worker's .toml")
    c.check(find(docs, "ServiceAccount", NAME), f"base: a ServiceAccount named {NAME} (deploy/iam/trust-irsa.json trusts it)")
    toml = worker_toml(docs)
    if toml:
        backend = get(toml[1], "ledger", "backend", default="sqlite")
        c.check(backend == "dynamodb",
                f"base: ledger.backend {backend!r}, not 'dynamodb': the pod's root filesystem is read-only, its disk "
                "dies with it, and the Job's re-runs and KEDA's replicas must share one ledger")
    dep = check_workload(c, "base", docs, "Deployment")
    if dep:
        c.check(dep["spec"].get("replicas") == 1, "base: Deployment replicas 1 (the KEDA overlay scales it)")
        args = container(dep["spec"]["template"]["spec"]).get("args")
        c.check(args == ["run", "--config", config_path(container(dep["spec"]["template"]["spec"]))],
                f"base: Deployment args run --config FILE, got {args}")
    return dep


def check_job(c: Checks, docs: list[dict], base_dep: dict | None) -> None:
    job = check_workload(c, "overlays/job", docs, "Job")
    if not job:
        return
    fail_codes = {v for rule in get(job, "spec", "podFailurePolicy", "rules") or []
                  if rule.get("action") == "FailJob" and get(rule, "onExitCodes", "operator") == "In"
                  for v in get(rule, "onExitCodes", "values") or []}
    c.check({2, 3} <= fail_codes,
            f"overlays/job: podFailurePolicy FailJob on exit codes 2 (bad config) and 3 (halted), got {sorted(fail_codes)}")
    pod = job["spec"]["template"]["spec"]
    args = container(pod).get("args") or []
    c.check("--until-empty" in args, f"overlays/job: args run --until-empty, got {args}")
    if base_dep:
        base_pod = base_dep["spec"]["template"]["spec"]
        base_args = container(base_pod).get("args") or []
        c.check(sorted(a for a in args if a != "--until-empty") == sorted(base_args),
                f"overlays/job: args are the Deployment's plus --until-empty: {args} vs {base_args}")
        c.check(normalized_pod(pod) == normalized_pod(base_pod),
                "overlays/job: the Job's pod spec drifted from base/deployment.yaml's (apart from restartPolicy and args)")
        c.check(get(job, "spec", "template", "metadata", "labels") == get(base_dep, "spec", "template", "metadata", "labels"),
                "overlays/job: the Job's pod labels equal the Deployment's (PodMonitor, Service)")


def limits_of(cfg: dict) -> tuple[int, int]:
    """(limits.max_rps, limits.burst), with the worker's defaults."""
    return get(cfg, "limits", "max_rps", default=10), get(cfg, "limits", "burst", default=2)


def check_keda_rate(c: Checks, where: str, docs: list[dict], base_docs: list[dict]) -> None:
    """More than one replica must share one rate budget and one ledger:
    ledger.backend "dynamodb" (limits.scope then defaults to "cluster") and
    limits.scope not "process", or the campaign's rate would multiply with
    the replicas."""
    toml = worker_toml(docs)
    if not toml:
        return
    cfg = toml[1]
    for so in find(docs, "ScaledObject"):
        n = get(so, "spec", "maxReplicaCount", default=100)  # KEDA's default
        backend = get(cfg, "ledger", "backend", default="sqlite")
        scope = get(cfg, "limits", "scope", default="cluster")
        c.check(n == 1 or backend == "dynamodb",
                f"{where}: maxReplicaCount {n} with ledger.backend {backend!r}: only a shared (dynamodb) ledger "
                "keeps replicas from emailing a user twice and lets them share one rate budget")
        c.check(n == 1 or scope != "process",
                f"{where}: maxReplicaCount {n} with limits.scope = \"process\": the campaign's rate would be "
                "limits.max_rps times the replicas; use the cluster scope")


def check_keda(c: Checks, docs: list[dict], base_docs: list[dict]) -> None:
    where = "overlays/keda"
    check_keda_rate(c, where, docs, base_docs)
    dep = check_workload(c, where, docs, "Deployment")
    if not dep:
        return
    c.check("replicas" not in dep["spec"], f"{where}: Deployment without spec.replicas (KEDA owns it)")
    region = env_of(container(dep["spec"]["template"]["spec"])).get("AWS_REGION")
    toml = worker_toml(docs)
    queue_url = get(toml[1], "sqs", "queue_url") if toml else None
    for so in find(docs, "ScaledObject"):
        c.check(get(so, "spec", "scaleTargetRef", "name") == NAME, f"{where}: scaleTargetRef names the Deployment {NAME}")
        for trigger in get(so, "spec", "triggers") or []:
            meta = trigger.get("metadata") or {}
            c.check(meta.get("queueURL") == queue_url, f"{where}: trigger queueURL {meta.get('queueURL')!r} = sqs.queue_url {queue_url!r}")
            c.check(meta.get("awsRegion") == region, f"{where}: trigger awsRegion {meta.get('awsRegion')} = the pod's AWS_REGION {region}")
            auth = get(trigger, "authenticationRef", "name")
            if auth and get(trigger, "authenticationRef", "kind", default="TriggerAuthentication") == "TriggerAuthentication":
                c.check(find(docs, "TriggerAuthentication", auth), f"{where}: authenticationRef {auth!r} is a TriggerAuthentication in the render")


def check_monitoring(c: Checks, docs: list[dict]) -> None:
    c.check(find(docs, "PrometheusRule", NAME), f"monitoring: a PrometheusRule named {NAME}")
    for rule in find(docs, "PrometheusRule"):
        alerts = [r.get("alert") for g in get(rule, "spec", "groups") or [] for r in g.get("rules") or []]
        c.check(len(alerts) == len(set(alerts)), f"monitoring: alert names are unique: {alerts}")
    for dash in find(docs, "ConfigMap"):
        c.check(get(dash, "metadata", "labels", "grafana_dashboard") == "1", "monitoring: dashboard ConfigMap labelled grafana_dashboard=1")
        body = next(iter((dash.get("data") or {}).values()), "{}")
        c.check(json.loads(body) == json.loads(DASHBOARD.read_text()), "monitoring: dashboard ConfigMap holds grafana-dashboard.json")


def walk_panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels") or [])


def promql_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every alert rule, dashboard target and label_values() variable."""
    out = [(f"alert {r.get('alert')}", str(r.get("expr", "")))
           for g in get(yaml.safe_load(RULES.read_text()), "spec", "groups") or [] for r in g.get("rules") or []]
    dash = json.loads(DASHBOARD.read_text())
    out += [(f"panel {p.get('title')!r} {t.get('refId')}", t["expr"])
            for p in walk_panels(dash.get("panels") or []) for t in p.get("targets") or [] if "expr" in t]
    for var in get(dash, "templating", "list") or []:
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", var.get("definition") or "")
        if m:
            out.append((f"variable {var.get('name')}", m.group(1)))
    return out


def used_metric_names() -> dict[str, set[str]]:
    """reset_worker_* names used by the alerts and the dashboard -> where."""
    used: dict[str, set[str]] = {}
    for where, expr in promql_exprs():
        for name in METRIC_RE.findall(expr):
            used.setdefault(name, set()).add(where)
    return used


def check_promql(c: Checks) -> None:
    """The alerts' and the dashboard's PromQL parses and uses only our metrics;
    the dashboard's panel ids are unique; every documented metric is shown."""
    import promql_parser

    exprs = promql_exprs()
    c.check(len(exprs) > 10, "alerts and dashboard: PromQL expressions found")
    for where, expr in exprs:
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        c.check("$" not in expr, f"{where}: an unknown Grafana variable in {expr}")
        try:
            ast = promql_parser.parse(expr)
        except ValueError as err:
            c.check(False, f"{where}: PromQL does not parse: {err}: {expr}")
            continue
        names: set[str] = set()
        promql_parser.walk(ast, lambda n: names.add(n.name) if isinstance(n, promql_parser.VectorSelector) and n.name else None)
        for name in names:
            c.check(name.startswith("reset_worker_") or name == "up", f"{where}: uses a foreign metric {name}")
    ids = [p.get("id") for p in walk_panels(json.loads(DASHBOARD.read_text()).get("panels") or [])]
    c.check(len(ids) == len(set(ids)), f"dashboard: panel ids unique: {ids}")
    missing = DOCUMENTED_METRICS - set(used_metric_names())
    c.check(not missing, f"dashboard/alerts: not shown anywhere: {sorted(missing)}")


def check_dockerfile(c: Checks) -> None:
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(str(DEPLOY / "Dockerfile"))
    images = df.parent_images  # ARGs substituted
    c.check(len(images) >= 3, "Dockerfile: multi-stage (planner, builder, runtime)")
    rust = [i for i in images if i.startswith("rust:")]
    c.check(rust and all(i.endswith("-bookworm") for i in rust),
            f"Dockerfile: a rust: builder on bookworm (the glibc of distroless cc-debian12), got {images}")
    want = re.search(r'^rust-version\s*=\s*"([\d.]+)"', (REPO / "Cargo.toml").read_text(), re.M)
    if want:
        c.check(all(i.startswith(f"rust:{want.group(1)}") for i in rust),
                f"Dockerfile: builder Rust = Cargo.toml rust-version {want.group(1)}, got {rust}")
    text = df.content
    c.check("cargo chef prepare" in text and "cargo chef cook" in text, "Dockerfile: dependencies cached with cargo-chef")
    c.check("cargo build --release --locked" in text, "Dockerfile: cargo build --release --locked")
    c.check(images and images[-1] == "gcr.io/distroless/cc-debian12:nonroot",
            f"Dockerfile: runtime gcr.io/distroless/cc-debian12:nonroot, got {images[-1:]}")
    last_from = max((i for i, ins in enumerate(df.structure) if ins["instruction"] == "FROM"), default=0)
    final: dict[str, list[str]] = {}
    for ins in df.structure[last_from:]:
        final.setdefault(ins["instruction"], []).append(ins["value"])
    c.check("RUN" not in final, "Dockerfile: no RUN in the runtime stage (it has no shell)")
    user = final.get("USER", ["root"])[-1]
    c.check(user in ("65532", "65532:65532", "nonroot", "nonroot:nonroot"), f"Dockerfile: runtime USER 65532 (runAsUser in deploy/kubernetes), got {user}")
    for op, want_exec in (("ENTRYPOINT", ["reset-worker"]), ("CMD", ["run"])):
        got = final.get(op, ["(none)"])[-1]
        c.check(got.startswith("[") and json.loads(got) == want_exec, f"Dockerfile: {op} {json.dumps(want_exec)}, got {got}")
    c.check(any(v.startswith("--from=") and v.endswith(" /usr/local/bin/reset-worker") for v in final.get("COPY", [])),
            "Dockerfile: the runtime copies the binary to /usr/local/bin/reset-worker (on distroless's PATH)")
    ignore = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    for must in ("target", ".git", ".venv"):
        c.check(must in ignore, f".dockerignore: excludes {must}/")
    for keep in ("src", "Cargo.toml", "Cargo.lock"):
        c.check(keep not in ignore, f".dockerignore: keeps {keep}")


class CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags: !Ref X -> {"Ref": X}, !GetAtt A.B -> {"Fn::GetAtt": [A, B]}, ..."""


def _cfn_tag(loader: CfnLoader, suffix: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.ScalarNode):
        value: object = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


CfnLoader.add_multi_constructor("!", _cfn_tag)


def hcl_block(text: str, header: str) -> str | None:
    """The body of the first `header {` block (nested blocks included), or None."""
    m = re.search(rf"^\s*{header}\s*\{{", text, re.M)
    if not m:
        return None
    depth, i = 1, m.end()
    while depth and i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[m.end():i - 1]


def hcl_attr(body: str | None, name: str) -> str | None:
    """A top-level-looking `name = value` in a block body, quotes stripped."""
    m = re.search(rf"^\s*{name}\s*=\s*(\S+)", body or "", re.M)
    return m.group(1).strip('"') if m else None


def check_ledger_table(c: Checks) -> str | None:
    """deploy/cloudformation/ledger-table.yaml and deploy/terraform/ledger-table.tf
    make the table the worker expects; returns the CloudFormation default name."""
    where = CFN_LEDGER.relative_to(REPO)
    try:
        cfn = yaml.load(CFN_LEDGER.read_text(), Loader=CfnLoader)
    except (OSError, yaml.YAMLError) as err:
        c.check(False, f"{where}: {err}")
        cfn = {}
    tables = [(name, r) for name, r in (get(cfn, "Resources") or {}).items() if r.get("Type") == "AWS::DynamoDB::Table"]
    default_name = get(cfn, "Parameters", "TableName", "Default")
    if c.check(len(tables) == 1, f"{where}: exactly one AWS::DynamoDB::Table, got {len(tables)}"):
        name, table = tables[0]
        props = table.get("Properties") or {}
        c.check(table.get("DeletionPolicy") == "Retain" and table.get("UpdateReplacePolicy") == "Retain",
                f"{where}: {name}: DeletionPolicy and UpdateReplacePolicy Retain (the ledger is the audit record)")
        c.check(props.get("TableName") == {"Ref": "TableName"}, f"{where}: {name}: TableName !Ref TableName")
        c.check(props.get("BillingMode") == "PAY_PER_REQUEST", f"{where}: {name}: BillingMode PAY_PER_REQUEST")
        keys = [(k.get("AttributeName"), k.get("KeyType")) for k in props.get("KeySchema") or []]
        c.check(keys == LEDGER_KEY, f"{where}: {name}: KeySchema {keys}, expected {LEDGER_KEY}")
        attrs = {a.get("AttributeName"): a.get("AttributeType") for a in props.get("AttributeDefinitions") or []}
        c.check(attrs == {k: "S" for k, _ in LEDGER_KEY}, f"{where}: {name}: AttributeDefinitions {attrs}: the key's, both S")
        c.check(get(props, "TimeToLiveSpecification") == {"Enabled": True, "AttributeName": LEDGER_TTL_ATTRIBUTE},
                f"{where}: {name}: TimeToLiveSpecification enabled on {LEDGER_TTL_ATTRIBUTE}")
        c.check(get(props, "PointInTimeRecoverySpecification", "PointInTimeRecoveryEnabled") is True,
                f"{where}: {name}: point-in-time recovery enabled")
        c.check(get(props, "SSESpecification", "SSEEnabled") is True, f"{where}: {name}: SSESpecification SSEEnabled")
        outputs = get(cfn, "Outputs") or {}
        c.check(get(outputs, "TableName", "Value") == {"Ref": name}, f"{where}: output TableName !Ref {name}")
        c.check(get(outputs, "TableArn", "Value") == {"Fn::GetAtt": [name, "Arn"]}, f"{where}: output TableArn !GetAtt {name}.Arn")

    where = TF_LEDGER.relative_to(REPO)
    tf = TF_LEDGER.read_text() if TF_LEDGER.is_file() else ""
    table = hcl_block(tf, r'resource\s+"aws_dynamodb_table"\s+"\w+"')
    if c.check(table, f"{where}: a resource aws_dynamodb_table"):
        c.check(hcl_attr(hcl_block(tf, r'variable\s+"table_name"'), "default") == default_name,
                f"{where}: variable table_name's default = the CloudFormation template's {default_name!r}")
        c.check(hcl_attr(table, "name") == "var.table_name", f"{where}: name = var.table_name")
        c.check(hcl_attr(table, "billing_mode") == "PAY_PER_REQUEST", f"{where}: billing_mode PAY_PER_REQUEST")
        keys = [(hcl_attr(table, "hash_key"), "HASH"), (hcl_attr(table, "range_key"), "RANGE")]
        c.check(keys == LEDGER_KEY, f"{where}: hash_key/range_key {keys}, expected {LEDGER_KEY}")
        attrs = dict(re.findall(r'attribute\s*\{\s*name\s*=\s*"(\w+)"\s*type\s*=\s*"(\w)"\s*\}', table))
        c.check(attrs == {k: "S" for k, _ in LEDGER_KEY}, f"{where}: attribute blocks {attrs}: the key's, both S")
        ttl = hcl_block(table, "ttl")
        c.check(hcl_attr(ttl, "enabled") == "true" and hcl_attr(ttl, "attribute_name") == LEDGER_TTL_ATTRIBUTE,
                f"{where}: ttl enabled on {LEDGER_TTL_ATTRIBUTE}")
        c.check(hcl_attr(hcl_block(table, "point_in_time_recovery"), "enabled") == "true",
                f"{where}: point_in_time_recovery enabled")
        c.check(hcl_attr(hcl_block(table, "server_side_encryption"), "enabled") == "true",
                f"{where}: server_side_encryption enabled")
        c.check(hcl_attr(hcl_block(table, "lifecycle"), "prevent_destroy") == "true",
                f"{where}: lifecycle prevent_destroy (like CloudFormation's Retain)")
    return default_name if isinstance(default_name, str) else None


def check_ledger_iam(c: Checks, table_name: str | None) -> None:
    """The IAM policies allow the ledger's actions on that one table (the
    schemas in deploy/schemas/iam check each file's shape)."""
    arns = {}
    for file, (sid, actions) in LEDGER_IAM.items():
        where = f"deploy/iam/{file}"
        stmts = [st for st in json.loads((DEPLOY / "iam" / file).read_text()).get("Statement") or [] if st.get("Sid") == sid]
        if not c.check(len(stmts) == 1, f"{where}: one statement {sid}"):
            continue
        got = stmts[0].get("Action")
        got = {got} if isinstance(got, str) else set(got or [])
        c.check(got == actions, f"{where}: {sid} allows {sorted(got)}, expected {sorted(actions)}")
        arns[file] = stmts[0].get("Resource")
        if table_name:
            c.check(str(arns[file]).endswith(f":table/{table_name}"),
                    f"{where}: {sid} Resource {arns[file]} is not the table {table_name!r} of {CFN_LEDGER.relative_to(REPO)}")
    c.check(len(set(arns.values())) <= 1, f"deploy/iam: the ledger statements name different tables: {arns}")


def check_ledger_config(c: Checks, where: str, docs: list[dict], table_name: str | None) -> None:
    toml = worker_toml(docs)
    if toml and table_name and get(toml[1], "ledger", "backend") == "dynamodb":
        table = get(toml[1], "ledger", "table", default="reset-worker-ledger")
        c.check(table == table_name, f"{where}: ledger.table {table!r} = the table of {CFN_LEDGER.relative_to(REPO)} "
                f"and deploy/iam ({table_name!r})")


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def note_template_drift(docs: list[dict]) -> None:
    """Not a failure: the Kubernetes copy may be tuned on purpose."""
    toml = worker_toml(docs)
    if not toml:
        return
    template, deployed = flatten(tomllib.loads(CONFIG_TEMPLATE.read_text())), flatten(toml[1])
    for key in sorted((set(template) | set(deployed)) - PLACEHOLDER_KEYS):
        if template.get(key, "(unset)") != deployed.get(key, "(unset)"):
            print(f"note: {key} = {deployed.get(key, '(unset)')!r} in deploy/kubernetes/base/{toml[0]}, "
                  f"{template.get(key, '(unset)')!r} in config/reset-worker.toml", file=sys.stderr)


def cmd_static(render_dir: Path) -> int:
    c = Checks()
    if all((render_dir / f"{r}.yaml").is_file() for r in EXPECTED_KINDS):
        renders = {r: load_render(render_dir, r) for r in EXPECTED_KINDS}
        for overlay in ("job", "keda"):
            for d in renders[overlay]:
                c.check(get(d, "metadata", "namespace") == NAME,
                        f"{overlay}: {d['kind']} {get(d, 'metadata', 'name')} in namespace {NAME}")
        base_dep = check_base(c, renders["base"])
        note_template_drift(renders["base"])
        check_job(c, renders["job"], base_dep)
        check_keda(c, renders["keda"], renders["base"])
        check_monitoring(c, renders["monitoring"])
    else:
        renders = {}
        print(f"static: no renders in {render_dir}: checking only what needs none", file=sys.stderr)
    check_promql(c)
    check_dockerfile(c)
    table_name = check_ledger_table(c)
    check_ledger_iam(c, table_name)
    for render in ("base", "job", "keda"):
        if render in renders:
            check_ledger_config(c, render, renders[render], table_name)
    return c.finish("static")


# ---------------------------------------------------------------- config / live


def materialize(docs: list[dict], kind: str, root: Path, secret: str) -> tuple[list[str], dict[str, str]]:
    """Writes the workload's ConfigMap and Secret volumes under `root` as the
    pod would see them, and returns its args and RESET_WORKER_*/AWS_REGION env
    with those paths moved under `root`."""
    pod = find(docs, kind, NAME)[0]["spec"]["template"]["spec"]
    ctr = container(pod)
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for m in ctr.get("volumeMounts") or []:
        vol = volumes[m["name"]]
        target = root / m["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in vol:
            for key, text in (find(docs, "ConfigMap", vol["configMap"]["name"])[0].get("data") or {}).items():
                (target / key).write_text(text)
        elif "secret" in vol:
            for item in vol["secret"].get("items") or [{"path": "client-secret"}]:
                (target / item["path"]).write_text(secret + "\n")

    def move(value: str) -> str:
        return str(root / value.lstrip("/")) if value.startswith("/") else value

    args = [move(a) for a in ctr.get("args") or []]
    env = {k: move(v) for k, v in env_of(ctr).items() if k.startswith("RESET_WORKER_") or k == "AWS_REGION"}
    return args, env


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESET_WORKER_")}
    env.update(extra)
    return env


def cmd_config(render_dir: Path, binary: Path) -> int:
    c = Checks()
    for render, kind in (("base", "Deployment"), ("job", "Job"), ("keda", "Deployment")):
        docs = load_render(render_dir, render)
        with tempfile.TemporaryDirectory(prefix="check-deploy-") as tmp:
            args, env = materialize(docs, kind, Path(tmp), DUMMY_SECRET)
            cfg = args[args.index("--config") + 1]
            proc = subprocess.run([str(binary), "config", "--config", cfg], env=clean_env(env),
                                  capture_output=True, text=True, timeout=30)
            where = f"{render} {kind}: reset-worker config --config {cfg.replace(tmp, '')}"
            c.check(proc.returncode == 0, f"{where}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
            c.check(DUMMY_SECRET not in proc.stdout + proc.stderr, f"{where}: printed the client secret")
            if proc.returncode == 0:
                c.check("client_secret" in proc.stdout and "redacted" in proc.stdout.lower(),
                        f"{where}: shows the client secret as redacted (was the secret file read?)")
                print(f"{where}: accepted", file=sys.stderr)
    return c.finish("config")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


def jobs_total(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if re.match(r"reset_worker_jobs_total[{ ]", line))


def cmd_live(render_dir: Path, binary: Path) -> int:
    c = Checks()
    jobs = int(os.environ["LOCAL_JOB_COUNT"])
    secret = os.environ["RESET_WORKER_COGNITO__CLIENT_SECRET"]
    base = f"http://{os.environ['RESET_WORKER_METRICS__LISTEN']}"
    docs = load_render(render_dir, "base")
    pod = find(docs, "Deployment", NAME)[0]["spec"]["template"]["spec"]
    tmp = Path(tempfile.mkdtemp(prefix="check-deploy-live-"))
    log = tmp / "worker.log"
    try:
        args, env = materialize(docs, "Deployment", tmp / "root", secret)
        # The pod's env, then the local stack's: queue, client, listener, region.
        env.update({k: v for k, v in os.environ.items()
                    if k.startswith("RESET_WORKER_") and k != "RESET_WORKER_COGNITO__CLIENT_SECRET"})
        env["AWS_REGION"] = os.environ.get("AWS_REGION", "us-east-1")
        toml = worker_toml(docs)
        if toml and get(toml[1], "ledger", "backend") == "dynamodb":
            # The ledger's table, in the same moto as the queue (never real AWS).
            endpoint = os.environ.get("MOTO_URL") or os.environ.get("AWS_ENDPOINT_URL_SQS")
            if not c.check(endpoint, "ledger.backend dynamodb: no MOTO_URL or AWS_ENDPOINT_URL_SQS to point DynamoDB at"):
                return c.finish("live")
            env["AWS_ENDPOINT_URL_DYNAMODB"] = endpoint
            cfg = args[args.index("--config") + 1]
            init = subprocess.run([str(binary), "ledger", "init", "--config", cfg], env=clean_env(env),
                                  capture_output=True, text=True, timeout=60)
            if not c.check(init.returncode == 0, f"reset-worker ledger init exited {init.returncode}: "
                           f"{(init.stdout + init.stderr).strip()[-500:]}"):
                return c.finish("live")
            print(f"live: ledger init: {init.stdout.strip()}", file=sys.stderr)
        with log.open("w") as out:
            proc = subprocess.Popen([str(binary), *args], env=clean_env(env), stdout=out, stderr=subprocess.STDOUT)
        metrics = ""
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and proc.poll() is None and jobs_total(metrics) < jobs:
            status, body = http_get(f"{base}/metrics")
            metrics = body if status == 200 else metrics
            time.sleep(0.2)
        c.check(proc.poll() is None, f"the worker exited early with {proc.returncode}")
        c.check(jobs_total(metrics) >= jobs, f"reset_worker_jobs_total reached {jobs_total(metrics)} of {jobs} in 40 s")
        for probe in ("livenessProbe", "readinessProbe"):
            path = container(pod)[probe]["httpGet"]["path"]
            status, _ = http_get(f"{base}{path}")
            c.check(status == 200, f"{probe} GET {path} answered {status}, not 200")
        # One more scrape, after the last outcome was recorded.
        status, body = http_get(f"{base}/metrics")
        metrics = body if status == 200 else metrics
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        took = time.monotonic() - started
        tgps = pod["terminationGracePeriodSeconds"]
        c.check(rc == 0, f"after SIGTERM the worker exited {rc}, not 0")
        c.check(took < tgps, f"shutdown took {took:.1f} s, not under terminationGracePeriodSeconds {tgps}")
        print(f"live: {jobs} jobs accounted, SIGTERM -> exit {rc} in {took:.1f} s", file=sys.stderr)

        exposed = set(re.findall(r"^(?:# TYPE )?(reset_worker_[a-z_]+)", metrics, re.M))
        declared = set(re.findall(r'"(reset_worker_[a-z_]+)"', (REPO / "src" / "telemetry.rs").read_text()))
        for name, where in sorted(used_metric_names().items()):
            base_name = re.sub(r"_(bucket|sum|count)$", "", name)
            if name in EVENT_ONLY_METRICS and name not in exposed:
                c.check(base_name in declared, f"{name} (event-only, used by {sorted(where)}) is not a name constant in src/telemetry.rs")
                print(f"live: {name}: event-only, declared in src/telemetry.rs", file=sys.stderr)
            else:
                c.check(name in exposed, f"{name} (used by {sorted(where)}) is not in the worker's /metrics output"
                        + (" (declared in src/telemetry.rs: add it to EVENT_ONLY_METRICS if it appears only after an event)"
                           if base_name in declared else " nor declared in src/telemetry.rs"))
        for name in EVENT_ONLY_METRICS:
            c.check(name in declared, f"EVENT_ONLY_METRICS lists {name}, which src/telemetry.rs does not declare")
        if c.failures:
            print(f"--- worker log ({log}) ---\n{log.read_text()[-3000:]}", file=sys.stderr)
        return c.finish("live")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    commands = {"split": cmd_split, "static": cmd_static, "config": cmd_config, "live": cmd_live}
    if len(argv) < 2 or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    return commands[argv[0]](*map(Path, argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
