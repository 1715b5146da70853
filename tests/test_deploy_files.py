"""The deployment files parse and say what mailbus needs: the image, the command, the
probes on each process's own endpoints, setting names that exist, a stop timeout past the
drain. (No container engine runs here, so they are checked, not run.)
"""

from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.cli.app import _parser
from consumer.settings import Settings

SETTING_NAMES = {f"MAILBUS_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture
def deploy(repo_root: Path) -> Path:
    return repo_root / "deploy"


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_every_setting_named_in_a_deploy_file_exists(deploy: Path) -> None:
    named: set[str] = set()
    for path in deploy.rglob("*"):
        # The docs beside them (README.md, MIGRATING.md) are held to the settings by
        # tests/test_readme.py, with the names `mailbus config export` makes.
        if path.is_file() and path.suffix not in {".py", ".sh", ".md"}:
            named |= set(re.findall(r"\bMAILBUS_[A-Z_]+\b", path.read_text()))
    assert named, "the deploy files name no settings at all"
    assert named <= SETTING_NAMES, named - SETTING_NAMES


def test_the_dockerfile_runs_the_worker_as_a_user_with_a_health_check(
    deploy: Path, repo_root: Path
) -> None:
    lines = (deploy / "Dockerfile").read_text().splitlines()
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) == 2, "multi-stage: build, then a slim runtime"
    final = lines[lines.index(stages[-1]) :]
    assert any(re.fullmatch(r"USER \d+", line) and line != "USER 0" for line in final)
    assert 'ENTRYPOINT ["mailbus"]' in final
    assert 'CMD ["worker"]' in final
    health = next(line for line in final if line.startswith("HEALTHCHECK"))
    index = final.index(health)
    assert "/healthz" in final[index] + final[index + 1]
    for line in lines:
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (repo_root / source).exists(), source


