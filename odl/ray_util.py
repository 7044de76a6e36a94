"""Connecting to the Ray cluster on loopback only (see DESIGN.md's Ray facts)."""
from __future__ import annotations

import os

from odl.config import Config

NAMESPACE = "odl"
TRAINER_ACTOR = "odl-trainer"

# Without these Ray binds every interface, advertises a non-loopback address and demands tokens.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0"}


def ray_address(cfg: Config) -> str:
    return cfg.ray.address or f"127.0.0.1:{cfg.ray.port}"


def ray_temp_dir(cfg: Config) -> str:
    # Unix socket paths are limited to 107 bytes, so keep Ray's session dir short.
    return f"/tmp/odl-ray-{os.getuid()}-{cfg.ray.port}"


def connect(cfg: Config):
    """Attach to the cluster; on the local stack every process stays on loopback (the
    environment must be set before Ray is imported: it reads it at import)."""
    if cfg.ray.loopback:
        os.environ.update(LOOPBACK_ENV)
    import ray
    if not ray.is_initialized():
        local = {"_node_ip_address": "127.0.0.1"} if cfg.ray.loopback else {}
        ray.init(address=ray_address(cfg), namespace=NAMESPACE, log_to_driver=True, **local)
    return ray
