"""The manifest `bertscale submit --backend k8s` renders (headless Service, ConfigMap, Indexed Job) is valid
against the Kubernetes API schema, checked offline with the official client's models, and its parts refer to
each other: the pods find rank 0 through the Service, and the config where the ConfigMap is mounted."""

from __future__ import annotations

import copy
import json
import re
from pathlib import PurePosixPath
from types import SimpleNamespace

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes", reason="the Kubernetes API models come with the `kubernetes` "
                                 "client (the dev extra)")
from kubernetes.client import ApiClient  # noqa: E402
from kubernetes.utils import parse_quantity  # noqa: E402

from bertscale.config import load_config  # noqa: E402
from bertscale.jobs import K8S_CONFIG, JobSpec, submit  # noqa: E402

MODELS = {("v1", "Service"): "V1Service", ("v1", "ConfigMap"): "V1ConfigMap", ("batch/v1", "Job"): "V1Job"}
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# Values YAML would read as other types, or that would break a one-line flow mapping, if rendered unquoted.
AWKWARD_ENV = {"NCCL_DEBUG": "INFO", "RETRIES": "3", "FLAG": "true", "EMPTY": "", "URL": "http://host:5000/#x",
               "PAIR": "a: b", "LIST": "[1, 2]", "QUOTE": "it's \"quoted\""}

SPECS = {
    "defaults": JobSpec(),
    "gpus": JobSpec(job_name="bert-large", nodes=4, procs_per_node=8, gpus_per_node=8, cpus_per_task=6,
                    image="registry.example.com/bertscale:1.2", pvc="shared-workdir", master_port=29400,
                    env=AWKWARD_ENV),
}


def schema_round_trip(doc: dict) -> dict:
    """`doc` read into the client's model of its kind and written back. Reading raises ValueError for a missing
    required field; a field the schema does not have is dropped, and a value of the wrong type is converted, so
    the result differs from `doc` wherever the schema disagrees with it."""
    model = MODELS.get((doc.get("apiVersion"), doc.get("kind")))
    assert model is not None, f"no API model for {doc.get('apiVersion')} {doc.get('kind')}"
    api = ApiClient()
    return api.sanitize_for_serialization(api.deserialize(SimpleNamespace(data=json.dumps(doc)), model))


def rendered(tmp_path, spec: JobSpec) -> list[dict]:
    cfg = load_config(overrides=[f"workdir={tmp_path}", "tracking.enabled=false"])
    return list(yaml.safe_load_all(open(submit(cfg, "k8s", spec, dry_run=True)["manifest"])))


@pytest.mark.parametrize("name", SPECS)
def test_every_document_matches_the_kubernetes_api_schema(tmp_path, name):
    docs = rendered(tmp_path, SPECS[name])
    assert [(d["apiVersion"], d["kind"]) for d in docs] == list(MODELS)
    for doc in docs:
        assert schema_round_trip(doc) == doc, f"{doc['kind']} has fields or values the API schema does not accept"


def test_the_schema_check_catches_unknown_fields_wrong_types_and_missing_required_fields(tmp_path):
    job = rendered(tmp_path, JobSpec())[2]
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["completionsMode"] = misspelt["spec"].pop("completionMode")
    assert "completionsMode" not in schema_round_trip(misspelt)["spec"]
    unquoted = copy.deepcopy(job)
    unquoted["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = 1  # env values must be strings
    assert schema_round_trip(unquoted) != unquoted
    nameless = copy.deepcopy(job)
    del nameless["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        schema_round_trip(nameless)
    with pytest.raises(AssertionError, match="no API model"):
        schema_round_trip({**job, "apiVersion": "batch/v2"})


@pytest.mark.parametrize("name", SPECS)
def test_the_parts_of_the_manifest_refer_to_each_other(tmp_path, name):
    spec = SPECS[name]
    service, configmap, job = rendered(tmp_path, spec)
    names = [service["metadata"]["name"], configmap["metadata"]["name"], job["metadata"]["name"]]
    assert all(DNS_LABEL.fullmatch(n) for n in names), names
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # Rank 0 is reached as <job>-0.<job>: the pod's hostname within the Service named by its subdomain, which
    # selects the job's pods by the label the Job controller gives them.
    assert pod["subdomain"] == service["metadata"]["name"] == spec.job_name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": spec.job_name}
    assert f"--master_addr={spec.job_name}-0.{spec.job_name}" in container["args"][0]
    assert service["spec"]["ports"][0]["port"] == (spec.master_port or 29500)
    assert f"--master_port={spec.master_port or 29500}" in container["args"][0]
    # The ranks read the config from where the ConfigMap is mounted.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert set(mounts) == set(volumes)
    config_volume = next(v for v in volumes.values() if "configMap" in v)
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert mounts[config_volume["name"]] == str(PurePosixPath(K8S_CONFIG).parent)
    assert PurePosixPath(K8S_CONFIG).name in configmap["data"] and K8S_CONFIG in container["args"][0]
    assert next(v for v in volumes.values() if "persistentVolumeClaim" in v)["persistentVolumeClaim"] == {
        "claimName": spec.pvc}
    # An Indexed Job of one pod per node, each pod's index its node rank.
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == spec.nodes
    assert pod["restartPolicy"] == "Never" and "--node_rank=$JOB_COMPLETION_INDEX" in container["args"][0]
    limits = container["resources"]["limits"]
    assert all(parse_quantity(v) > 0 for v in limits.values())
    assert parse_quantity(limits["cpu"]) == spec.cpus_per_task * spec.procs_per_node
    assert ("nvidia.com/gpu" in limits) == bool(spec.gpus_per_node)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"PYTHONUNBUFFERED": "1", **spec.env}
