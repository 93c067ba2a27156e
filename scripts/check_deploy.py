#!/usr/bin/env python3
"""The checks of deploy/ that no tool does; scripts/check-deploy.sh runs them
after the tools (kubernetes-validate, check-jsonschema with deploy/schemas/,
yamllint, hadolint).

  split    RENDER_DIR      each render holds exactly the expected kinds; writes
                           every object to RENDER_DIR/objects/RENDER.KIND.NAME.yaml
                           for check-jsonschema
  static   RENDER_DIR      consistency between the objects, the worker's config,
                           the Dockerfile, the alerts and the dashboard; the PromQL
                           parses (promql-parser). Without renders, only the parts
                           that need none.
  config   RENDER_DIR BIN  `BIN config` accepts the ConfigMap as mounted, with
                           the pod's environment, and prints no secret
  live     RENDER_DIR BIN  runs the base Deployment's command line against a
                           local stack (moto; RESET_WORKER_* from
                           scripts/local_stack.py in the environment), checks the
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
    dep = check_workload(c, "base", docs, "Deployment")
    if dep:
        c.check(dep["spec"].get("replicas") == 1, "base: Deployment replicas 1 (limits.max_rps is per process)")
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


def check_keda(c: Checks, docs: list[dict]) -> None:
    where = "overlays/keda"
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
        base_dep = check_base(c, renders["base"])
        note_template_drift(renders["base"])
        check_job(c, renders["job"], base_dep)
        check_keda(c, renders["keda"])
        check_monitoring(c, renders["monitoring"])
    else:
        print(f"static: no renders in {render_dir}: checking only what needs none", file=sys.stderr)
    check_promql(c)
    check_dockerfile(c)
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
