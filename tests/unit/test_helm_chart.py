"""The Helm chart: renders offline, runs everything under the restricted Pod Security Standard, and sets
exactly the driftserve settings (DRIFTSERVE_<FIELD> of ``ops.settings.Settings``), parsed by Settings itself.

Each ``helm/driftserve/ci/*-values.yaml`` is rendered with ``helm template`` (no cluster, no network).
The tests skip only when no helm binary exists (``scripts/install-helm.sh`` puts one in .tools/bin).
"""

from __future__ import annotations

import ast
import atexit
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from ops.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "driftserve"
CI_VALUES = {p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))}
RELEASE = "ds-test"
NAMESPACE = "driftserve"
PREFIX = "DRIFTSERVE_"
GPU = "nvidia.com/gpu"

# Settings only the embedded single-machine stack (`driftserve up`) uses; the chart has no value for them.
EMBEDDED_ONLY = {"redis_server_bin", "tansu_bin", "ray_address", "ray_num_cpus"}
# Kinds whose pod templates the chart renders directly.
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# -- rendering ---------------------------------------------------------------------------------------------


@functools.cache
def _helm() -> str | None:
    local = ROOT / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


@functools.cache
def _helm_env() -> tuple[tuple[str, str], ...]:
    # Keep helm's cache and config out of the user's home; helm template reads nothing there anyway.
    home = tempfile.mkdtemp(prefix="helm-home-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = os.path.join(home, var.lower())
    env.pop("KUBECONFIG", None)
    return tuple(env.items())


def _helm_template(*args: str) -> subprocess.CompletedProcess[str]:
    helm = _helm()
    if helm is None:
        pytest.skip("helm not found at .tools/bin/helm or on PATH (scripts/install-helm.sh installs it)")
    return subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(_helm_env()),
        check=False,
    )


@functools.cache
def _render_cached(args: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    result = _helm_template(*args)
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(*args: str) -> list[dict[str, Any]]:
    return list(_render_cached(args))


def render_ci(name: str, *extra: str) -> list[dict[str, Any]]:
    return render("-f", str(CI_VALUES[name]), *extra)


def render_error(*args: str) -> str:
    result = _helm_template(*args)
    assert result.returncode != 0, f"helm template {' '.join(args)} should have failed"
    return result.stderr


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# -- walking the rendered objects --------------------------------------------------------------------------


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod the chart defines, including the RayService's head and workers."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in WORKLOAD_KINDS:
            yield name, doc["spec"]["template"]
        elif doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            yield f"{name} head", cluster["headGroupSpec"]["template"]
            for group in cluster.get("workerGroupSpecs", []):
                yield f"{name} {group['groupName']}", group["template"]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def process_envs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(where, env entries) of every driftserve process. Ray Serve replicas get the container's env plus
    the application's runtime_env env_vars, which is how the chart passes their settings."""
    runtime_vars: dict[str, str] = {}
    if of_kind(docs, "RayService"):
        (app,) = serve_config(docs)["applications"]
        runtime_vars = app.get("runtime_env", {}).get("env_vars", {})
    for where, template in pod_templates(docs):
        if template["metadata"]["labels"].get("app.kubernetes.io/name") != "driftserve":
            continue  # the in-cluster Redis is not a driftserve process
        for container in template["spec"]["containers"]:
            env = list(container.get("env", []))
            if where.startswith("RayService/"):
                env += [{"name": k, "value": v} for k, v in runtime_vars.items()]
            yield f"{where} container {container['name']}", env


def is_secret_field(name: str) -> bool:
    annotation = Settings.model_fields[name].annotation
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


def field_of(env_name: str) -> str:
    return env_name.removeprefix(PREFIX).lower()


# -- the tests ---------------------------------------------------------------------------------------------


def _in_cluster_ci() -> str:
    """The ci values file with in-cluster Kafka and Redis, the Ingress and the ServiceMonitor."""
    for name in CI_VALUES:
        kinds = {d["kind"] for d in render_ci(name)}
        if {"KafkaNodePool", "StatefulSet", "Ingress", "ServiceMonitor"} <= kinds:
            return name
    raise AssertionError(
        "no ci values file enables in-cluster Kafka and Redis, the Ingress and the ServiceMonitor"
    )


def test_ci_values_files_cover_the_variants():
    assert {"default", "gpu"} <= set(CI_VALUES), f"ci values files: {sorted(CI_VALUES)}"
    assert _in_cluster_ci()


@pytest.mark.parametrize("ci", sorted(CI_VALUES))
def test_every_pod_runs_under_the_restricted_pod_security_standard(ci):
    docs = render_ci(ci)
    templates = list(pod_templates(docs))
    assert any("RayService" in where for where, _ in templates), "the RayService pods were not checked"
    for where, template in templates:
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("runAsUser", 1) != 0, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for host_ns in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host_ns), f"{where}: {host_ns}"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert not [v for v in volumes.values() if "hostPath" in v], f"{where}: hostPath volume"
        for c in containers(spec):
            at = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, at
            assert sc.get("privileged") in (None, False), at
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], at
            assert not sc.get("capabilities", {}).get("add"), at
            assert sc.get("readOnlyRootFilesystem") is True, at
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, at
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, at
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", at
            assert not [p for p in c.get("ports", []) if p.get("hostPort")], f"{at}: hostPort"
            # A read-only root needs a writable /tmp, and it must be an emptyDir.
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp, f"{at}: no /tmp mount"
            assert "emptyDir" in volumes[tmp[0]["name"]], f"{at}: /tmp is not an emptyDir"


