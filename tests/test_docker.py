"""docker/: the compose file and the Kubernetes manifests agree with the entrypoint and each other,
and the entrypoint itself runs the compose topology on this machine (Docker cannot run here), with
loopback addresses and free ports in place of the containers' names and ports."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_cli import run_processes, write_tiny_mnist

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]


def manifests() -> list[dict]:
    return [
        doc
        for path in sorted((DOCKER / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]


def roles() -> set[str]:
    """The roles the entrypoint's `case` accepts."""
    return set(re.findall(r"^    ([a-z-]+)\)$", ENTRYPOINT.read_text(), re.M))


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_compose_and_manifests_agree_with_the_entrypoint_and_each_other():
    services = compose()
    # the 2017 topology plus a driver
    assert set(services) == {
        "spmaster",
        "spslave1",
        "spslave2",
        "driver",
    }
    assert roles() == {"master", "worker", "master-and-worker", "driver"}
    exposed = {
        int(p)
        for p in re.findall(
            r"\b(\d{4})\b",
            re.search(r"^EXPOSE (.*)$", (DOCKER / "Dockerfile").read_text(), re.M).group(1),
        )
    }
    image = services["spmaster"]["image"]
    master = services["spmaster"]["environment"]
    master_url = f"spark://spmaster:{master['SPARK_MASTER_PORT']}"
    for name, service in services.items():
        assert service["image"] == image and service["command"][0] in roles()
        assert service["hostname"] == name == service["environment"]["SPARK_HOST"]
        assert service["environment"]["SPARK_MASTER_URL"] == master_url
    assert (
        f"{master['SPARK_MASTER_PORT']}:{master['SPARK_MASTER_PORT']}"
        in services["spmaster"]["ports"]
    )
    assert (
        f"{master['SPARK_MASTER_WEBUI_PORT']}:{master['SPARK_MASTER_WEBUI_PORT']}"
        in services["spmaster"]["ports"]
    )
    driver = services["driver"]["environment"]
    ports = sorted(
        int(driver[k])
        for k in ("SPARK_DRIVER_PORT", "SPARK_BLOCK_MANAGER_PORT", "KERASONSPARK_SERVER_PORT")
    )
    assert (
        f"{ports[0]}-{ports[-1]}:{ports[0]}-{ports[-1]}" in services["driver"]["ports"]
        and ports[-1] - ports[0] == 2
    )
    assert (
        set(ports) | {int(master["SPARK_MASTER_PORT"]), int(master["SPARK_MASTER_WEBUI_PORT"])}
        <= exposed
    )
    cores = sum(int(s["environment"].get("SPARK_WORKER_CORES", 0)) for s in services.values())
    assert services["driver"]["command"][
        services["driver"]["command"].index("--workers") + 1
    ] == str(cores)

    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()}
    service = docs[("Service", "spmaster")]
    pods = {
        name: d["spec"]["template"]["spec"]["containers"][0]
        for (kind, name), d in docs.items()
        if kind != "Service"
    }
    assert set(pods) == {"spmaster", "spworker", "kerasonspark-mnist"}
    for container in pods.values():
        assert container["image"] == image and container["args"][0] in roles()
    master_env = env_of(pods["spmaster"])
    assert {p["port"] for p in service["spec"]["ports"]} == {
        int(master_env["SPARK_MASTER_PORT"]),
        int(master_env["SPARK_MASTER_WEBUI_PORT"]),
    }
    assert (
        service["spec"]["selector"]
        == docs[("Deployment", "spmaster")]["spec"]["template"]["metadata"]["labels"]
    )
    for name in ("spworker", "kerasonspark-mnist"):
        env = env_of(pods[name])
        assert (
            env["SPARK_MASTER_URL"]
            == f"spark://{service['metadata']['name']}:{master_env['SPARK_MASTER_PORT']}"
        )
        # advertises an address others reach
        assert env["SPARK_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    job = env_of(pods["kerasonspark-mnist"])
    assert {p["containerPort"] for p in pods["kerasonspark-mnist"]["ports"]} == {
        int(job[k])
        for k in ("SPARK_DRIVER_PORT", "SPARK_BLOCK_MANAGER_PORT", "KERASONSPARK_SERVER_PORT")
    }
    assert pods["kerasonspark-mnist"]["args"] == services["driver"]["command"]
    replicas = docs[("Deployment", "spworker")]["spec"]["replicas"] * int(
        env_of(pods["spworker"])["SPARK_WORKER_CORES"]
    )
    assert pods["kerasonspark-mnist"]["args"][
        pods["kerasonspark-mnist"]["args"].index("--workers") + 1
    ] == str(replicas)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def here(environment: dict, names: set[str], ports: dict[str, str]) -> dict:
    """A service's environment with container names as 127.0.0.1 and its ports as free ones here."""
    out = {}
    for key, value in environment.items():
        value = str(value)
        for name in names:
            value = re.sub(rf"\b{name}\b", "127.0.0.1", value)
        for old, new in ports.items():
            value = (
                re.sub(rf"(?<=:){old}\b", new, value)
                if ":" in value
                else (new if value == old else value)
            )
        out[key] = value
    return out


@pytest.mark.spark
def test_the_entrypoint_runs_the_compose_topology_here_and_trains(tmp_path):
    services = compose()
    names = set(services)
    ports = {p: str(free_port()) for p in ("7077", "8080", "7078", "7079", "7080")}
    base = dict(
        os.environ,
        KERASONSPARK_HOME=str(ROOT),
        SPARK_WORKER_DIR=str(tmp_path / "work"),
        SPARK_LOG_DIR=str(tmp_path / "logs"),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    (tmp_path / "mnist").mkdir()
    write_tiny_mnist(tmp_path / "mnist")
    before = run_processes()
    daemons = []
    try:
        for name in ("spmaster", "spslave1", "spslave2"):
            env = {
                **base,
                **here(services[name]["environment"], names, ports),
                "SPARK_WORKER_WEBUI_PORT": "0",
            }
            daemons.append(
                subprocess.Popen(
                    ["bash", str(ENTRYPOINT), *services[name]["command"]],
                    env=env,
                    stdout=open(tmp_path / f"{name}.log", "w"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 120
        alive = 0
        while alive < 3 and time.monotonic() < deadline:
            time.sleep(1)
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{ports['8080']}/json", timeout=2
                ) as reply:
                    alive = sum(w["state"] == "ALIVE" for w in json.load(reply)["workers"])
            except OSError:
                continue
        assert alive == 3, (tmp_path / "spmaster.log").read_text()[-3000:]
        command = [
            a if a != "/data/mnist" else str(tmp_path / "mnist")
            for a in services["driver"]["command"]
        ]
        run = subprocess.run(
            ["bash", str(ENTRYPOINT), *command, "--epochs", "2", "--batch-size", "16"],
            env={**base, **here(services["driver"]["environment"], names, ports)},
            capture_output=True,
            text=True,
            timeout=400,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        lines = [
            line
            for line in run.stdout.splitlines()
            if line.split(":")[0] in ("Training time", "Test accuracy", "Parameter-server updates")
        ]
        assert len(lines) == 3 and float(lines[1].split(":")[1]) > 0.5, run.stdout
    finally:
        for daemon in daemons:
            os.killpg(daemon.pid, signal.SIGTERM)
        for daemon in daemons:
            daemon.wait(timeout=30)
    deadline = time.monotonic() + 30
    while run_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run_processes() - before == set()
