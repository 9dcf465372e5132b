"""The DICOM node: receives studies (C-STORE), routes them to analyses, sends results back (C-STORE)."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("spine-pacs-ai-node")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
