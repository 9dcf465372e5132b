"""Named analyses: what a routing rule asks for (``analyses = ["spine-xr"]``) and the code that runs it.

An analysis takes the decoded source instances of one study that its routing rule selected and returns
one `StudyResult`.  It loads its models through the `ModelRegistry` it is built with, so the node loads
each model once and `dicom-node analyze` runs exactly what the service runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from inference.registry import ModelRegistry
from inference.results import ModelInfo, StudyResult

if TYPE_CHECKING:
    from pydicom import Dataset


class AnalysisError(Exception):
    """An analysis could not produce a result for its input (message names the instance and the reason)."""


class Analysis(Protocol):
    """The interface the pipeline calls."""

    name: str

    def models(self) -> tuple[ModelInfo, ...]:
        """Models (name, version) this analysis runs; loads them if needed."""
        ...

    def run(self, datasets: Sequence[Dataset]) -> StudyResult:
        """Analyse the selected instances of one study (all share one StudyInstanceUID)."""
        ...


AnalysisFactory = Callable[[ModelRegistry], Analysis]

_FACTORIES: dict[str, AnalysisFactory] = {}


def register(name: str, factory: AnalysisFactory) -> None:
    """Make analysis `name` available to routing rules (called by the modules that implement one)."""
    _FACTORIES[name] = factory


def _load_builtin() -> None:
    # Imported lazily so that `import inference.analyses` stays cheap and torch-free.
    import importlib

    for module in ("inference.radiograph.analysis",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def available() -> list[str]:
    """Names a routing rule may use."""
    _load_builtin()
    return sorted(_FACTORIES)


def create(name: str, registry: ModelRegistry) -> Analysis:
    """Instantiate analysis `name`; raises `AnalysisError` listing the valid names."""
    _load_builtin()
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise AnalysisError(f"unknown analysis {name!r} (available: {', '.join(sorted(_FACTORIES)) or 'none'})") from None
    return factory(registry)
