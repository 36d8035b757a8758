"""The deployment files agree with the image and with each other.

Neither Docker Compose nor a cluster runs here: these read the files. (tests/image runs
the image itself, and compose's demo services from it.)
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from outbox import cli, sidecar
from outbox.config import Settings
from outbox.delivery import Sender
from outbox.web import api
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


def manifests(name: str = "*.yaml") -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob(name)):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def of_kind(kind: str, name: str = "*.yaml") -> list[dict[str, Any]]:
    return [d for d in manifests(name) if d["kind"] == kind]


def workloads(name: str = "*.yaml") -> list[dict[str, Any]]:
    return [d for d in manifests(name) if d["kind"] in ("Deployment", "Job")]


def named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return doc


def outbox_containers(name: str = "*.yaml") -> list[dict[str, Any]]:
    found = []
    for doc in workloads(name):
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if "/outbox:" in container["image"]:
                found.append(container)
    return found


def outbox_container(deployment: str) -> dict[str, Any]:
    (container,) = [
        c
        for c in named("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
        if "/outbox:" in c["image"]
    ]
    return container


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


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


# Cloud metadata services and other addresses a customer's URL must never reach through
# the pod's network, whatever it resolves to; and addresses customers' endpoints have.
METADATA_AND_INTERNAL = [
    "169.254.169.254",  # AWS, GCP, Azure, DigitalOcean, OpenStack
    "169.254.170.2",  # AWS ECS task metadata
    "fd00:ec2::254",  # AWS over IPv6
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud
    "fe80::a9fe:a9fe",  # link-local IPv6
    "127.0.0.1",
    "::1",
    "10.96.0.1",  # a cluster's own services
    "172.17.0.1",
    "192.168.1.1",
    "::ffff:169.254.169.254",
]
PUBLIC = ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]


def admin_routes() -> set[str]:
    """The admin server's routes, as `outbox run` (and `outbox serve`) serve them."""
    settings = Settings()
    app = api.make_app(
        sidecar.pool(settings),
        settings,
        stage=api.Stage(),
        test_sender=Sender(settings),
    )
    return {route.resource.canonical for route in app.router.routes() if route.resource}


def egress_rules_reaching(policy: dict[str, Any], address: str) -> list[dict[str, Any]]:
    """The policy's egress rules that let the pod send to ``address`` (a rule with no
    ``to`` reaches everything)."""
    ip = ipaddress.ip_address(address)
    found = []
    for rule in policy["spec"].get("egress", []):
        if "to" not in rule:
            found.append(rule)
            continue
        for peer in rule["to"]:
            block = peer.get("ipBlock")
            if block is None:
                continue  # pods and namespaces of the cluster, by label: never these
            cidr = ipaddress.ip_network(block["cidr"])
            if ip.version != cidr.version or ip not in cidr:
                continue
            if any(ip in ipaddress.ip_network(e) for e in block.get("except", [])):
                continue
            found.append(rule)
    return found


