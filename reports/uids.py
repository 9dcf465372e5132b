"""Deterministic UIDs: the same source, model version and output kind always give the same UID.

A re-run therefore replaces its earlier output in PACS instead of adding a duplicate, and a restart
after a crash re-creates identical objects.  A UID is ``2.25.<uuid>`` (PS3.5 B.2) where the UUID is a
name-based version-5 UUID of the parts, never random.
"""

from __future__ import annotations

import uuid

from pydicom.uid import UID

# Fixed namespace of this product; changing it would change every output UID.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/spine-pacs-ai-node")


def derive_uid(*parts: str) -> UID:
    """A UID derived from `parts` (e.g. source study UID, model version, output kind, frame)."""
    if not parts or any(not isinstance(p, str) or not p for p in parts):
        raise ValueError(f"derive_uid needs non-empty string parts, got {parts!r}")
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, chr(0x1F).join(parts)).int}")