def test_strimzi_pods_get_the_restricted_security_contexts():
    docs = render_ci(_in_cluster_ci())
    pool = one(docs, "KafkaNodePool")
    kafka = one(docs, "Kafka")
    pods = [pool["spec"]["template"]["pod"], kafka["spec"]["entityOperator"]["template"]["pod"]]
    ctrs = [
        pool["spec"]["template"]["kafkaContainer"],
        pool["spec"]["template"]["initContainer"],
        kafka["spec"]["entityOperator"]["template"]["topicOperatorContainer"],
    ]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for ctr in ctrs:
        sc = ctr["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # KRaft, no ZooKeeper.
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    assert "zookeeper" not in kafka["spec"]
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}


@pytest.mark.parametrize("ci", sorted(CI_VALUES))
def test_env_vars_map_onto_settings_and_parse(ci, monkeypatch):
    docs = render_ci(ci)
    envs = list(process_envs(docs))
    assert len(envs) >= 3, f"expected Ray head, Ray worker(s) and the memory writer at least, got {envs}"
    fields = Settings.model_fields
    for where, env in envs:
        names = [e["name"] for e in env]
        assert len(names) == len(set(names)), f"{where}: duplicate env vars {names}"
        ours = [e for e in env if e["name"].startswith(PREFIX)]
        unknown = sorted(e["name"] for e in ours if field_of(e["name"]) not in fields)
        assert not unknown, f"{where}: {unknown} are not fields of ops.settings.Settings"
        literal: dict[str, str] = {}
        for e in ours:
            field = field_of(e["name"])
            if is_secret_field(field):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                assert ref and ref.get("name") and ref.get("key"), (
                    f"{where}: {e['name']} must be a secretKeyRef"
                )
                assert "value" not in e, f"{where}: {e['name']} has a literal value"
                literal[e["name"]] = "value-from-secret"
            else:
                assert "value" in e and isinstance(e["value"], str), f"{where}: {e['name']} is not a string"
                literal[e["name"]] = e["value"]
        with monkeypatch.context() as m:
            for name in list(os.environ):
                if name.startswith(PREFIX):
                    m.delenv(name)
            for name, value in literal.items():
                m.setenv(name, value)
            settings = Settings()
        for name, value in literal.items():
            field = field_of(name)
            parsed = getattr(settings, field)
            if is_secret_field(field):
                assert parsed.get_secret_value() == value, f"{where}: {name}"
            elif isinstance(parsed, bool):
                assert parsed is (value == "true"), f"{where}: {name}={value!r} parsed as {parsed!r}"
            elif isinstance(parsed, int | float):
                assert parsed == type(parsed)(value), f"{where}: {name}={value!r} parsed as {parsed!r}"


