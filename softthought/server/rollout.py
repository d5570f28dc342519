"""Zero-downtime rollout of a new auxiliary checkpoint through Ray Serve's `user_config`.

The checkpoint is validated first (readable, right backbone fingerprint and hidden size); only then is the
running application's own config re-applied with `Aux.user_config.checkpoint` changed. A user_config-only
change makes Serve call `reconfigure` on every live Aux replica in place: no replica restarts, requests keep
flowing, and thoughts cached for the old version are never served for the new one (the cache is keyed by
version). This is what `serve deploy` does with an edited config file.
"""

from __future__ import annotations

from ..aux_model import CheckpointError, SoftThoughtAux

AUX_DEPLOYMENT = "Aux"


def load_checkpoint(path: str, backbone_info: dict) -> SoftThoughtAux:
    """The checkpoint as an Aux replica serves it, or CheckpointError naming why the backbone (`info()` of its
    deployment) cannot use it."""
    try:
        model = SoftThoughtAux.from_pretrained(path, expected_fingerprint=backbone_info["fingerprint"])
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if model.config.backbone_hidden != backbone_info["hidden_size"]:
        raise CheckpointError(f"{path} projects to hidden size {model.config.backbone_hidden}, "
                              f"the backbone's is {backbone_info['hidden_size']}")
    if model.placement.reply_only and backbone_info.get("engine") == "vllm":
        raise CheckpointError(f"{path} hides its thoughts from the prompt with an attention mask (thoughts_seen_by: "
                              "reply), which the vLLM engine cannot apply: use engine 'hf', or a checkpoint with "
                              "thoughts_at: end")
    if model.config.guidance != 1 and backbone_info.get("engine") == "vllm":
        raise CheckpointError(f"{path} reads its thoughts with guidance {model.config.guidance}, which decodes a guide "
                              "sequence beside each reply: the vLLM engine cannot, use engine 'hf' (or set guidance "
                              "to 1 in its config.json)")
    return model.eval()


def validate_checkpoint(path: str, backbone_info: dict) -> str:
    """Load the checkpoint as a replica would; return its version or raise CheckpointError naming the problem."""
    return load_checkpoint(path, backbone_info).version


def apply_checkpoint(app_name: str, checkpoint: str) -> None:
    """Re-apply the running config with the Aux deployment's user_config pointing at `checkpoint` (blocking)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema, ServeInstanceDetails

    client = _get_global_client()
    details = ServeInstanceDetails(**client.get_serve_details())
    apps = []
    for name, app in details.applications.items():
        if app.deployed_app_config is None:
            raise RuntimeError(f"application {name!r} was not deployed from a config file")
        # exclude_unset: re-apply exactly what the operator set, so nothing else changes or restarts
        config = app.deployed_app_config.model_dump(exclude_unset=True)
        if name == app_name:
            deployments = config.get("deployments") or []
            aux = next((d for d in deployments if d["name"] == AUX_DEPLOYMENT), None)
            if aux is None:
                aux = {"name": AUX_DEPLOYMENT}
                deployments.append(aux)
            aux["user_config"] = {**(aux.get("user_config") or {}), "checkpoint": checkpoint}
            config["deployments"] = [DeploymentSchema(**d).model_dump(exclude_unset=True) for d in deployments]
        apps.append(ServeApplicationSchema(**config))
    top = details.model_dump(include={"proxy_location", "http_options", "grpc_options"}, exclude_unset=True)
    client.deploy_apps(ServeDeploySchema(**top, applications=apps), _blocking=False)
