"""A real Docker engine for tests: the one already running, or Debian's dockerd started here (and stopped at the end);
the Dockerfile's base image stood in for where no registry can be reached; the image built; a container run.

Where the engine cannot be had (no docker.io, not root, dockerd fails to start), the tests that need it fail under
CI=true, where `make test` installs and may start it, and skip elsewhere: never a silent pass."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import lanes

ROOT = Path(__file__).resolve().parents[1]
# No bridge network or iptables on these machines: builds and containers use the host's network.
DOCKERD_ARGS = ["--iptables=false", "--bridge=none", "--storage-driver=overlay2"]


class EngineUnavailable(Exception):
    pass


def fail_or_skip(message: str):
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def docker_cli() -> str:
    """Debian's docker.io CLI when installed: it matches its engine and has BuildKit built in (a newer CLI earlier on
    PATH would need the buildx plugin for `--secret`)."""
    if Path("/usr/bin/docker").is_file():
        return "/usr/bin/docker"
    found = shutil.which("docker")
    if not found:
        raise EngineUnavailable("no docker CLI: apt-get install docker.io containerd runc iptables debootstrap")
    return found


class Engine:
    """self.docker(...) runs the CLI; an engine started here is stopped by stop()."""

    def __init__(self, workdir: Path):
        lanes.require("docker", "a Docker engine")
        self.cli = docker_cli()
        self.proc: subprocess.Popen | None = None
        if self.docker("info", check=False, timeout=30).returncode == 0:
            return  # an engine is running already: use it, leave it running
        dockerd = shutil.which("dockerd")
        if not dockerd:
            raise EngineUnavailable("no dockerd: apt-get install docker.io containerd runc iptables debootstrap")
        if os.geteuid() != 0:
            raise EngineUnavailable("no Docker engine is running and starting dockerd needs root")
        self.log_path = workdir / "dockerd.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([dockerd, *DOCKERD_ARGS], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while self.docker("info", check=False, timeout=30).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise EngineUnavailable(f"dockerd {' '.join(DOCKERD_ARGS)} did not start:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:] if self.proc else ""

    def docker(self, *args, check: bool = True, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
        result = subprocess.run([self.cli, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                                env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(map(str, args))} failed ({result.returncode}):\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # dockerd stops its containers and its own containerd
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.proc = None


def dockerfile_base(dockerfile: Path = ROOT / "Dockerfile") -> str:
    match = re.search(r"^ARG BASE=(\S+)", dockerfile.read_text(), re.M)
    assert match, "the Dockerfile names its base in `ARG BASE=...`"
    return match.group(1)


def ensure_base(engine: Engine, image: str) -> float:
    """The base image by its exact name: kept from an earlier run, else a stand-in made once per machine
    (tests/standin_base.sh: debootstrap + docker import). -> seconds spent making it (0 when kept)."""
    if engine.docker("image", "inspect", image, check=False).returncode == 0:
        return 0.0
    if not shutil.which("debootstrap"):
        raise EngineUnavailable(f"{image} is not in the engine and debootstrap is missing to stand in for it "
                                "(apt-get install debootstrap)")
    start = time.monotonic()
    result = subprocess.run(["bash", str(ROOT / "tests" / "standin_base.sh"), image], capture_output=True, text=True,
                            timeout=900, env={**os.environ, "DOCKER": engine.cli})
    assert result.returncode == 0, f"making the stand-in for {image} failed:\n{result.stdout}\n{result.stderr}"
    return time.monotonic() - start


def extra_ca_bundle() -> str | None:
    """The machine's CA bundle where it trusts extra CAs (a TLS-inspecting proxy): pip inside the build needs it.
    Passed as a BuildKit secret, so it never lands in a layer."""
    extra = Path("/usr/local/share/ca-certificates")
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.is_file() and extra.is_dir() and any(extra.rglob("*.crt")):
        return str(bundle)
    return None


def build(engine: Engine, tag: str, target: str | None = None) -> float:
    """docker build of the repository's Dockerfile (layer cache reused) -> seconds it took."""
    args = ["build", "--network=host", "-t", tag]
    if target:
        args += ["--target", target]
    bundle = extra_ca_bundle()
    if bundle:
        args += ["--secret", f"id=ca,src={bundle}"]
    start = time.monotonic()
    engine.docker(*args, ROOT, timeout=900, env={**os.environ, "DOCKER_BUILDKIT": "1"})
    return time.monotonic() - start