def test_every_settings_field_has_a_value_in_the_chart():
    """Values map one-to-one onto Settings: a new field needs a value (or an entry in EMBEDDED_ONLY)."""
    set_somewhere: set[str] = set()
    for ci in CI_VALUES:
        for _, env in process_envs(render_ci(ci)):
            set_somewhere |= {field_of(e["name"]) for e in env if e["name"].startswith(PREFIX)}
    missing = set(Settings.model_fields) - set_somewhere - EMBEDDED_ONLY
    assert not missing, (
        f"Settings fields {sorted(missing)} are never set by the chart: add values (values.yaml, "
        "values.schema.json, driftserve.settings in templates/_helpers.tpl) or list them in EMBEDDED_ONLY"
    )
    assert not EMBEDDED_ONLY - set(Settings.model_fields), (
        "EMBEDDED_ONLY names a field Settings no longer has"
    )


@pytest.mark.parametrize("ci", sorted(CI_VALUES))
def test_credentials_come_only_from_secrets(ci):
    docs = render_ci(ci)
    credential = re.compile(r"PASSWORD|TOKEN|SECRET|CREDENTIAL|_AUTH$|^REDISCLI_AUTH$", re.IGNORECASE)
    for where, template in pod_templates(docs):
        for c in containers(template["spec"]):
            for e in c.get("env", []):
                if credential.search(e["name"]):
                    assert "value" not in e, f"{where}/{c['name']}: {e['name']} is a literal"
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}/{c['name']}: {e['name']}"
    (app,) = serve_config(docs)["applications"]
    runtime_vars = app.get("runtime_env", {}).get("env_vars", {})
    assert not [k for k in runtime_vars if credential.search(k)], "credentials in serveConfigV2"
    assert not [k for k in runtime_vars if k.startswith(PREFIX) and is_secret_field(field_of(k))]
    assert all("@" not in v for v in runtime_vars.values()), "credentials inside a URL in serveConfigV2"


@pytest.mark.parametrize("ci", sorted(CI_VALUES))
def test_files_the_settings_name_are_mounted_from_secrets(ci):
    """kafka_ssl_*, redis_ssl_ca_certs and the like point at files a Secret volume provides."""
    docs = render_ci(ci)
    (app,) = serve_config(docs)["applications"]
    runtime_vars = app["runtime_env"]["env_vars"]
    checked = 0
    for where, template in pod_templates(docs):
        if template["metadata"]["labels"].get("app.kubernetes.io/name") != "driftserve":
            continue
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if where.startswith("RayService/"):
                env |= runtime_vars
            for name, value in env.items():
                if not (name.startswith(PREFIX) and value and value.startswith("/etc/driftserve/")):
                    continue
                directory, filename = value.rsplit("/", 1)
                mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == directory]
                assert mounts, f"{where}/{c['name']}: nothing mounted at {directory} for {name}"
                secret = volumes[mounts[0]["name"]].get("secret")
                assert secret, f"{where}/{c['name']}: {directory} is not a Secret volume"
                assert filename in [i["path"] for i in secret["items"]], f"{where}/{c['name']}: {name}"
                checked += 1
    expected = {
        "gpu": 2,  # Kafka CA and Redis CA
        "cpu": 3,  # Kafka CA, client certificate and key
    }.get(ci)
    if expected is not None:
        assert checked >= expected, f"{ci}: only {checked} mounted files checked"


