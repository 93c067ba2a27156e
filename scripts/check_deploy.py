#!/usr/bin/env python3
"""Checks for deploy/: the parts scripts/check-deploy.sh runs in Python.

  schemas  RENDER_DIR            built-in kinds against the Kubernetes OpenAPI schemas
                                 (kubernetes-validate, strict), offline
  static   RENDER_DIR            structure of everything in deploy/: the rendered
                                 kustomizations (CRDs included), PromQL in the
                                 alerts and the dashboard, the Dockerfile, the IAM
                                 policy, and their consistency with each other and
                                 with the worker's config
  config   RENDER_DIR BIN        `BIN config` accepts the ConfigMap as mounted, with
                                 the pod's environment, and prints no secret
  live     RENDER_DIR BIN        runs the base Deployment's command line against a
                                 local stack (moto; RESET_WORKER_* from
                                 scripts/local_stack.py in the environment), checks
                                 the probes, scrapes /metrics, and checks that every
                                 metric the alerts and the dashboard use exists

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
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
IAM_POLICY = DEPLOY / "iam" / "policy.json"
IAM_ADMIN_RESET = DEPLOY / "iam" / "policy-admin-reset.json"
CONFIG_TEMPLATE = REPO / "config" / "reset-worker.toml"
# Keys the Kubernetes copy of the config sets to placeholders.
PLACEHOLDER_KEYS = {"sqs.queue_url", "sqs.dead_letter_queue_url", "cognito.client_id"}
RULES = DEPLOY / "monitoring" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "monitoring" / "grafana-dashboard.json"
TELEMETRY = REPO / "src" / "telemetry.rs"
CARGO_TOML = REPO / "Cargo.toml"

RENDERS = ("base", "job", "keda", "monitoring")
NAME = "reset-worker"
NAME_LABEL = "app.kubernetes.io/name"
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# Kubernetes versions the built-in kinds are validated against: the oldest with
# every field used here GA (podFailurePolicy: 1.31) and the newest bundled.
SCHEMA_VERSIONS = ("1.31.0", None)

METRIC_RE = re.compile(r"reset_worker_[a-z_]+")
# Counters the worker creates on their first event only, so a short healthy run
# cannot show them. Each must still be a name constant in src/telemetry.rs.
EVENT_ONLY_METRICS = {
    "reset_worker_throttled_total",  # first TooManyRequestsException
    "reset_worker_delete_failures_total",  # first delete that finally fails
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Grafana's variables, replaced before PromQL is parsed.
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${namespace}": ".*",
    "$namespace": ".*",
}

EXPECTED_IAM = {
    "JobQueue": {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
    },
    "DeadLetterQueue": {"sqs:SendMessage", "sqs:GetQueueAttributes"},
}
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
    docs = [d for d in yaml.safe_load_all((render_dir / f"{name}.yaml").read_text()) if d]
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def one(c: Checks, docs: list[dict], kind: str, where: str, name: str | None = None) -> dict | None:
    found = find(docs, kind, name)
    if c.check(len(found) == 1, f"{where}: expected exactly one {kind}{' ' + name if name else ''}, found {len(found)}"):
        return found[0]
    return None


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


def container(pod_spec: dict) -> dict | None:
    for ctr in pod_spec.get("containers") or []:
        if ctr.get("name") == NAME:
            return ctr
    return None


def env_of(ctr: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in ctr.get("env") or [] if "value" in e}


def config_path(ctr: dict) -> str | None:
    args = ctr.get("args") or []
    if "--config" in args and args.index("--config") + 1 < len(args):
        return args[args.index("--config") + 1]
    return None


# ---------------------------------------------------------------- PromQL


def promql_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every alert rule and dashboard target."""
    out = []
    rule = yaml.safe_load(RULES.read_text())
    for group in get(rule, "spec", "groups", default=[]) or []:
        for r in group.get("rules") or []:
            out.append((f"alert {r.get('alert') or r.get('record')}", str(r.get("expr", ""))))
    dash = json.loads(DASHBOARD.read_text())
    for panel in walk_panels(dash.get("panels") or []):
        for t in panel.get("targets") or []:
            if "expr" in t:
                out.append((f"panel {panel.get('title')!r} {t.get('refId')}", t["expr"]))
    for var in get(dash, "templating", "list", default=[]) or []:
        q = var.get("definition") or ""
        if "label_values(" in q:
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q)
            if m:
                out.append((f"variable {var.get('name')}", m.group(1)))
    return out


def walk_panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels") or [])


