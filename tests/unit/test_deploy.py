"""The deployment files agree with the image and with each other.

Neither Docker Compose nor a cluster runs here: these read the files. (tests/image runs
the image itself, and compose's demo services from it.)
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from outbox.config import Settings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def dockerfile() -> dict[str, list[str]]:
    """Each instruction of the Dockerfile's last stage (the image), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: list[dict[str, list[str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        if word == "FROM":
            stages.append({})
        stages[-1].setdefault(word, []).append(rest.strip())
    return stages[-1]


def froms() -> list[str]:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    return [line.split()[1] for line in lines if line.startswith("FROM ")]


def image_user() -> tuple[int, int]:
    uid, _, gid = dockerfile()["USER"][-1].partition(":")
    return int(uid), int(gid)


def image_port() -> int:
    env = " ".join(dockerfile()["ENV"])
    listen = re.search(r"OUTBOX_API_LISTEN=(\S+)", env)
    assert listen, "the image sets no OUTBOX_API_LISTEN"
    return int(listen.group(1).rpartition(":")[2])


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def outbox_containers() -> list[dict[str, Any]]:
    found = []
    for doc in manifests():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if "/outbox:" in container["image"]:
                found.append(container)
    return found


class TestDockerfile:
    def test_base_image_is_pinned_to_a_python_slim_tag(self) -> None:
        """Every stage starts from the same tagged image; never an implicit latest."""
        (base,) = set(froms())
        name, _, tag = base.partition(":")
        assert name == "python" and tag.startswith("3.11-slim-") and tag != "latest"

    def test_entrypoint_and_command_in_exec_form(self) -> None:
        """Exec form: outbox is PID 1 and gets SIGTERM itself, not a shell."""
        stage = dockerfile()
        assert json.loads(stage["ENTRYPOINT"][-1]) == ["outbox"]
        assert json.loads(stage["CMD"][-1]) == ["run"]
        check = stage["HEALTHCHECK"][-1]
        assert "/healthz" in json.loads(check[check.index("CMD") + 3 :])[-1]

    def test_user_is_numeric_and_not_root(self) -> None:
        uid, gid = image_user()
        assert uid != 0 and gid != 0

    def test_build_context_leaves_out_local_state(self) -> None:
        """.dockerignore admits only what the image is built from."""
        lines = (ROOT / ".dockerignore").read_text().splitlines()
        rules = [line for line in lines if line and not line.startswith("#")]
        assert rules[0] == "*"
        admitted = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
        assert admitted == {"pyproject.toml", "README.md", "outbox", "sql"}


class TestCompose:
    def services(self) -> dict[str, Any]:
        return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"])

    def test_outbox_services_build_this_repository(self) -> None:
        """Every service that runs outbox builds the root Dockerfile into one image."""
        built = {n: s for n, s in self.services().items() if "build" in s}
        assert set(built) == {"migrate", "setup", "outbox"}
        for service in built.values():
            assert (DEPLOY / service["build"] / "Dockerfile").resolve() == ROOT / "Dockerfile"
            assert service["image"] == "outbox:demo"

    def test_sidecar_starts_after_migrate_has_completed(self) -> None:
        services = self.services()
        needs = services["outbox"]["depends_on"]
        assert needs["migrate"] == {"condition": "service_completed_successfully"}
        assert services["setup"]["depends_on"]["migrate"] == needs["migrate"]
        assert services["migrate"]["command"] == ["migrate"]
        assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"

    def test_sidecar_trusts_the_ca_the_certs_service_makes(self) -> None:
        services = self.services()
        env = services["outbox"]["environment"]
        certs_dir = services["certs"]["command"][2]
        assert env["OUTBOX_CA_FILE"] == f"{certs_dir}/ca.pem"
        assert env["OUTBOX_ALLOW_PRIVATE_TARGETS"] == "true"
        assert f"certs:{certs_dir}:ro" in services["outbox"]["volumes"]
        assert f"certs:{certs_dir}" in services["certs"]["volumes"]

    def test_demo_scripts_exist(self) -> None:
        for name in ("make-certs.sh", "receiver.py", "setup.sh"):
            assert (DEPLOY / "demo" / name).is_file()

    def test_sidecar_port_is_the_image_port_on_loopback(self) -> None:
        port = image_port()
        assert self.services()["outbox"]["ports"] == [f"127.0.0.1:{port}:{port}"]


class TestKubernetes:
    def test_files_hold_a_deployment_and_a_migrate_job(self) -> None:
        kinds = sorted(d["kind"] for d in manifests())
        assert kinds == ["Deployment", "Job"]
        (job,) = [d for d in manifests() if d["kind"] == "Job"]
        spec = job["spec"]["template"]["spec"]
        assert spec["restartPolicy"] == "Never"
        (container,) = spec["containers"]
        assert container["args"] == ["migrate"]

    def test_outbox_containers_are_locked_down_as_the_image_user(self) -> None:
        """Non-root (the image's own uid), read-only root, no capabilities, no escalation."""
        uid, gid = image_user()
        containers = outbox_containers()
        assert len(containers) == 2
        for container in containers:
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True
            assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid)
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert "memory" in container["resources"]["limits"]

    def test_database_urls_come_from_a_secret(self) -> None:
        """The Job migrates as the owner; the sidecar logs in with its own role's URL."""
        keys = {}
        for container in outbox_containers():
            (env,) = [e for e in container["env"] if e["name"] == "OUTBOX_DATABASE_URL"]
            assert set(env) == {"name", "valueFrom"}
            ref = env["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "outbox-database"
            keys[container.get("args", ["run"])[0]] = ref["key"]
        assert keys == {"migrate": "migrate-url", "run": "url"}

    def test_sidecar_probes_ask_health_endpoints_on_the_image_port(self) -> None:
        (sidecar,) = [c for c in outbox_containers() if "args" not in c]
        (port,) = sidecar["ports"]
        assert port["containerPort"] == image_port()
        probes = {k: sidecar[k]["httpGet"] for k in ("livenessProbe", "readinessProbe")}
        assert probes["livenessProbe"] == {"path": "/healthz", "port": port["name"]}
        assert probes["readinessProbe"] == {"path": "/readyz", "port": port["name"]}

    def test_grace_period_outlasts_an_attempt(self) -> None:
        """SIGTERM lets attempts in flight finish: longer than the default HTTP timeout."""
        (deployment,) = [d for d in manifests() if d["kind"] == "Deployment"]
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > Settings().http_timeout

    def test_paths_cited_in_comments_exist(self) -> None:
        """The runbook lines in the files' headers name files that are there."""
        for path in (DEPLOY / "kubernetes").glob("*.yaml"):
            for cited in re.findall(r"deploy/kubernetes/[\w.-]+", path.read_text()):
                assert (ROOT / cited).is_file(), cited