@pytest.mark.parametrize(
    ("ci", "override", "message"),
    [
        ("default", "redis.url=redis://:hunter2@redis:6379/0", "redis.url: Does not match pattern"),
        ("default", "kafka.securityProtocol=SASL_SSL", "needs kafka.sasl.mechanism"),
        ("default", "kafka.sasl.username=me", "kafka.sasl is set but kafka.securityProtocol is PLAINTEXT"),
        ("default", "kafka.tls.caSecret.name=ca", "kafka.tls is set but kafka.securityProtocol is PLAINTEXT"),
        ("default", "redis.tls.caSecret.name=ca", "redis.tls.caSecret needs a rediss:// redis.url"),
        ("gpu", "kafkaCluster.enabled=true", "with kafkaCluster.enabled use kafkaCluster.tls"),
        ("default", "model.existingClaim=models", "model.path is required with model.existingClaim"),
        ("gpu", "serving.replicas=5", "serving needs 2.5 GPUs"),
        ("default", "fullnameOverride=1driftserve", "DNS-1035"),
    ],
    ids=[
        "credentials-in-redis-url",
        "sasl-without-credentials",
        "sasl-credentials-without-sasl",
        "kafka-tls-without-ssl",
        "redis-ca-without-rediss",
        "external-kafka-security-with-in-cluster-kafka",
        "model-claim-without-path",
        "gpu-overcommit",
        "rayservice-name",
    ],
)
def test_bad_values_are_refused(ci, override, message):
    assert message in render_error("-f", str(CI_VALUES[ci]), "--set", override)


def test_external_endpoints_are_required_unless_in_cluster():
    assert "kafka.bootstrapServers is required" in render_error("--set", "redis.url=redis://r:6379/0")
    assert "redis.url is required" in render_error("--set", "kafka.bootstrapServers=k:9092")


@pytest.mark.parametrize(
    "key",
    ["bogus", "serving.bogus", "serving.gpu.bogus", "kafkaCluster.bogus", "redisServer.auth.bogus"],
)
def test_values_schema_rejects_unknown_keys(key):
    err = render_error("-f", str(CI_VALUES["default"]), "--set", f"{key}=1")
    assert "Additional property bogus is not allowed" in err