def substitute_grafana(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def parse_promql(expr: str) -> tuple[str | None, set[str]]:
    """(error or None, selector names). Uses promql-parser (the Rust crate's
    binding) when installed; otherwise a superficial check."""
    try:
        import promql_parser
    except ImportError:
        return superficial_promql(expr), set(METRIC_RE.findall(expr))
    try:
        ast = promql_parser.parse(expr)
    except ValueError as err:
        return str(err), set()
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(ast, visit)
    return None, names


def superficial_promql(expr: str) -> str | None:
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    pairs = {")": "(", "]": "[", "}": "{"}
    stack = []
    for ch in stripped:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return f"unbalanced {ch!r}"
    if stack:
        return f"unclosed {stack[-1]!r}"
    for rng in re.findall(r"\[([^\]]*)\]", stripped):
        if not re.fullmatch(r"\d+[smhdwy](:\d+[smhdwy])?", rng.strip()):
            return f"bad range [{rng}]"
    return None


def used_metric_names() -> dict[str, set[str]]:
    """reset_worker_* names used by the alerts and the dashboard -> where."""
    used: dict[str, set[str]] = {}
    for where, expr in promql_exprs():
        for name in METRIC_RE.findall(expr):
            used.setdefault(name, set()).add(where)
    return used


def base_metric(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def telemetry_names() -> set[str]:
    return set(re.findall(r'"(reset_worker_[a-z_]+)"', TELEMETRY.read_text()))


# ---------------------------------------------------------------- schemas


def cmd_schemas(render_dir: Path) -> int:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, latest_version

    c = Checks()
    for render in RENDERS:
        for doc in load_render(render_dir, render):
            api, kind = doc.get("apiVersion"), doc.get("kind")
            where = f"{render}: {kind}/{get(doc, 'metadata', 'name')}"
            for version in SCHEMA_VERSIONS:
                version = version or latest_version()
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                    c.check(True, where)
                except SchemaNotFoundError:
                    # CRDs: no schema bundled; scripts/check_deploy.py static checks them.
                    c.check((api, kind) in CRD_KINDS, f"{where}: no schema for {api} {kind}, and not a known CRD")
                    break
                except kubernetes_validate.ValidationError as err:
                    c.check(False, f"{where} (Kubernetes {version}): {err.message} at {'.'.join(map(str, err.path))}")
    return c.finish("schemas")


# ---------------------------------------------------------------- static


def check_pod_security(c: Checks, where: str, pod: dict, ctr: dict) -> None:
    psc = pod.get("securityContext") or {}
    csc = ctr.get("securityContext") or {}
    c.check(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot")
    c.check(65532 in (psc.get("runAsUser"), csc.get("runAsUser")), f"{where}: runAsUser 65532 (distroless nonroot)")
    c.check(
        get(psc, "seccompProfile", "type") == "RuntimeDefault" or get(csc, "seccompProfile", "type") == "RuntimeDefault",
        f"{where}: seccompProfile RuntimeDefault",
    )
    c.check(csc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation false")
    c.check(csc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem true")
    c.check(get(csc, "capabilities", "drop") == ["ALL"], f"{where}: capabilities drop [ALL]")
    c.check(csc.get("privileged") in (None, False), f"{where}: not privileged")


def check_pod(c: Checks, where: str, pod: dict, docs: list[dict], toml: tuple[str, dict] | None) -> None:
    ctr = container(pod)
    if not c.check(ctr, f"{where}: a container named {NAME}"):
        return
    check_pod_security(c, where, pod, ctr)
    image = ctr.get("image", "")
    c.check("/" in image and image.split(":")[0].endswith(f"/{NAME}"),
            f"{where}: image {image!r} is a registry path set by components/image (kustomize `images:`)")
    c.check(not ctr.get("command"), f"{where}: no command override (the image's ENTRYPOINT is reset-worker)")
    args = ctr.get("args") or []
    c.check(args[:1] == ["run"], f"{where}: args start with `run`, got {args}")
    sa = pod.get("serviceAccountName")
    c.check(sa and find(docs, "ServiceAccount", sa), f"{where}: serviceAccountName {sa!r} exists in the render")

    res = ctr.get("resources") or {}
    for path in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
        c.check(get(res, *path), f"{where}: resources.{'.'.join(path)} set")

    ports = {p.get("name"): p for p in ctr.get("ports") or []}
    metrics_port = ports.get("metrics")
    c.check(metrics_port, f"{where}: a container port named metrics")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        c.check(get(ctr, probe, "httpGet", "path") == path, f"{where}: {probe} GET {path}")
        c.check(get(ctr, probe, "httpGet", "port") == "metrics", f"{where}: {probe} on port `metrics`")

    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = ctr.get("volumeMounts") or []
    for m in mounts:
        c.check("subPath" not in m and "subPathExpr" not in m,
                f"{where}: volumeMount {m['name']} uses subPath (in-place updates would never reach the pod)")

    # --config names a file of the mounted ConfigMap.
    cfg = config_path(ctr)
    if c.check(cfg, f"{where}: args carry --config FILE"):
        cfg_path = PurePosixPath(cfg)
        mount = next((m for m in mounts if PurePosixPath(m["mountPath"]) == cfg_path.parent), None)
        if c.check(mount, f"{where}: --config {cfg}: its directory is a volume mount"):
            cm_name = get(volumes, mount["name"], "configMap", "name")
            cm = find(docs, "ConfigMap", cm_name) if cm_name else []
            c.check(cm, f"{where}: --config {cfg} is mounted from a ConfigMap in the render (name {cm_name!r}; "
                    "no name-suffix hash: disableNameSuffixHash)")
            if cm:
                c.check(cfg_path.name in (cm[0].get("data") or {}), f"{where}: ConfigMap {cm_name} has key {cfg_path.name}")

    env = env_of(ctr)
    secret_file = env.get("RESET_WORKER_COGNITO__CLIENT_SECRET_FILE")
    if c.check(secret_file, f"{where}: env RESET_WORKER_COGNITO__CLIENT_SECRET_FILE"):
        sf = PurePosixPath(secret_file)
        mount = next((m for m in mounts if PurePosixPath(m["mountPath"]) == sf.parent), None)
        if c.check(mount, f"{where}: the secret file's directory {sf.parent} is a volume mount"):
            secret = get(volumes, mount["name"], "secret")
            if c.check(secret, f"{where}: {sf.parent} is mounted from a Secret"):
                items = secret.get("items")
                c.check(items is None or any(i.get("path") == sf.name for i in items),
                        f"{where}: Secret volume has an item at path {sf.name}")
    c.check(not any(e.get("name") == "RESET_WORKER_COGNITO__CLIENT_SECRET" and "value" in e for e in ctr.get("env") or []),
            f"{where}: no client secret in plain env")

    if toml:
        _, cfg_toml = toml
        grace = get(cfg_toml, "shutdown", "grace_seconds", default=25)
        timeout = get(cfg_toml, "cognito", "request_timeout_seconds", default=10)
        need = grace + timeout + 5
        tgps = pod.get("terminationGracePeriodSeconds")
        c.check(isinstance(tgps, int) and tgps > need,
                f"{where}: terminationGracePeriodSeconds {tgps} must exceed shutdown.grace_seconds {grace} + "
                f"cognito.request_timeout_seconds {timeout} + 5 s delete flush = {need}")
        listen = get(cfg_toml, "metrics", "listen", default="0.0.0.0:9464")
        host, _, port = str(listen).rpartition(":")
        c.check(host not in ("127.0.0.1", "localhost", "[::1]"), f"{where}: metrics.listen {listen} is loopback-only: probes cannot reach it")
        if metrics_port:
            c.check(str(metrics_port.get("containerPort")) == port,
                    f"{where}: containerPort {metrics_port.get('containerPort')} = metrics.listen port {port}")
        region = env.get("AWS_REGION")
        m = re.match(r"https://sqs\.([a-z0-9-]+)\.amazonaws\.com/", get(cfg_toml, "sqs", "queue_url", default="") or "")
        if m and region:
            c.check(region == m.group(1), f"{where}: AWS_REGION {region} = the queue URL's Region {m.group(1)}")


def selector_matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_observability(c: Checks, where: str, docs: list[dict], pod_labels: dict, ctr: dict | None) -> None:
    port_names = {p.get("name") for p in (ctr or {}).get("ports") or []}
    pm = one(c, docs, "PodMonitor", where)
    if pm:
        c.check(pm.get("apiVersion") == "monitoring.coreos.com/v1", f"{where}: PodMonitor apiVersion monitoring.coreos.com/v1")
        c.check(not get(pm, "spec", "selector", "matchExpressions"), f"{where}: PodMonitor selector uses matchLabels only")
        c.check(selector_matches(get(pm, "spec", "selector", "matchLabels", default={}), pod_labels),
                f"{where}: PodMonitor selector {get(pm, 'spec', 'selector')} matches the pod labels {pod_labels}")
        endpoints = get(pm, "spec", "podMetricsEndpoints", default=[]) or []
        c.check(endpoints, f"{where}: PodMonitor has podMetricsEndpoints")
        for ep in endpoints:
            c.check(ep.get("port") in port_names, f"{where}: PodMonitor port {ep.get('port')!r} is a container port name {port_names}")
            c.check(ep.get("path", "/metrics") == "/metrics", f"{where}: PodMonitor path /metrics")
        job_label = get(pm, "spec", "jobLabel")
        c.check(job_label and pod_labels.get(job_label) == NAME,
                f"{where}: PodMonitor jobLabel {job_label!r} gives job={NAME!r}, as the alerts select")
    svc = one(c, docs, "Service", where, NAME)
    if svc:
        c.check(selector_matches(get(svc, "spec", "selector", default={}), pod_labels), f"{where}: Service selector matches the pod labels")
        for p in get(svc, "spec", "ports", default=[]) or []:
            c.check(p.get("targetPort") in port_names or isinstance(p.get("targetPort"), int),
                    f"{where}: Service targetPort {p.get('targetPort')!r} is a container port")


def normalized_pod(pod: dict) -> dict:
    pod = json.loads(json.dumps(pod))
    pod.pop("restartPolicy", None)
    for ctr in pod.get("containers") or []:
        ctr.pop("args", None)
    return pod


def check_base(c: Checks, docs: list[dict]) -> dict | None:
    where = "base"
    kinds = sorted(d["kind"] for d in docs)
    c.check(kinds == sorted(["ConfigMap", "Deployment", "PodMonitor", "Service", "ServiceAccount"]), f"{where}: kinds {kinds}")
    for d in docs:
        c.check(get(d, "metadata", "namespace") == NAME, f"{where}: {d['kind']} in namespace {NAME}")
    toml = worker_toml(docs)
    c.check(toml, f"{where}: a ConfigMap holds the worker's .toml")
    sa = one(c, docs, "ServiceAccount", where, NAME)
    if sa:
        c.check("eks.amazonaws.com/role-arn" in (get(sa, "metadata", "annotations", default={}) or {}),
                f"{where}: ServiceAccount has the IRSA annotation eks.amazonaws.com/role-arn")
    dep = one(c, docs, "Deployment", where, NAME)
    if not dep:
        return None
    c.check(get(dep, "spec", "replicas") == 1, f"{where}: Deployment replicas 1")
    c.check(get(dep, "spec", "strategy", "type") == "Recreate",
            f"{where}: Deployment strategy Recreate (a surge pod would double the rate cap)")
    pod_labels = get(dep, "spec", "template", "metadata", "labels", default={}) or {}
    c.check(selector_matches(get(dep, "spec", "selector", "matchLabels", default={}), pod_labels), f"{where}: Deployment selector matches its pod labels")
    c.check(pod_labels.get(NAME_LABEL) == NAME, f"{where}: pod label {NAME_LABEL}={NAME}")
    pod = get(dep, "spec", "template", "spec", default={})
    check_pod(c, f"{where} Deployment", pod, docs, toml)
    ctr = container(pod)
    if ctr:
        c.check(ctr.get("args") == ["run", "--config", config_path(ctr)], f"{where}: Deployment args run --config FILE, got {ctr.get('args')}")
    check_observability(c, where, docs, pod_labels, ctr)
    return dep


def check_job(c: Checks, docs: list[dict], base_dep: dict | None) -> None:
    where = "overlays/job"
    c.check(not find(docs, "Deployment"), f"{where}: no Deployment (the Job replaces it)")
    job = one(c, docs, "Job", where, NAME)
    if not job:
        return
    spec = job.get("spec") or {}
    c.check(isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] >= 1, f"{where}: backoffLimit set")
    c.check(isinstance(spec.get("ttlSecondsAfterFinished"), int), f"{where}: ttlSecondsAfterFinished set")
    pod = get(spec, "template", "spec", default={})
    c.check(pod.get("restartPolicy") == "Never", f"{where}: restartPolicy Never (podFailurePolicy requires it)")
    fail_codes: set[int] = set()
    for rule in get(spec, "podFailurePolicy", "rules", default=[]) or []:
        codes = rule.get("onExitCodes") or {}
        if rule.get("action") == "FailJob" and codes.get("operator") == "In":
            fail_codes |= set(codes.get("values") or [])
    c.check({2, 3} <= fail_codes, f"{where}: podFailurePolicy FailJob on exit codes 2 (bad config) and 3 (halted), got {sorted(fail_codes)}")
    toml = worker_toml(docs)
    check_pod(c, f"{where} Job", pod, docs, toml)
    ctr = container(pod)
    if ctr:
        args = ctr.get("args") or []
        c.check(args[:1] == ["run"] and "--until-empty" in args, f"{where}: args run --until-empty, got {args}")
    if base_dep and ctr:
        base_pod = get(base_dep, "spec", "template", "spec", default={})
        base_args = container(base_pod).get("args") or []
        c.check(sorted(a for a in args if a != "--until-empty") == sorted(base_args),
                f"{where}: args are the Deployment's plus --until-empty: {args} vs {base_args}")
        c.check(normalized_pod(pod) == normalized_pod(base_pod),
                f"{where}: the Job's pod spec drifted from base/deployment.yaml's (apart from restartPolicy and args)")
        c.check(get(job, "spec", "template", "metadata", "labels") == get(base_dep, "spec", "template", "metadata", "labels"),
                f"{where}: the Job's pod labels equal the Deployment's (PodMonitor, Service)")
    check_observability(c, where, docs, get(spec, "template", "metadata", "labels", default={}) or {}, ctr)


def check_keda(c: Checks, docs: list[dict]) -> None:
    where = "overlays/keda"
    dep = one(c, docs, "Deployment", where, NAME)
    if dep:
        c.check("replicas" not in (dep.get("spec") or {}), f"{where}: Deployment without spec.replicas (KEDA owns it)")
    so = one(c, docs, "ScaledObject", where)
    if not so:
        return
    c.check(so.get("apiVersion") == "keda.sh/v1alpha1", f"{where}: ScaledObject apiVersion keda.sh/v1alpha1")
    spec = so.get("spec") or {}
    target = spec.get("scaleTargetRef") or {}
    c.check(target.get("kind", "Deployment") == "Deployment" and dep and target.get("name") == dep["metadata"]["name"],
            f"{where}: scaleTargetRef names the Deployment")
    c.check(spec.get("minReplicaCount") == 0, f"{where}: minReplicaCount 0")
    c.check(spec.get("maxReplicaCount") == 1,
            f"{where}: maxReplicaCount 1 (limits.max_rps is per process; the account quota is 30/s)")
    triggers = spec.get("triggers") or []
    sqs = [t for t in triggers if t.get("type") == "aws-sqs-queue"]
    if not c.check(len(sqs) == 1 and len(triggers) == 1, f"{where}: exactly one trigger, of type aws-sqs-queue"):
        return
    meta = sqs[0].get("metadata") or {}
    toml = worker_toml(docs)
    queue_url = get(toml[1], "sqs", "queue_url") if toml else None
    c.check(meta.get("queueURL") and meta.get("queueURL") == queue_url,
            f"{where}: trigger queueURL {meta.get('queueURL')!r} = sqs.queue_url {queue_url!r}")
    c.check(meta.get("awsRegion"), f"{where}: trigger awsRegion set")
    if dep and container(get(dep, "spec", "template", "spec", default={})):
        region = env_of(container(dep["spec"]["template"]["spec"])).get("AWS_REGION")
        c.check(meta.get("awsRegion") == region, f"{where}: trigger awsRegion {meta.get('awsRegion')} = the pod's AWS_REGION {region}")
    for key in ("queueLength", "activationQueueLength"):
        if key in meta:
            c.check(isinstance(meta[key], str) and meta[key].isdigit(), f"{where}: {key} is a quoted integer")
    auth = get(sqs[0], "authenticationRef", "name")
    if auth:
        ta = one(c, docs, "TriggerAuthentication", where, auth)
        if ta:
            c.check(ta.get("apiVersion") == "keda.sh/v1alpha1", f"{where}: TriggerAuthentication apiVersion keda.sh/v1alpha1")
            c.check(get(ta, "spec", "podIdentity", "provider") == "aws", f"{where}: TriggerAuthentication podIdentity.provider aws")
            pid = get(ta, "spec", "podIdentity", default={}) or {}
            c.check(not ("roleArn" in pid and "identityOwner" in pid), f"{where}: podIdentity roleArn and identityOwner are exclusive")
    else:
        c.check(meta.get("identityOwner") == "operator", f"{where}: no authenticationRef: metadata.identityOwner operator")


def check_monitoring(c: Checks, docs: list[dict]) -> None:
    where = "monitoring"
    rule = one(c, docs, "PrometheusRule", where, NAME)
    if rule:
        c.check(rule.get("apiVersion") == "monitoring.coreos.com/v1", f"{where}: PrometheusRule apiVersion monitoring.coreos.com/v1")
        groups = get(rule, "spec", "groups", default=[]) or []
        c.check(groups, f"{where}: PrometheusRule has groups")
        alerts = set()
        for g in groups:
            c.check(g.get("name") and g.get("rules"), f"{where}: group {g.get('name')!r} has a name and rules")
            for r in g.get("rules") or []:
                name = r.get("alert")
                alerts.add(name)
                c.check(name and r.get("expr"), f"{where}: rule {name!r} has alert and expr")
                c.check(get(r, "labels", "severity") in ("critical", "warning", "info"), f"{where}: {name} has a severity")
                c.check(get(r, "annotations", "summary"), f"{where}: {name} has a summary")
                if "for" in r:
                    c.check(re.fullmatch(r"(\d+[smhdwy])+", str(r["for"])), f"{where}: {name}: for {r['for']!r}")
                for tpl in (r.get("annotations") or {}).values():
                    c.check(tpl.count("{{") == tpl.count("}}"), f"{where}: {name}: balanced {{{{ }}}} in annotations")
        c.check(len(alerts) == sum(len(g.get("rules") or []) for g in groups), f"{where}: alert names are unique")
    dash = one(c, docs, "ConfigMap", where)
    if dash:
        c.check(get(dash, "metadata", "labels", "grafana_dashboard") == "1", f"{where}: dashboard ConfigMap labelled grafana_dashboard=1")
        body = next(iter((dash.get("data") or {}).values()), "")
        c.check(json.loads(body) == json.loads(DASHBOARD.read_text()), f"{where}: dashboard ConfigMap holds grafana-dashboard.json")


def check_promql(c: Checks) -> None:
    exprs = promql_exprs()
    c.check(len(exprs) > 10, "alerts and dashboard: PromQL expressions found")
    for where, expr in exprs:
        src = substitute_grafana(expr)
        err, names = parse_promql(src)
        c.check(err is None, f"{where}: PromQL does not parse: {err}: {expr}")
        if err is None:
            for name in names:
                c.check(name.startswith("reset_worker_") or name == "up", f"{where}: uses a foreign metric {name}")
        c.check("$" not in src, f"{where}: an unknown Grafana variable in {expr}")


def check_dashboard(c: Checks) -> None:
    dash = json.loads(DASHBOARD.read_text())
    c.check(dash.get("uid") and dash.get("title"), "dashboard: uid and title")
    names = {v.get("name") for v in get(dash, "templating", "list", default=[]) or []}
    c.check({"datasource", "namespace"} <= names, f"dashboard: variables datasource and namespace, got {names}")
    ids = [p.get("id") for p in walk_panels(dash.get("panels") or [])]
    c.check(len(ids) == len(set(ids)), "dashboard: panel ids unique")
    for p in walk_panels(dash.get("panels") or []):
        if p.get("type") == "row":
            continue
        c.check(get(p, "datasource", "uid") == "${datasource}", f"dashboard: panel {p.get('title')!r} uses the datasource variable")
        c.check(p.get("targets"), f"dashboard: panel {p.get('title')!r} has targets")
        for k in ("h", "w", "x", "y"):
            c.check(isinstance(get(p, "gridPos", k), int), f"dashboard: panel {p.get('title')!r} gridPos.{k}")
    used = used_metric_names()
    documented = {
        "reset_worker_jobs_total", "reset_worker_cognito_requests_total",
        "reset_worker_cognito_request_duration_seconds_bucket", "reset_worker_throttled_total",
        "reset_worker_in_flight_jobs", "reset_worker_sqs_requests_total", "reset_worker_job_age_seconds_bucket",
        "reset_worker_rate_limit_per_second", "reset_worker_ready", "reset_worker_delete_failures_total",
    }
    c.check(documented <= set(used), f"dashboard/alerts: not shown anywhere: {sorted(documented - set(used))}")


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def check_dockerfile(c: Checks) -> None:
    ins = dockerfile_instructions()
    args = dict(re.match(r"(\w+)=?(.*)", rest).groups() for op, rest in ins if op == "ARG" and "=" in rest)
    froms = [i for i, (op, _) in enumerate(ins) if op == "FROM"]
    c.check(len(froms) >= 3, "Dockerfile: multi-stage (planner, builder, runtime)")
    if not froms:
        return
    stage_images = [ins[i][1].split()[0] for i in froms]
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s) for s in stage_images]
    rust = [s for s in resolved if s.startswith("rust:")]
    c.check(rust, f"Dockerfile: a rust: builder image, got {resolved}")
    c.check(all("bookworm" in s for s in rust),
            f"Dockerfile: rust builder is bookworm (glibc of distroless cc-debian12), got {rust}")
    want_rust = re.search(r'^rust-version\s*=\s*"([\d.]+)"', CARGO_TOML.read_text(), re.M)
    if want_rust:
        c.check(all(s.startswith(f"rust:{want_rust.group(1)}") for s in rust),
                f"Dockerfile: builder Rust = Cargo.toml rust-version {want_rust.group(1)}, got {rust}")
    text = DOCKERFILE.read_text()
    c.check("cargo chef prepare" in text and "cargo chef cook" in text, "Dockerfile: dependencies cached with cargo-chef")
    c.check(re.search(r"cargo build --release --locked", text), "Dockerfile: cargo build --release --locked")
    final = ins[froms[-1]:]
    c.check(final[0][1] == "gcr.io/distroless/cc-debian12:nonroot", f"Dockerfile: runtime gcr.io/distroless/cc-debian12:nonroot, got {final[0][1]}")
    ops = [op for op, _ in final]
    c.check("RUN" not in ops, "Dockerfile: no RUN in the runtime stage (it has no shell)")
    users = [rest for op, rest in final if op == "USER"]
    c.check(users and users[-1] in ("65532", "65532:65532", "nonroot", "nonroot:nonroot"), f"Dockerfile: runtime USER 65532, got {users}")

    def exec_form(op: str):
        vals = [rest for o, rest in final if o == op]
        try:
            return json.loads(vals[-1]) if vals else None
        except ValueError:
            return vals[-1]

    c.check(exec_form("ENTRYPOINT") == ["reset-worker"], f"Dockerfile: ENTRYPOINT [\"reset-worker\"], got {exec_form('ENTRYPOINT')}")
    c.check(exec_form("CMD") == ["run"], f"Dockerfile: CMD [\"run\"], got {exec_form('CMD')}")
    copies = [rest for op, rest in final if op == "COPY"]
    c.check(any(r.startswith("--from=") and r.endswith("/usr/local/bin/reset-worker") for r in copies),
            "Dockerfile: the runtime copies the binary to /usr/local/bin/reset-worker (on distroless's PATH)")
    ignore = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")}
    for must in ("target", ".git", ".venv"):
        c.check(must in ignore, f".dockerignore: excludes {must}/")
    for keep in ("src", "Cargo.toml", "Cargo.lock"):
        c.check(keep not in ignore, f".dockerignore: keeps {keep}")


def check_iam(c: Checks) -> None:
    policy = json.loads(IAM_POLICY.read_text())
    c.check(policy.get("Version") == "2012-10-17", "iam: Version 2012-10-17")
    stmts = {s.get("Sid"): s for s in policy.get("Statement") or []}
    c.check(set(stmts) == set(EXPECTED_IAM), f"iam: statements {sorted(stmts)}")
    for sid, actions in EXPECTED_IAM.items():
        s = stmts.get(sid) or {}
        got = s.get("Action")
        got = {got} if isinstance(got, str) else set(got or [])
        c.check(s.get("Effect") == "Allow" and got == actions, f"iam: {sid} allows exactly {sorted(actions)}, got {sorted(got)}")
        res = s.get("Resource")
        c.check(isinstance(res, str) and res.startswith("arn:aws:sqs:") and "*" not in res, f"iam: {sid} on one queue ARN, got {res}")
    c.check(not any("cognito" in json.dumps(s) for s in stmts.values()), "iam: no cognito-idp action (ForgotPassword needs no IAM)")
    admin = json.loads(IAM_ADMIN_RESET.read_text())
    stmts = admin.get("Statement") or []
    c.check(len(stmts) == 1 and stmts[0].get("Action") in ("cognito-idp:AdminResetUserPassword", ["cognito-idp:AdminResetUserPassword"])
            and str(stmts[0].get("Resource", "")).startswith("arn:aws:cognito-idp:") and ":userpool/" in stmts[0]["Resource"],
            "iam: policy-admin-reset.json allows only cognito-idp:AdminResetUserPassword on one user pool")


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
    template = flatten(tomllib.loads(CONFIG_TEMPLATE.read_text()))
    deployed = flatten(toml[1])
    for key in sorted(set(template) | set(deployed)):
        if key in PLACEHOLDER_KEYS:
            continue
        if template.get(key, "(unset)") != deployed.get(key, "(unset)"):
            print(f"note: {key} = {deployed.get(key, '(unset)')!r} in deploy/kubernetes/base/{toml[0]}, "
                  f"{template.get(key, '(unset)')!r} in config/reset-worker.toml", file=sys.stderr)


def cmd_static(render_dir: Path) -> int:
    c = Checks()
    if all((render_dir / f"{r}.yaml").is_file() for r in RENDERS):
        renders = {r: load_render(render_dir, r) for r in RENDERS}
        base_dep = check_base(c, renders["base"])
        note_template_drift(renders["base"])
        check_job(c, renders["job"], base_dep)
        check_keda(c, renders["keda"])
        check_monitoring(c, renders["monitoring"])
    else:
        print(f"static: no renders in {render_dir}: checking only what needs none", file=sys.stderr)
    check_promql(c)
    check_dashboard(c)
    check_dockerfile(c)
    check_iam(c)
    return c.finish("static")


# ---------------------------------------------------------------- config / live


def materialize(docs: list[dict], kind: str, root: Path, secret: str) -> tuple[list[str], dict[str, str]]:
    """Writes the workload's ConfigMap and Secret volumes under `root` as the
    pod would see them, and returns its args and RESET_WORKER_*/AWS_REGION env
    with those paths moved under `root`."""
    workload = find(docs, kind, NAME)[0]
    pod = workload["spec"]["template"]["spec"]
    ctr = container(pod)
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for m in ctr.get("volumeMounts") or []:
        vol = volumes[m["name"]]
        target = root / m["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in vol:
            cm = find(docs, "ConfigMap", vol["configMap"]["name"])[0]
            for key, text in (cm.get("data") or {}).items():
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
    for render, kind in (("base", "Deployment"), ("job", "Job")):
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


def exposed_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        m = re.match(r"(?:# TYPE )?(reset_worker_[a-z_]+)", line)
        if m:
            names.add(m.group(1))
    return names


def jobs_total(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if re.match(r"reset_worker_jobs_total[{ ]", line))


def cmd_live(render_dir: Path, binary: Path) -> int:
    c = Checks()
    jobs = int(os.environ["LOCAL_JOB_COUNT"])
    secret = os.environ["RESET_WORKER_COGNITO__CLIENT_SECRET"]
    listen = os.environ["RESET_WORKER_METRICS__LISTEN"]
    docs = load_render(render_dir, "base")
    tmp = Path(tempfile.mkdtemp(prefix="check-deploy-live-"))
    log = tmp / "worker.log"
    try:
        args, env = materialize(docs, "Deployment", tmp / "root", secret)
        # The pod's env, then the local stack's: queue, client, listener, region.
        extra = dict(env)
        for k, v in os.environ.items():
            if k.startswith("RESET_WORKER_") and k != "RESET_WORKER_COGNITO__CLIENT_SECRET":
                extra[k] = v
        extra["AWS_REGION"] = os.environ.get("AWS_REGION", "us-east-1")
        run_env = clean_env(extra)
        base = f"http://{listen}"
        with log.open("w") as out:
            proc = subprocess.Popen([str(binary), *args], env=run_env, stdout=out, stderr=subprocess.STDOUT)
        metrics = ""
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and proc.poll() is None:
            status, body = http_get(f"{base}/metrics")
            if status == 200:
                metrics = body
                if jobs_total(body) >= jobs:
                    break
            time.sleep(0.2)
        c.check(proc.poll() is None, f"the worker exited early with {proc.returncode}")
        c.check(jobs_total(metrics) >= jobs, f"reset_worker_jobs_total reached {jobs_total(metrics)} of {jobs} in 40 s")
        pod = find(docs, "Deployment", NAME)[0]["spec"]["template"]["spec"]
        ctr = container(pod)
        for probe in ("livenessProbe", "readinessProbe"):
            path = ctr[probe]["httpGet"]["path"]
            status, _ = http_get(f"{base}{path}")
            c.check(status == 200, f"{probe} GET {path} answered {status}, not 200")
        # One more scrape, after the last outcome was recorded.
        status, body = http_get(f"{base}/metrics")
        if status == 200:
            metrics = body
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

        exposed = exposed_names(metrics)
        declared = telemetry_names()
        for name, where in sorted(used_metric_names().items()):
            if name in exposed:
                c.check(True, name)
            elif name in EVENT_ONLY_METRICS:
                c.check(base_metric(name) in declared,
                        f"{name} (event-only, used by {sorted(where)}) is not a name constant in src/telemetry.rs")
                print(f"live: {name}: event-only, declared in src/telemetry.rs", file=sys.stderr)
            else:
                c.check(False, f"{name} (used by {sorted(where)}) is not in the worker's /metrics output"
                        + (" (declared in src/telemetry.rs: add it to EVENT_ONLY_METRICS if it appears only after an event)"
                           if base_metric(name) in declared else " nor declared in src/telemetry.rs"))
        for name in EVENT_ONLY_METRICS:
            c.check(name in declared, f"EVENT_ONLY_METRICS lists {name}, which src/telemetry.rs does not declare")
        if c.failures:
            print(f"--- worker log ({log}) ---\n{log.read_text()[-3000:]}", file=sys.stderr)
        return c.finish("live")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("schemas", "static", "config", "live"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, render_dir = argv[0], Path(argv[1])
    if cmd == "schemas":
        return cmd_schemas(render_dir)
    if cmd == "static":
        return cmd_static(render_dir)
    binary = Path(argv[2])
    return cmd_config(render_dir, binary) if cmd == "config" else cmd_live(render_dir, binary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
