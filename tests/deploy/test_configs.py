"""deploy/ and grafana/ files: they parse, pass Ray's and our own schema, and match each other."""

import json
import re
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from softthought.server.app import backbone_options
from softthought.server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIGS = ["deploy/serve_local.yaml", "deploy/serve_gpu.yaml"]


def test_every_yaml_parses():
    files = sorted([*ROOT.glob("deploy/*.yaml"), *ROOT.glob("grafana/*.yml"), *ROOT.glob("softthought/**/*.yaml")])
    assert len(files) >= 4
    for f in files:
        assert yaml.safe_load(f.read_text()) is not None, f


@pytest.mark.parametrize("path", SERVE_CONFIGS)
def test_serve_configs_pass_rays_schema_and_ours(path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / path).read_text()))
    app = next(a for a in schema.applications if a.name == "softthought")
    assert app.import_path == "softthought.server.app:build_app"
    ServerConfig.model_validate(app.args)  # the app's args are valid softthought settings
    assert {d.name for d in app.deployments} == {"Ingress", "Aux", "Backbone"}


def test_local_config_stays_on_loopback():
    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy/serve_local.yaml").read_text()))
    assert schema.http_options.host == "127.0.0.1"


def test_gpu_config_puts_backbone_on_gpus_and_autoscales():
    app = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy/serve_gpu.yaml").read_text())).applications[0]
    deployments = {d.name: d for d in app.deployments}
    backbone = deployments["Backbone"]
    assert backbone.ray_actor_options.num_gpus == 1
    assert backbone.autoscaling_config["max_replicas"] > backbone.autoscaling_config["min_replicas"]
    assert backbone.autoscaling_config["target_ongoing_requests"] > 0
    assert (deployments["Aux"].ray_actor_options.num_gpus or 0) < 1  # CPU or a GPU fraction
    assert deployments["Aux"].user_config["checkpoint"] == app.args["aux_checkpoint"]
    assert "7B" in app.args["backbone"] or "7b" in app.args["backbone"]


def test_the_gpu_config_serves_on_vllm_and_tensor_parallelism_reserves_one_gpu_per_shard():
    app = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy/serve_gpu.yaml").read_text())).applications[0]
    config = ServerConfig.model_validate(app.args)
    assert config.engine == "vllm" and config.tensor_parallel_size == 1 and backbone_options(config) == {}
    sharded = backbone_options(config.model_copy(update={"tensor_parallel_size": 4}))
    assert sum(b.get("GPU", 0) for b in sharded["placement_group_bundles"]) == 4
    assert sharded["ray_actor_options"]["num_gpus"] == 0 and sharded["placement_group_strategy"] == "STRICT_PACK"


def test_rayservice_has_kuberay_structure_and_embeds_the_gpu_config():
    manifest = yaml.safe_load((ROOT / "deploy/rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    spec = manifest["spec"]
    embedded = yaml.safe_load(spec["serveConfigV2"])
    assert embedded == yaml.safe_load((ROOT / "deploy/serve_gpu.yaml").read_text())
    ServeDeploySchema.model_validate(embedded)
    cluster = spec["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    workers = cluster["workerGroupSpecs"]
    gpu = [w for w in workers if w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu and all(w["minReplicas"] <= w["replicas"] <= w["maxReplicas"] for w in workers)
    assert cluster["rayVersion"] == __import__("ray").__version__


def test_dockerfile_installs_like_the_readme():
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make install" in dockerfile and "make" in readme
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text()


def test_dashboard_is_valid_grafana_json_with_promql_targets():
    dash = json.loads((ROOT / "grafana/softthought.json").read_text())
    assert dash["schemaVersion"] >= 36 and dash["panels"]
    for panel in dash["panels"]:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("request rate", "error", "latency", "first token", "tokens per second", "batch", "auxiliary",
                  "cache", "healthy"):
        assert topic in titles, topic


def dashboard_metrics() -> set[str]:
    dash = json.loads((ROOT / "grafana/softthought.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    return set(re.findall(r"\b(?:softthought|ray)_[a-z0-9_]+", exprs))


def test_the_gpu_deployment_runs_several_ingress_replicas_on_postgresql_from_a_secret():
    app = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy/serve_gpu.yaml").read_text())).applications[0]
    assert {d.name: d for d in app.deployments}["Ingress"].num_replicas >= 2
    assert app.args["store"] is None  # from $SOFTTHOUGHT_STORE: a DSN with a password stays out of the config
    cluster = yaml.safe_load((ROOT / "deploy/rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:  # every node may host an Ingress replica
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["SOFTTHOUGHT_STORE"]["valueFrom"]["secretKeyRef"]["name"] == "softthought-store"