def _object_schemas(schema: Any, path: str = "$") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema:
            yield path, schema
        for key, value in schema.items():
            yield from _object_schemas(value, f"{path}.{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            yield from _object_schemas(value, f"{path}[{i}]")


@pytest.mark.parametrize(
    "schema_file",
    [
        CHART / "values.schema.json",
        CHART / "charts" / "kafka-cluster" / "values.schema.json",
        CHART / "charts" / "redis-server" / "values.schema.json",
    ],
    ids=lambda p: str(p.relative_to(CHART)),
)
def test_values_schemas_are_closed(schema_file):
    schema = json.loads(schema_file.read_text())
    open_objects = [p for p, s in _object_schemas(schema) if s.get("additionalProperties") is not False]
    assert not open_objects, f"objects without additionalProperties: false: {open_objects}"


def test_parent_schema_repeats_the_subchart_schemas():
    """Repeated so that typos fail while a subchart is disabled (Helm skips disabled subcharts' schemas)."""

    def without_required(schema: Any) -> Any:
        if isinstance(schema, dict):
            return {k: without_required(v) for k, v in schema.items() if k not in ("required", "description")}
        if isinstance(schema, list):
            return [without_required(v) for v in schema]
        return schema

    parent = json.loads((CHART / "values.schema.json").read_text())["properties"]
    for key, sub in (("kafkaCluster", "kafka-cluster"), ("redisServer", "redis-server")):
        child = json.loads((CHART / "charts" / sub / "values.schema.json").read_text())
        assert without_required(parent[key]["properties"]) == without_required(child["properties"]), key


def _serve_deployment_names() -> set[str]:
    """Deployment names declared in serving/app.py: serve.deployment(name=...) or the decorated class."""
    tree = ast.parse((ROOT / "serving" / "app.py").read_text())
    names: set[str] = set()

    def is_deployment(node: ast.expr) -> bool:
        func = node.func if isinstance(node, ast.Call) else node
        return (isinstance(func, ast.Attribute) and func.attr == "deployment") or (
            isinstance(func, ast.Name) and func.id == "deployment"
        )

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for deco in node.decorator_list:
                if is_deployment(deco):
                    explicit = [
                        k.value.value
                        for k in getattr(deco, "keywords", [])
                        if k.arg == "name" and isinstance(k.value, ast.Constant)
                    ]
                    names |= set(explicit) or {node.name}
    return names


@pytest.mark.parametrize("ci", sorted(CI_VALUES))
def test_rayservice_serves_the_app_with_token_auth(ci):
    docs = render_ci(ci)
    rayservice = one(docs, "RayService")
    spec = rayservice["spec"]
    assert len(rayservice["metadata"]["name"]) <= 47, "KubeRay rejects longer RayService names"
    config = serve_config(docs)
    (app,) = config["applications"]
    assert app["import_path"] == "ops.serve_entry:app"
    env = app["runtime_env"]["env_vars"]
    port = int(env[f"{PREFIX}HTTP_PORT"])
    assert config["http_options"] == {"host": "0.0.0.0", "port": port}
    (deployment,) = app["deployments"]
    assert deployment["name"] in _serve_deployment_names(), (
        "serveConfigV2 names a deployment serving/app.py lacks"
    )
    assert deployment["num_replicas"] == int(env[f"{PREFIX}NUM_REPLICAS"])
    actor = deployment["ray_actor_options"]
    assert actor["num_cpus"] == float(env[f"{PREFIX}REPLICA_NUM_CPUS"])
    assert actor["num_gpus"] == float(env[f"{PREFIX}REPLICA_NUM_GPUS"])

    cluster = spec["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    major, minor, _ = (int(x) for x in cluster["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), "Ray token auth needs Ray >= 2.52"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": port} in head["ports"], (
        "KubeRay needs the head port named serve"
    )
    assert spec["serveService"]["spec"]["ports"][0]["name"] == "serve"
    # Replica capacity: Serve needs num_replicas x num_gpus GPUs on the workers.
    gpus = sum(
        int(g["template"]["spec"]["containers"][0]["resources"].get("limits", {}).get(GPU, 0)) * g["replicas"]
        for g in cluster["workerGroupSpecs"]
    )
    assert deployment["num_replicas"] * actor["num_gpus"] <= gpus


def test_gpu_variant_requests_gpus():
    docs = render_ci("gpu")
    config = serve_config(docs)
    (app,) = config["applications"]
    assert app["runtime_env"]["env_vars"][f"{PREFIX}DEVICE"] == "cuda"
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] > 0
    workers = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for group in workers:
        ray = group["template"]["spec"]["containers"][0]
        assert int(ray["resources"]["limits"][GPU]) >= 1
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == GPU for t in tolerations)
    learner = _deployment(docs, "learner")
    container = learner["spec"]["template"]["spec"]["containers"][0]
    assert int(container["resources"]["limits"][GPU]) >= 1
    assert {"name": f"{PREFIX}DEVICE", "value": "cuda"} in container["env"]
    # Batching and the adapter cache reach the deployment as its Serve user_config (reconfigure()).
    assert set(app["deployments"][0]["user_config"]) == {
        "max_batch_size",
        "batch_wait_timeout_s",
        "max_adapters_per_replica",
    }


def test_batching_and_adapter_cache_render_as_user_config_when_enabled():
    docs = render_ci(
        "gpu", "--set", "serving.batching.enabled=true", "--set", "serving.adapterCache.enabled=true"
    )
    (app,) = serve_config(docs)["applications"]
    assert set(app["deployments"][0]["user_config"]) == {
        "max_batch_size",
        "batch_wait_timeout_s",
        "max_adapters_per_replica",
    }


