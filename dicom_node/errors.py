"""One exception tree for the node: every failure the CLI reports is one of these, with a one-line reason."""

from __future__ import annotations

import errno as errno_codes
import re
from typing import Any

_QUOTED = re.compile(r"""(?P<q>['"])(?P<v>[^'"]{0,200})(?P=q)""")
# Kept: empty values (they say "missing", which is the point of many messages), numbers, UIDs (4 or more
# components, unlike a date such as 31.12.1960) and tags such as (0010,0030).
_SAFE = re.compile(r"^$|^-?[0-9]+(\.[0-9]+)?$|^[0-9]+(\.[0-9]+){3,}$|^\(?[0-9A-Fa-f]{4}, ?[0-9A-Fa-f]{4}\)?$")


#: Quoted names that say where a problem is, not what a patient is called: pydicom's classes ("'Dataset'
#: object has no attribute 'PatientSex'").
_SAFE_NAMES = frozenset({"Dataset", "FileDataset", "DataElement", "Sequence", "FileMetaDataset", "RawDataElement"})


def _safe(value: str) -> bool:
    if _SAFE.match(value) or value in _SAFE_NAMES:
        return True
    from pydicom.datadict import keyword_dict

    return value in keyword_dict  # an attribute's keyword ("PatientSex"), never its value


def redact(text: str) -> str:
    """Replace quoted values in a third-party error message by '<redacted>', keeping UIDs, numbers, tags,
    DICOM keywords and pydicom's class names.

    pydicom and highdicom quote the offending value ("Unable to convert '31.12.1960' to 'DA'"), which can be
    patient data; such messages end up in logs and in the reasons `dicom-node status` shows.
    """
    return _QUOTED.sub(lambda m: m.group(0) if _safe(m.group("v")) else f"{m.group('q')}<redacted>{m.group('q')}", text)


def redact_all(value: Any) -> Any:
    """`value` (JSON-like: dicts, lists, strings) with `redact` applied to every string in it."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_all(v) for v in value]
    return value


class NodeError(Exception):
    """Base of every error the node raises on purpose; `str(exc)` is the one-line reason."""


class ConfigError(NodeError):
    """The configuration is invalid; `problems` lists every problem as ``"key: what is wrong"``."""

    def __init__(self, problems: list[str], source: str = "configuration") -> None:
        self.problems = list(problems)
        self.source = source
        first = self.problems[0] if self.problems else "invalid"
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(f"{source}: {first}{more}")


class StorageError(NodeError):
    """An instance or output could not be written to, or read from, the store; `errno` is the OS error's,
    when one caused it."""

    #: A full, over-quota or read-only file system: every write fails, not only this one.
    STORE_WIDE = frozenset({errno_codes.ENOSPC, errno_codes.EDQUOT, errno_codes.EROFS})

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @property
    def store_wide(self) -> bool:
        """True when the whole store fails (`STORE_WIDE`), not one file or folder (e.g. its permissions)."""
        return self.errno in self.STORE_WIDE


class DatabaseError(NodeError):
    """The node database could not be opened, migrated or written."""


class DatasetError(NodeError):
    """A received dataset cannot be understood (missing identity, truncated, undecodable)."""


class InstanceConflict(DatasetError):
    """A received instance carries the SOP Instance UID of an instance the node holds in another study."""


class PipelineError(NodeError):
    """A study could not be analysed or its outputs could not be encoded."""