def test_the_entrypoint_command_exists(deploy: Path) -> None:
    """What the image runs, ENTRYPOINT then CMD, is a command of the installed package."""
    text = (deploy / "Dockerfile").read_text()
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT (.+)$", text, re.MULTILINE)[-1])
    command = json.loads(re.findall(r"^CMD (.+)$", text, re.MULTILINE)[-1])
    installed = Path(sys.executable).parent / entrypoint[0]
    done = subprocess.run(
        [str(installed), *entrypoint[1:], *command, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"usage: mailbus {' '.join(command)}" in done.stdout


def test_compose_runs_three_workers_with_broker_database_and_catcher(deploy: Path) -> None:
    [compose] = yaml_documents(deploy / "compose" / "docker-compose.yml")
    services = compose["services"]
    assert "management" in services["rabbitmq"]["image"]
    assert "--replSet" in services["mongo"]["command"]
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 3
    assert worker["command"] == ["worker"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert any("/readyz" in part for part in worker["healthcheck"]["test"])
    assert set(worker["depends_on"]) == {"rabbitmq", "mongo"}
    assert "mailcatcher" in services
    gateway = services["gateway"]
    assert gateway["profiles"] == ["migration"]
    served = _parser().parse_args(gateway["command"])
    assert (served.verb, served.gateway_verb) == ("gateway", "serve")
    assert (served.rest.port, served.daemon.port) == (8000, 3000)
    webhooks = services["webhooks"]
    assert webhooks["profiles"] == ["webhooks"]
    assert (
        webhooks["environment"]["MAILBUS_HTTP_PORT"] == worker["environment"]["MAILBUS_HTTP_PORT"]
    )
    assert any("/readyz" in part for part in webhooks["healthcheck"]["test"])
    delivering = _parser().parse_args(webhooks["command"])
    assert (delivering.verb, delivering.webhook_verb) == ("webhook", "serve")
    bounces = services["bounces"]
    listening = _parser().parse_args(bounces["command"]).bounces.port
    # The image's user is unprivileged, and cannot listen below 1024: port 25 is mapped.
    assert listening >= 1024
    assert bounces["ports"] == [f"25:{listening}"]
    env_file = deploy / "compose" / worker["env_file"].replace("mailbus.env", "mailbus.env.example")
    assert "MAILBUS_AMQP_URL" in env_file.read_text()
    [cluster] = yaml_documents(deploy / "compose" / "docker-compose.cluster.yml")
    nodes = [name for name in cluster["services"] if name.startswith("rabbitmq")]
    assert len(nodes) == 3
    assert "classic_config" in cluster["configs"]["cluster"]["content"]


def by_kind(deploy: Path) -> dict[str, list[dict[str, Any]]]:
    """The Kubernetes manifests, by kind (a kind may have several: two Deployments)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((deploy / "k8s").glob("*.yaml")):
        for doc in yaml_documents(path):
            found.setdefault(doc["kind"], []).append(doc)
    return found


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def check_deployment(deployment: dict[str, Any], secret: dict[str, Any]) -> list[str]:
    """What every mailbus Deployment must be: the image, probes on its own endpoints, the
    HTTP port it serves them on, resources, a grace period past the drain, the Secret's
    keys; returns the command it runs, checked to be one of the installed package.
    """
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["image"].startswith("mailbus")
    env = {e["name"]: e for e in container["env"]}
    assert env["MAILBUS_HTTP_PORT"]["value"] == str(container["ports"][0]["containerPort"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["memory"]
    drain = float(env["MAILBUS_DRAIN_TIMEOUT"]["value"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain
    for variable in ("MAILBUS_AMQP_URL", "MAILBUS_MONGO_URL", "MAILBUS_SECRET_KEY"):
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()
    _parser().parse_args(container["args"])  # exits on a command that does not exist
    args: list[str] = container["args"]
    return args


def test_kubernetes_manifests(deploy: Path) -> None:
    manifests = by_kind(deploy)
    [secret] = manifests["Secret"]
    deployments = {d["metadata"]["name"]: d for d in manifests["Deployment"]}
    commands = {name: check_deployment(d, secret) for name, d in deployments.items()}
    gateway = commands.pop("mailbus-gateway")
    assert commands == {
        "mailbus-worker": ["worker"],
        "mailbus-webhooks": ["webhook", "serve"],
    }
    served = _parser().parse_args(gateway)
    assert (served.verb, served.gateway_verb) == ("gateway", "serve")
    listens = {name: getattr(served, name) for name in ("rest", "smtp", "bounces")}
    [container] = deployments["mailbus-gateway"]["spec"]["template"]["spec"]["containers"]
    exposed = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {exposed["rest"], exposed["submission"], exposed["mx"]} == {
        listen.port for listen in listens.values()
    }
    # The image's user is unprivileged: it listens above 1024; the MX Service maps 25 and 587.
    assert min(listen.port for listen in listens.values()) > 1024
    services = {s["metadata"]["name"]: s for s in manifests["Service"]}
    published = {p["port"]: p["targetPort"] for p in services["mailbus-mx"]["spec"]["ports"]}
    assert published == {587: "submission", 25: "mx"}
    # Each Deployment's selector and budget take its own pods, never the other's.
    chosen = [(name, d["spec"]["selector"]) for name, d in deployments.items()]
    chosen += [
        (b["metadata"]["name"], b["spec"]["selector"]) for b in manifests["PodDisruptionBudget"]
    ]
    for owner, selector in chosen:
        taken = [
            name
            for name, d in deployments.items()
            if selector["matchLabels"].items() <= pod_labels(d).items()
        ]
        assert taken == [owner], (owner, taken)
    assert len(manifests["PodDisruptionBudget"]) == len(deployments)
    [scaled] = manifests["ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "mailbus-worker"
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == "mailbus.send"
    [authentication] = manifests["TriggerAuthentication"]
    auth = authentication["spec"]["secretTargetRef"][0]
    assert auth["key"] in secret["stringData"]


@pytest.mark.parametrize(
    ("unit_file", "command", "port"),
    [
        ("mailbus-worker@.service", ["worker"], "%i"),
        ("mailbus-webhooks.service", ["webhook", "serve"], "9110"),
        (
            "mailbus-gateway.service",
            [
                "gateway",
                "serve",
                "--rest",
                "127.0.0.1:8000",
                "--smtp",
                "0.0.0.0:587",
                "--bounces",
                "0.0.0.0:25",
            ],
            "9111",
        ),
    ],
)
def test_systemd_unit_restarts_and_outlasts_the_drain(
    deploy: Path, unit_file: str, command: list[str], port: str
) -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((deploy / "systemd" / unit_file).read_text())
    service = unit["Service"]
    assert service["ExecStart"].split()[1:] == command
    assert service["ExecStart"].split()[0].endswith("/bin/mailbus")
    assert service["Restart"] == "always"
    assert float(service["TimeoutStopSec"]) > Settings(_env_file=None).drain_timeout
    assert f"MAILBUS_HTTP_PORT={port}" in service["Environment"]
    _parser().parse_args(command)  # exits on a command that does not exist