def test_cpu_fallback_requests_no_gpu():
    docs = render_ci("default", "--set", "learner.gpu.enabled=false")
    for where, template in pod_templates(docs):
        for c in containers(template["spec"]):
            resources = c.get("resources", {})
            assert GPU not in resources.get("limits", {}) and GPU not in resources.get("requests", {}), where
    for where, env in process_envs(docs):
        device = [e["value"] for e in env if e["name"] == f"{PREFIX}DEVICE"]
        assert device == ["cpu"], where
    (app,) = serve_config(docs)["applications"]
    assert "user_config" not in app["deployments"][0], (
        "user_config only when batching or the cache is enabled"
    )


def _deployment(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    found = [
        d
        for d in of_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    assert len(found) == 1, f"expected one {component} Deployment"
    return found[0]


@pytest.mark.parametrize("ci", sorted(CI_VALUES))
def test_learner_and_memory_writer_run_the_cli(ci):
    docs = render_ci(ci)
    learner = _deployment(docs, "learner")
    assert learner["spec"]["replicas"] == 1
    assert learner["spec"]["strategy"]["type"] == "Recreate"
    assert learner["spec"]["template"]["spec"]["containers"][0]["command"] == ["driftserve", "learner"]
    writer = _deployment(docs, "memory-writer")
    assert writer["spec"]["template"]["spec"]["containers"][0]["command"] == ["driftserve", "memory-writer"]


def test_learner_can_be_disabled():
    docs = render_ci("default", "--set", "learner.enabled=false")
    assert [d for d in of_kind(docs, "Deployment") if "learner" in d["metadata"]["name"]] == []
    for where, env in process_envs(docs):
        assert {"name": f"{PREFIX}LEARNER_ENABLED", "value": "false"} in env, where


@pytest.mark.parametrize("ci", sorted(CI_VALUES))
def test_network_policies_admit_only_the_serving_port_from_outside(ci):
    docs = render_ci(ci)
    policies = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["metadata"]["labels"].get("app.kubernetes.io/name") == "driftserve"
    ]
    assert policies, "no NetworkPolicy"
    port = int(serve_config(docs)["http_options"]["port"])
    release = {"app.kubernetes.io/name": "driftserve", "app.kubernetes.io/instance": RELEASE}

    def selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
        wanted = policy["spec"]["podSelector"].get("matchLabels", {})
        return all(labels.get(k) == v for k, v in wanted.items())

    # Every driftserve pod is selected by some policy, so ingress not allowed below is denied.
    for where, template in pod_templates(docs):
        labels = template["metadata"]["labels"]
        if labels.get("app.kubernetes.io/name") == "driftserve":
            assert any(selects(p, labels) for p in policies), f"{where} is not covered by a NetworkPolicy"

    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            peers = rule.get("from", [])
            internal = peers and all(
                set(p) == {"podSelector"} and p["podSelector"].get("matchLabels") == release for p in peers
            )
            if internal:
                continue  # the release's own pods (Ray head <-> workers)
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports == {8265}:
                # The KubeRay operator, to the head's dashboard only.
                assert policy["spec"]["podSelector"]["matchLabels"]["driftserve.io/ray-node"] == "head"
                assert all(p["podSelector"]["matchLabels"] for p in peers), "dashboard open to every pod"
                continue
            assert ports == {port}, f"{policy['metadata']['name']} admits {ports} from outside the release"


def test_in_cluster_dependencies_ingress_and_monitoring():
    docs = render_ci(_in_cluster_ci())
    env = serve_config(docs)["applications"][0]["runtime_env"]["env_vars"]

    kafka = one(docs, "Kafka")
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    cluster = kafka["metadata"]["name"]
    assert env[f"{PREFIX}KAFKA_BOOTSTRAP"] == f"{cluster}-kafka-bootstrap:{listener['port']}"
    if listener["tls"]:
        assert env[f"{PREFIX}KAFKA_SECURITY_PROTOCOL"] == "SSL"
        ca_dir = env[f"{PREFIX}KAFKA_SSL_CAFILE"].rsplit("/", 1)[0]
        workers = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        pod = workers[0]["template"]["spec"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == ca_dir]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == f"{cluster}-cluster-ca-cert"  # Strimzi's cluster CA
    else:
        assert env[f"{PREFIX}KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT"
    topics = {t["spec"]["topicName"]: t for t in of_kind(docs, "KafkaTopic")}
    assert set(topics) == {env[f"{PREFIX}{k}_TOPIC"] for k in ("FEEDBACK", "DLQ", "ROLLOUT", "FORGET")}
    feedback = topics[env[f"{PREFIX}FEEDBACK_TOPIC"]]
    assert feedback["spec"]["partitions"] == int(env[f"{PREFIX}FEEDBACK_PARTITIONS"])
    assert all(
        t["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"] for t in topics.values()
    )

    redis_service = next(s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-redis"))
    assert env[f"{PREFIX}REDIS_URL"] == f"redis://{redis_service['metadata']['name']}:6379/0"
    redis = one(docs, "StatefulSet")
    redis_ctr = redis["spec"]["template"]["spec"]["initContainers"][0]
    redis_secret = redis_ctr["env"][0]["valueFrom"]["secretKeyRef"]
    for where, penv in process_envs(docs):
        (password,) = [e for e in penv if e["name"] == f"{PREFIX}REDIS_PASSWORD"]
        assert password["valueFrom"]["secretKeyRef"] == redis_secret, where
    assert "--requirepass" not in json.dumps(redis["spec"]), "the password must not be on a command line"

    serve_service = one(docs, "RayService")["spec"]["serveService"]
    ingress = one(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": serve_service["metadata"]["name"], "port": {"name": "serve"}}

    monitor = one(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= serve_service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "serve"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"

    dashboards = [c for c in of_kind(docs, "ConfigMap") if "grafana_dashboard" in c["metadata"]["labels"]]
    (dashboard,) = dashboards
    board = json.loads(dashboard["data"]["driftserve.json"])
    rows = {p["title"] for p in board["panels"] if p["type"] == "row"}
    assert {"Serving", "Adaptation"} <= rows
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    for metric in (
        "driftserve_requests_total",
        "driftserve_request_latency_seconds_bucket",
        "driftserve_compensations_total",
        "driftserve_learner_runs_total",
        "driftserve_adapter_swaps_total",
    ):
        assert metric in exprs, metric


def test_serving_metrics_in_the_dashboard_exist_in_the_code():
    """The dashboard queries only metrics that serving/metrics.py defines."""
    source = (ROOT / "serving" / "metrics.py").read_text()
    defined = set(re.findall(r'"(driftserve_[a-z_]+)"', source))
    board = json.loads((CHART / "dashboards" / "driftserve.json").read_text())
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"driftserve_[a-z_]+", exprs)}
    assert used <= defined, f"dashboard queries undefined metrics: {sorted(used - defined)}"


def test_notes_tell_how_to_call_it(tmp_path):
    # helm template leaves NOTES.txt out and `helm install --dry-run` wants a cluster, so a copy of the
    # chart gets one more template that puts the rendered notes into a ConfigMap.
    chart = tmp_path / "driftserve"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ include "driftserve/templates/NOTES.txt" . | quote }}\n'
    )
    helm = _helm()
    if helm is None:
        pytest.skip("helm not found at .tools/bin/helm or on PATH (scripts/install-helm.sh installs it)")
    for ci, expected in (("default", "port-forward"), (_in_cluster_ci(), "https://")):
        result = subprocess.run(
            [
                helm,
                "template",
                RELEASE,
                str(chart),
                "--namespace",
                NAMESPACE,
                "-f",
                str(CI_VALUES[ci]),
                "--show-only",
                "templates/zz-notes.yaml",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(_helm_env()),
            check=False,
        )
        assert result.returncode == 0, result.stderr
        notes = yaml.safe_load(result.stdout)["data"]["notes"]
        for needle in (expected, "/healthz", "/v1/predict", "/v1/feedback", "/metrics"):
            assert needle in notes, f"{ci}: {needle} missing from NOTES.txt"
