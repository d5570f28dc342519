"""Application arguments (the `args:` of the Serve config file), validated with pydantic."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from ..memory import MemorySettings
from ..pipeline import DEFAULT_AUX_DIR, default_aux_dir


def _keys(listed: list[str], env: str) -> set[str]:
    return {k for k in listed if k} | {k.strip() for k in os.environ.get(env, "").split(",") if k.strip()}


def _key_and_tenant(item: str) -> tuple[str, str | None]:
    """"key=tenant" or a plain "key". A tenant holds no "=", a key may (base64 padding): split at the last one."""
    key, _, tenant = item.strip().rpartition("=")
    return (key.strip(), tenant.strip()) if key.strip() and tenant.strip() else (item.strip(), None)


def key_tenant(key: str) -> str:
    """The tenant of a key listed without one: its own, named by a hash (the key itself is never stored)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def default_store_path() -> str:
    base = os.environ.get("XDG_DATA_HOME", str(Path.home() / ".local" / "share"))
    return str(Path(base) / "softthought" / "preferences.db")


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: str | None = Field(None, description="HF model directory or hub id; null = embedded SmolLM2-135M-Instruct")
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: Literal["auto", "hf", "vllm"] = Field("auto", description="hf = our transformers engine (the exact "
                                                  "reference); vllm = vLLM (prefix cache, paged KV); auto = vllm where "
                                                  "it is installed and the replica has a GPU")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one Backbone replica shards the model over")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of each GPU for weights + KV cache")
    kv_cache_gib: float = Field(1.0, gt=0, description="vllm on CPU: KV cache size in GiB")
    enforce_eager: bool = Field(False, description="vllm: no graph compilation (faster start, slower decoding)")
    aux_checkpoint: str | None = Field("default", description="'default' = the shipped checkpoint, null = none")
    served_model_name: str = "softthought"
    store: str | None = Field(None, validation_alias=AliasChoices("store", "store_path"),
                              description="preference store: a SQLite path, sqlite:///path or postgresql://user@host/db "
                              "(password from $PGPASSWORD); null = $SOFTTHOUGHT_STORE, else a SQLite file in the "
                              "user's data directory")
    api_keys: list[str] | dict[str, str] = Field(
        default_factory=list, description="inference keys, as a list (each key its own tenant) or {key: tenant}; also "
        "read from $SOFTTHOUGHT_API_KEYS as key or key=tenant, comma-separated")
    admin_keys: list[str] = Field(default_factory=list, description="for /admin/* and /health's details; also read from "
                                  "$SOFTTHOUGHT_ADMIN_KEYS. With no key of either kind the server is open (loopback).")
    checkpoint_roots: list[str] = Field(default_factory=list, description="directories /admin/aux may load checkpoints "
                                        "from, besides the shipped ones' and the configured aux_checkpoint's")
    default_max_tokens: int = Field(256, ge=1)
    max_tokens_limit: int = Field(1024, ge=1)
    max_n: int = Field(4, ge=1)
    max_prompt_tokens: int = Field(4096, ge=1)
    max_summary_chars: int = Field(2000, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413 before they are read")
    request_timeout_s: float = Field(120.0, gt=0)
    max_batch_size: int = Field(16, ge=1)
    thought_cache_size: int = Field(4096, ge=0)
    backbone_threads: int | None = Field(None, ge=1, description="torch threads in a backbone replica; null = all cores")
    aux_threads: int = Field(1, ge=1)
    onboarding_questions: str | None = Field(None, description="the onboarding question bank (JSON, built by "
                                             "train_aux.onboarding_bank); null = the shipped one")
    onboarding_max_questions: int = Field(10, ge=1)
    onboarding_confidence: float = Field(0.95, gt=0, lt=1, description="onboarding stops once the most probable "
                                         "preference set is this likely")
    onboarding_session_ttl_s: float = Field(3600.0, gt=0)
    feedback_min_ratings: int = Field(3, ge=1, description="ratings before feedback may revise a learned summary")
    completion_retention_s: float = Field(30 * 86400.0, gt=0, description="how long a completion requested with "
                                          "store: true (and a user) can be rated")
    max_stored_completions: int = Field(50, ge=1, description="per user; older stored completions are dropped")

    def memory_settings(self) -> MemorySettings:
        return MemorySettings(self.onboarding_max_questions, self.onboarding_confidence, session_ttl_s=self.onboarding_session_ttl_s,
                              min_ratings=self.feedback_min_ratings, completion_retention_s=self.completion_retention_s,
                              max_stored_completions=self.max_stored_completions)

    def resolved_aux_checkpoint(self) -> str | None:
        if self.aux_checkpoint == "default":
            found = default_aux_dir()
            return str(found) if found else None
        return self.aux_checkpoint

    def resolved_store(self) -> str:
        return self.store or os.environ.get("SOFTTHOUGHT_STORE") or default_store_path()

    def resolved_api_keys(self) -> dict[str, str]:
        """Every inference key with its tenant."""
        listed = dict(self.api_keys) if isinstance(self.api_keys, dict) else dict(map(_key_and_tenant, self.api_keys))
        listed.update(map(_key_and_tenant, os.environ.get("SOFTTHOUGHT_API_KEYS", "").split(",")))
        return {k: t or key_tenant(k) for k, t in listed.items() if k}

    def resolved_admin_keys(self) -> set[str]:
        return _keys(self.admin_keys, "SOFTTHOUGHT_ADMIN_KEYS")

    def resolved_checkpoint_roots(self) -> list[str]:
        """Absolute, symlink-free roots: the listed ones, the shipped checkpoints' directory and the configured
        checkpoint's parent (so that its siblings, the next versions, can be rolled out)."""
        roots = [*self.checkpoint_roots, str(DEFAULT_AUX_DIR.parent)]
        if configured := self.resolved_aux_checkpoint():
            roots.append(str(Path(configured).parent))
        return sorted({os.path.realpath(r) for r in roots})
