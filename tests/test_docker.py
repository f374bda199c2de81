"""The serving image built from the Dockerfile and run for real: ready, healthy, non-root, torch-free; it classifies
real Fashion-MNIST PNGs exactly as the in-process runtime does; a real Prometheus scrapes it with the files of
deploy/prometheus (target overridden), the recording rule's compute fraction matches the server's own counters,
and every expression of the Grafana dashboard returns data.

The engine, the stand-in base and the build are tests/docker_engine.py's. Run alone:
`.venv/bin/python -m pytest -q tests/test_docker.py -s` prints the build figures."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
import yaml

from conftest import real_test_images
from docker_engine import Engine, EngineUnavailable, build, dockerfile_base, ensure_base, fail_or_skip
from prometheus_process import Prometheus, prometheus_or_fail
from reskd.device import Device
from reskd.manifest import ModelRepository, load_manifest
from reskd.preprocess import preprocess
from reskd.runtime import CascadeRuntime
from server_process import BUNDLED, ROOT, free_port, metric, scrape, wait_until_ready

# The image serves the bundled repository: a request without a version gets its highest version.
LATEST = str(ModelRepository(BUNDLED).versions("fashion-mnist")[-1])
CASCADE = BUNDLED / "fashion-mnist" / LATEST
TAG = "reskd:pytest"
UID = "10001"

pytestmark = [pytest.mark.docker, pytest.mark.server, pytest.mark.prometheus, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    try:
        e = Engine(tmp_path_factory.mktemp("docker"))
    except EngineUnavailable as err:
        fail_or_skip(f"Docker engine unavailable: {err}")
    yield e
    e.stop()


@pytest.fixture(scope="module")
def image(engine):
    base = dockerfile_base()
    try:
        base_s = ensure_base(engine, base)
    except EngineUnavailable as err:
        fail_or_skip(str(err))
    build_s = build(engine, TAG)
    size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", TAG).stdout)
    print(f"\n[docker] stand-in base {base}: {base_s:.0f} s (0: kept); image build: {build_s:.0f} s; "
          f"image size: {size / 2**20:.0f} MiB")
    return {"tag": TAG, "size": size}


class Container:
    def __init__(self, engine: Engine, tag: str, **env: str):
        self.engine = engine
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = f"reskd-pytest-{uuid.uuid4().hex[:8]}"
        # Host networking (no bridge here): the port is chosen by a setting, as a user would.
        settings = [x for k, v in env.items() for x in ("-e", f"{k}={v}")]
        self.id = engine.docker("run", "-d", "--network=host", "--name", self.name, "-e", f"RESKD_PORT={self.port}",
                                "-e", f"RESKD_GRPC_PORT={self.grpc_port}", "-e", "RESKD_INTRA_OP_THREADS=1", *settings,
                                tag).stdout.strip()

    def logs(self) -> str:
        r = self.engine.docker("logs", self.id, check=False)
        return (r.stdout + r.stderr)[-4000:]

    def running(self) -> bool:
        r = self.engine.docker("inspect", "-f", "{{.State.Running}}", self.id, check=False)
        return r.stdout.strip() == "true"

    def exec(self, *cmd) -> str:
        return self.engine.docker("exec", self.id, *cmd).stdout

    def remove(self) -> None:
        self.engine.docker("rm", "-f", self.id, check=False)


class _Proc:  # wait_until_ready's view of a container
    def __init__(self, container: Container):
        self.container = container
        self.returncode = None

    def poll(self):
        if not self.container.running():
            self.returncode = "exited"
            return self.returncode
        return None


@pytest.fixture(scope="module")
def container(engine, image):
    # Every answer given early audited (the default fraction would audit none of the tests' few images), so the
    # dashboard's audit panels have data.
    c = Container(engine, image["tag"], RESKD_AUDIT_FRACTION="1", RESKD_AUDIT_MAX_COMPUTE_PCT="10000")
    try:
        wait_until_ready(f"{c.url}/v2/health/ready", _Proc(c), c.logs, "the reskd container", timeout=90)
        yield c
    finally:
        c.remove()


@pytest.fixture(scope="module")
def prometheus(container, tmp_path_factory):
    """Prometheus on the files of deploy/prometheus, only the target (the container) and the intervals (1 s, so
    a test need not wait) overridden. It has scraped the container's zero counters before any traffic."""
    binary = prometheus_or_fail()
    workdir = tmp_path_factory.mktemp("prometheus")
    config_dir = workdir / "config"
    shutil.copytree(ROOT / "deploy" / "prometheus", config_dir)
    config = yaml.safe_load((config_dir / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [container.url.removeprefix("http://")]}]
    (config_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = Prometheus(binary, config_dir / "prometheus.yml", workdir)
    try:
        prom.wait_for('up{job="reskd"}', lambda v: v == 1)
        prom.wait_for(f'reskd_images_total{{model="fashion-mnist",version="{LATEST}"}}', lambda v: v == 0)
        yield prom
    finally:
        prom.stop()


@pytest.fixture(scope="module")
def pngs():
    """The first 48 test images of the real Fashion-MNIST, as PNG files."""
    return [(f"test{i}.png", blob) for i, blob in enumerate(real_test_images(48))]


def classify(url: str, files, **params) -> list[dict]:
    r = httpx.post(f"{url}/v1/models/fashion-mnist/classify", files=[("file", f) for f in files], params=params,
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_container_classifies_real_images_as_the_in_process_runtime(container, prometheus, pngs):
    runtime = CascadeRuntime(CASCADE, device=Device.cpu())
    images = np.stack([preprocess(data, runtime.manifest.input) for _, data in pngs])
    stages_seen = set()
    for params in ({}, {"threshold": 0.9}, {"threshold": 1.0}):
        served = classify(container.url, pngs, **params)
        want = runtime.run(images, threshold=params.get("threshold"))
        assert [p["class_id"] for p in served] == want.class_id.tolist(), params
        assert [p["exit_stage"] for p in served] == want.exit_stage.tolist(), params
        assert [p["flops"] for p in served] == want.flops.tolist(), params
        assert [p["confidence"] for p in served] == pytest.approx(want.confidence.tolist(), abs=1e-6)
        stages_seen |= set(want.exit_stage.tolist())
    assert stages_seen == set(range(runtime.num_stages))  # the comparison covered every exit stage
    # The image's /metrics counted exactly that.
    with httpx.Client(base_url=container.url) as c:
        samples = scrape(c)
    served = {"model": "fashion-mnist", "version": LATEST}
    assert metric(samples, "reskd_images_total", **served) == 3 * len(pngs)
    assert metric(samples, "reskd_exit_confidence_count", **served) == 3 * len(pngs)
    manifest = load_manifest(CASCADE)
    assert metric(samples, "reskd_calibrated_compute_fraction", **served) == pytest.approx(
        manifest.calibration.mean_flops / manifest.teacher.flops)
    assert metric(samples, "reskd_ready") == 1


def test_container_answers_grpc_as_http(container, pngs):
    """The image serves gRPC beside HTTP (RESKD_GRPC_PORT, 8001 unless set): a stock tritonclient.grpc call gets the
    classes, exits and compute the HTTP route gave for the same real images."""
    import tritonclient.grpc as grpcclient

    runtime = CascadeRuntime(CASCADE, device=Device.cpu())
    images = np.stack([preprocess(data, runtime.manifest.input) for _, data in pngs]).astype(np.float32)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{container.grpc_port}")
    try:
        assert client.is_server_ready()
        tensor = grpcclient.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        result = client.infer("fashion-mnist", [tensor], outputs=[
            grpcclient.InferRequestedOutput(n) for n in ("class_id", "exit_stage", "flops")])
    finally:
        client.close()
    served = classify(container.url, pngs)
    assert result.as_numpy("class_id").tolist() == [p["class_id"] for p in served]
    assert result.as_numpy("exit_stage").tolist() == [p["exit_stage"] for p in served]
    assert result.as_numpy("flops").tolist() == [p["flops"] for p in served]


def test_image_runs_as_non_root_without_torch(engine, image, container):
    assert engine.docker("image", "inspect", "-f", "{{.Config.User}}", image["tag"]).stdout.strip() == UID
    status = container.exec("cat", "/proc/1/status")  # the server is the container's first process
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert uids == [UID] * 4, status
    assert "reskd" in container.exec("cat", "/proc/1/cmdline")
    probe = ("import importlib.util, json, onnxruntime; "
             "print(json.dumps([importlib.util.find_spec(m) is not None for m in ('torch', 'torchvision')] "
             "+ [onnxruntime.get_available_providers()]))")
    torch, torchvision, providers = json.loads(container.exec("python3", "-c", probe))
    assert (torch, torchvision) == (False, False)
    assert "CPUExecutionProvider" in providers and "CUDAExecutionProvider" not in providers
    packages = container.exec("python3", "-m", "pip", "list", "--format=freeze").lower()
    assert "torch" not in packages and "onnxruntime==" in packages
    # The versions deploy/docker/constraints.txt pins, every one of them installed.
    pins = {line.lower() for line in (ROOT / "deploy" / "docker" / "constraints.txt").read_text().split() if "==" in line}
    installed = {line.replace("_", "-") for line in packages.split()}
    assert pins <= installed, pins - installed
    assert image["size"] < 1 << 30, f"image is {image['size'] / 2**20:.0f} MiB"
    # Writable only where it must be: the bundled models belong to root.
    assert container.exec("stat", "-c", "%u", "/opt/reskd/models").strip() == "0"


def test_docker_health_check_turns_healthy(engine, container):
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline:
        status = engine.docker("inspect", "-f", "{{.State.Health.Status}}", container.id).stdout.strip()
        if status == "healthy":
            break
        time.sleep(1)
    assert status == "healthy", engine.docker("inspect", "-f", "{{json .State.Health}}", container.id).stdout


def test_prometheus_with_the_deploy_rules_matches_the_servers_counters(container, prometheus, pngs):
    classify(container.url, pngs[:20], threshold=0.95)
    with httpx.Client(base_url=container.url) as c:
        samples = scrape(c)
    cm = {"model": "fashion-mnist", "version": LATEST}
    images = metric(samples, "reskd_images_total", **cm)
    want = metric(samples, "reskd_flops_total", **cm) / metric(samples, "reskd_teacher_flops_total", **cm)
    assert images > 0
    prometheus.wait_for(f'reskd_images_total{{model="fashion-mnist",version="{LATEST}"}}', lambda v: v == images)
    series = f'model_version:reskd_compute_fraction:rate5m{{model="fashion-mnist",version="{LATEST}"}}'
    got = prometheus.wait_for(series, lambda v: math.isclose(v, want, rel_tol=1e-9))
    assert 0 < got < 1
    # Every rule group loaded from deploy/prometheus and evaluates without error on the real series.
    groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {g["name"] for g in groups} == {"reskd-recording", "reskd-alerts"}
    for rule in (r for g in groups for r in g["rules"]):
        assert rule["health"] == "ok", rule


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "reskd.json").read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def test_every_dashboard_expression_returns_data(container, prometheus, pngs):
    # Traffic within the last minute, errors included, so every panel has something to show. Twice, a few 1 s
    # scrapes apart: a series is born with its first request, and rate() sees no increase until a later scrape has
    # it grown (run alone, with no earlier test's traffic, one round left the latency quantiles NaN).
    for _ in range(2):
        classify(container.url, pngs[:16])
        classify(container.url, pngs[:16], threshold=1.0)
        assert httpx.post(f"{container.url}/v1/classify", content=b"not an image",
                          headers={"content-type": "image/png"}).status_code == 415
        assert httpx.post(f"{container.url}/v1/models/nope/classify", content=pngs[0][1]).status_code == 404
        time.sleep(3)  # a few scrapes and rule evaluations
    empty = []
    for title, expr in dashboard_queries():
        # Grafana's variables: every model, and a rate window that spans a few 1 s scrapes.
        query = expr.replace("$model", ".*").replace("$__rate_interval", "1m")
        assert "$" not in query, f"{title}: an unknown variable in {expr!r}"
        result = prometheus.query(query)
        values = [float(r["value"][1]) for r in result]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title}: {query} -> {result}")
    assert not empty, "dashboard expressions without data:\n" + "\n".join(empty)


def test_docker_stop_drains_and_the_server_exits_0(engine, image):
    """`docker stop` sends SIGTERM to the server (the entry point, PID 1): readiness fails at once, the listener
    stays open for the drain window, then the process exits 0 well before Docker's SIGKILL."""
    c = Container(engine, image["tag"])
    try:
        wait_until_ready(f"{c.url}/v2/health/ready", _Proc(c), c.logs, "the reskd container", timeout=90)
        stopping = threading.Thread(target=engine.docker, args=("stop", "-t", "30", c.id))
        stopping.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{c.url}/v2/health/ready", timeout=5).status_code == 200:  # the listener is still open
            assert time.monotonic() < deadline, c.logs()
            time.sleep(0.05)
        assert httpx.get(f"{c.url}/v2/health/live", timeout=5).status_code == 200
        stopping.join(60)
        code = engine.docker("inspect", "-f", "{{.State.ExitCode}}", c.id).stdout.strip()
        assert code == "0", c.logs()
        assert "drain window over" in c.logs()
    finally:
        c.remove()