class TestKubernetes:
    def test_files_hold_both_layouts(self) -> None:
        """The app with its sidecar, and the standalone layout with what it needs."""
        kinds = {
            path.name: sorted(d["kind"] for d in manifests(path.name))
            for path in (DEPLOY / "kubernetes").glob("*.yaml")
        }
        assert kinds == {
            "deployment.yaml": ["Deployment", "NetworkPolicy"],
            "migrate-job.yaml": ["Job"],
            "standalone.yaml": sorted(
                ["Deployment"] * 2
                + ["Service"] * 2
                + ["Ingress"]
                + ["PodDisruptionBudget"] * 2
                + ["NetworkPolicy"] * 2
            ),
            "servicemonitor.yaml": ["ServiceMonitor"],
        }
        (job,) = of_kind("Job")
        spec = job["spec"]["template"]["spec"]
        assert spec["restartPolicy"] == "Never"
        (container,) = spec["containers"]
        assert container["args"] == ["migrate"]

    def test_outbox_containers_are_locked_down_as_the_image_user(self) -> None:
        """Non-root (the image's own uid), read-only root, no capabilities, no escalation."""
        uid, gid = image_user()
        containers = outbox_containers()
        assert len(containers) == 4
        for container in containers:
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True
            assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid)
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert "memory" in container["resources"]["limits"]
        for workload in workloads():
            assert workload["spec"]["template"]["spec"]["automountServiceAccountToken"] is False

    def test_database_urls_come_from_a_secret(self) -> None:
        """The Job migrates as the owner; every other container logs in with the
        sidecar role's URL."""
        keys = {}
        for container in outbox_containers():
            (env,) = [e for e in container["env"] if e["name"] == "OUTBOX_DATABASE_URL"]
            assert set(env) == {"name", "valueFrom"}
            ref = env["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "outbox-database"
            keys[" ".join(container.get("args", ["run"]))] = ref["key"]
        assert keys == {
            "migrate": "migrate-url",
            "run": "url",
            "run --deliver-only": "url",
            "serve": "url",
        }

    def test_every_setting_given_is_one_outbox_accepts(self) -> None:
        """The literal values the manifests set pass outbox's own settings check."""
        for container in outbox_containers():
            env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
            Settings.from_env(env)

    def test_every_command_is_one_the_cli_accepts(self) -> None:
        for container in outbox_containers():
            cli._parser().parse_args(container.get("args", ["run"]))

    def test_sidecar_beside_the_app_never_makes_its_pod_unready(self) -> None:
        """The app's pod is Ready while each container is: the sidecar has no readiness
        probe (so it is ready while it runs), does not exit on a schema it does not
        know, and its liveness asks /healthz on the image's port."""
        sidecar = outbox_container("example-app")
        assert "args" not in sidecar  # the image's default command: outbox run
        assert "readinessProbe" not in sidecar
        env = {e["name"]: e.get("value") for e in sidecar["env"]}
        assert env["OUTBOX_SCHEMA_MISMATCH"] == "wait"
        (port,) = sidecar["ports"]
        assert port["containerPort"] == image_port()
        for probe in ("startupProbe", "livenessProbe"):
            assert sidecar[probe]["httpGet"] == {"path": "/healthz", "port": port["name"]}
        app_ports = {
            p["containerPort"]
            for c in named("Deployment", "example-app")["spec"]["template"]["spec"]["containers"]
            if c["name"] != sidecar["name"]
            for p in c.get("ports", [])
        }
        assert image_port() not in app_ports

    def test_standalone_commands_and_probes(self) -> None:
        """Dispatchers run `run --deliver-only`, the page `serve`; both are probed on
        their image port; the page's readiness does not follow the database's schema,
        so a migrate never empties its Service."""
        deliver, serve = outbox_container("outbox-deliver"), outbox_container("outbox-serve")
        assert deliver["args"] == ["run", "--deliver-only"]
        assert serve["args"] == ["serve"]
        for container in (deliver, serve):
            (port,) = container["ports"]
            assert port == {"name": "http", "containerPort": image_port()}
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert deliver["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert serve["readinessProbe"]["httpGet"]["path"] == "/healthz"
        env = {e["name"]: e.get("value") for e in deliver["env"]}
        assert env["OUTBOX_SCHEMA_MISMATCH"] == "wait"

    def test_grace_period_outlasts_an_attempt(self) -> None:
        """SIGTERM lets attempts in flight finish: longer than the default HTTP timeout."""
        for deployment in of_kind("Deployment"):
            grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace > Settings().http_timeout

    def test_rollouts_keep_every_replica_until_its_successor_runs(self) -> None:
        for name in ("outbox-deliver", "outbox-serve"):
            strategy = named("Deployment", name)["spec"]["strategy"]
            assert strategy["rollingUpdate"]["maxUnavailable"] == 0

    def test_services_select_their_pods_on_a_port_they_have(self) -> None:
        for service in of_kind("Service"):
            (deployment,) = [
                d
                for d in of_kind("Deployment")
                if selects(service["spec"]["selector"], pod_labels(d))
            ]
            container = outbox_container(deployment["metadata"]["name"])
            names = {p["name"] for p in container["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in names

    def test_ingress_publishes_the_page_and_api_and_nothing_else(self) -> None:
        """Every path the Ingress sends on is a prefix of admin routes, together they
        cover every route but the probes and /metrics, and OUTBOX_PUBLIC_URL is where
        the Ingress answers, over HTTPS."""
        (ingress,) = of_kind("Ingress")
        (rule,) = ingress["spec"]["rules"]
        assert ingress["spec"]["tls"][0]["hosts"] == [rule["host"]]
        prefixes = []
        for path in rule["http"]["paths"]:
            assert path["pathType"] == "Prefix"
            backend = path["backend"]["service"]
            service = named("Service", backend["name"])
            assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
            prefixes.append(path["path"])
        routes = admin_routes()
        published = {r for r in routes if any(r.startswith(p) for p in prefixes)}
        assert routes - published == {"/healthz", "/readyz", "/metrics"}
        assert all(any(r.startswith(p) for r in routes) for p in prefixes)
        env = {e["name"]: e.get("value") for e in outbox_container("outbox-serve")["env"]}
        assert env["OUTBOX_PUBLIC_URL"] == f"https://{rule['host']}"
        assert Settings.from_env(env).public_url.startswith("https://")

    def test_disruption_budgets_keep_a_replica_and_let_a_drain_proceed(self) -> None:
        budgets = of_kind("PodDisruptionBudget")
        assert {b["metadata"]["name"] for b in budgets} == {"outbox-deliver", "outbox-serve"}
        for budget in budgets:
            deployment = named("Deployment", budget["metadata"]["name"])
            assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels(deployment))
            assert 1 <= budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]

    @pytest.mark.parametrize("address", METADATA_AND_INTERNAL)
    def test_no_pod_running_outbox_reaches_metadata_or_internal_addresses(
        self, address: str
    ) -> None:
        """Each pod with an outbox container is under a NetworkPolicy with egress rules,
        none of which reaches the address (the database's own address is allowed on its
        port alone)."""
        policies = of_kind("NetworkPolicy")
        for deployment in of_kind("Deployment"):
            covering = [
                p
                for p in policies
                if "Egress" in p["spec"]["policyTypes"]
                and selects(p["spec"]["podSelector"]["matchLabels"], pod_labels(deployment))
            ]
            assert covering, deployment["metadata"]["name"]
            for policy in covering:
                assert egress_rules_reaching(policy, address) == []

    def test_customers_endpoints_are_reachable_on_any_port(self) -> None:
        for policy in of_kind("NetworkPolicy"):
            for address in PUBLIC:
                rules = egress_rules_reaching(policy, address)
                assert rules and all("ports" not in rule for rule in rules), address

    def test_dispatchers_accept_connections_only_for_scrapes(self) -> None:
        policy = named("NetworkPolicy", "outbox-deliver")
        (rule,) = policy["spec"]["ingress"]
        assert rule["ports"] == [{"port": "http"}]
        (peer,) = rule["from"]
        assert set(peer) == {"namespaceSelector"}

    def test_service_monitor_scrapes_every_outbox_service(self) -> None:
        """It selects both Services by label, on a port each has, at /metrics."""
        (monitor,) = of_kind("ServiceMonitor")
        selected = [
            s
            for s in of_kind("Service")
            if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert {s["metadata"]["name"] for s in selected} == {"outbox-deliver", "outbox-serve"}
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        for service in selected:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}

    def test_paths_cited_in_comments_exist(self) -> None:
        """The runbook lines in the files' headers name files that are there."""
        for path in (DEPLOY / "kubernetes").glob("*.yaml"):
            text = path.read_text()
            for cited in re.findall(r"(?:deploy|docs)/[\w./-]+\w", text):
                assert (ROOT / cited).exists(), cited
            for cited in re.findall(r"(?<![/\w.-])([\w-]+\.yaml)\b", text):
                assert (DEPLOY / "kubernetes" / cited).is_file(), cited


class TestKubernetesValidate:
    """`kubernetes-validate --strict` (the Kubernetes API's own schemas, unknown fields
    refused) on every file. It has no schema for custom resources and only warns about
    them: the ServiceMonitor's warning is the one expected, and that file is checked by
    TestKubernetes against the Services it scrapes instead."""

    def run(self, *paths: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(Path(sys.executable).parent / "kubernetes-validate"),
                "--strict",
                *map(str, paths),
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    def test_every_manifest_passes(self) -> None:
        paths = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
        result = self.run(*paths)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        passed = [line for line in lines if line.startswith("INFO ") and " passed " in line]
        warned = [line for line in lines if not line.startswith("INFO ")]
        built_in = [d for d in manifests() if d["kind"] != "ServiceMonitor"]
        assert len(passed) == len(built_in)
        assert len(warned) == 1
        assert "servicemonitor.yaml" in warned[0] and "kind ServiceMonitor" in warned[0]

    def test_an_unknown_field_fails(self, tmp_path: Path) -> None:
        """The check bites: a misspelt field in a copy of the example is refused."""
        text = (DEPLOY / "kubernetes" / "deployment.yaml").read_text()
        broken = tmp_path / "broken.yaml"
        broken.write_text(text.replace("periodSeconds: 10", "periodSecond: 10", 1))
        result = self.run(broken)
        assert result.returncode != 0
        assert "periodSecond" in result.stdout
