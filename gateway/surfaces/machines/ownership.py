"""Whether a volume or snapshot belongs to an app, asked of the upstream (for `same_app_volumes`)."""

from __future__ import annotations

import re

from gateway.core.constraints import VolumeOwnership
from gateway.upstream.client import UpstreamClient

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def volume_ownership(upstream: UpstreamClient, request_id: str) -> VolumeOwnership:
    """Checks that ask the upstream with gateway-built paths (ids must be plain ids)."""

    async def volume_of(app: str, volume: str) -> bool:
        if not _SAFE_ID.fullmatch(volume):
            return False
        status, document = await upstream.get_json(f"/v1/apps/{app}/volumes/{volume}", request_id)
        return status == 200 and isinstance(document, dict) and document.get("id") == volume

    async def snapshot_of(app: str, snapshot: str) -> bool:
        if not _SAFE_ID.fullmatch(snapshot):
            return False
        status, volumes = await upstream.get_json(f"/v1/apps/{app}/volumes", request_id)
        if status != 200 or not isinstance(volumes, list):
            return False
        for volume in volumes:
            volume_id = volume.get("id") if isinstance(volume, dict) else None
            if not isinstance(volume_id, str) or not _SAFE_ID.fullmatch(volume_id):
                continue
            status, snapshots = await upstream.get_json(f"/v1/apps/{app}/volumes/{volume_id}/snapshots", request_id)
            if status == 200 and isinstance(snapshots, list) and any(
                    isinstance(item, dict) and item.get("id") == snapshot for item in snapshots):
                return True
        return False

    return VolumeOwnership(volume_of, snapshot_of)
