"""Model folders: discovery, integrity check, device choice and a cache of loaded models.

A model folder holds ``model.json`` (metadata) beside its weights::

    inference/models/spine-xr-vertebrae/
        model.json      {"name", "version", "task", "weights", "sha256", "architecture", "inputs",
                         "outputs", "training", "metrics"}
        weights.pt      state dict or TorchScript, <= 20 MB
        MODEL_CARD.md   written by the evaluation script

Nothing is downloaded: a folder that is missing or whose weights do not match ``sha256`` is an error
naming the folder.  torch is imported only when a model is actually loaded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from inference.results import ModelInfo

#: Where the shipped models live.
BUILTIN_MODELS = Path(__file__).resolve().parent / "models"

T = TypeVar("T")


class ModelError(Exception):
    """A model folder is missing, malformed or fails its integrity check."""


@dataclass(frozen=True)
class ModelSpec:
    """What ``model.json`` says about one model folder."""

    name: str
    version: str
    folder: Path
    weights: Path
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def info(self) -> ModelInfo:
        """Identity for results and algorithm identification."""
        return ModelInfo(self.name, self.version)

    @classmethod
    def read(cls, folder: Path) -> ModelSpec:
        """Parse ``folder/model.json``; raises `ModelError` naming the folder and the problem."""
        meta_path = folder / "model.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{folder}: no model.json") from None
        except json.JSONDecodeError as exc:
            raise ModelError(f"{meta_path}: not valid JSON ({exc})") from None
        missing = [k for k in ("name", "version", "weights", "sha256") if not meta.get(k)]
        if missing:
            raise ModelError(f"{meta_path}: missing {', '.join(missing)}")
        return cls(meta["name"], str(meta["version"]), folder, folder / meta["weights"], meta["sha256"], meta)

    def verify(self) -> None:
        """Check the weights exist and match their recorded sha256."""
        if not self.weights.is_file():
            raise ModelError(f"{self.folder}: weights file {self.weights.name} is missing")
        digest = sha256_file(self.weights)
        if digest != self.sha256:
            raise ModelError(f"{self.folder}: {self.weights.name} sha256 {digest[:12]}... != model.json {self.sha256[:12]}...")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pick_device(requested: str = "auto") -> str:
    """``"cpu"`` unless a GPU is requested (``"cuda"``) or ``"auto"`` finds one; a GPU is never required."""
    if requested == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if requested not in ("auto", "cpu"):
        raise ModelError(f"device {requested!r} requested but torch sees no GPU")
    return "cpu"


class ModelRegistry:
    """Discovers model folders under `roots` and caches what `load` builds from them (thread-safe)."""

    def __init__(self, roots: Iterable[Path] = (BUILTIN_MODELS,), device: str = "cpu") -> None:
        self.roots = tuple(Path(r) for r in roots)
        self.device_request = device
        self._lock = threading.Lock()
        self._specs: dict[str, ModelSpec] | None = None
        self._loaded: dict[str, Any] = {}
        self._building: dict[str, threading.Lock] = {}  # one lock per model being built

    def specs(self) -> dict[str, ModelSpec]:
        """Every model folder found, by name (later roots override earlier ones)."""
        with self._lock:
            if self._specs is None:
                found: dict[str, ModelSpec] = {}
                for root in self.roots:
                    if not root.is_dir():
                        continue
                    for meta in sorted(root.glob("*/model.json")):
                        spec = ModelSpec.read(meta.parent)
                        found[spec.name] = spec
                self._specs = found
            return dict(self._specs)

    def spec(self, name: str) -> ModelSpec:
        """The spec of model `name`; raises `ModelError` listing what is available."""
        specs = self.specs()
        if name not in specs:
            available = ", ".join(sorted(specs)) or "none"
            raise ModelError(f"model {name!r} not found under {', '.join(map(str, self.roots))} (available: {available})")
        return specs[name]

    def load(self, name: str, build: Callable[[ModelSpec, str], T]) -> T:
        """Build model `name` once with ``build(spec, device)`` after verifying its weights; cached.

        A caller arriving while another builds the same model waits for that build (the start-up warm-up and
        the first study would otherwise each build it, twice the memory and time); other models build in
        parallel."""
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]  # type: ignore[no-any-return]
            building = self._building.setdefault(name, threading.Lock())
        with building:
            with self._lock:
                if name in self._loaded:
                    return self._loaded[name]  # type: ignore[no-any-return]
            spec = self.spec(name)
            spec.verify()
            device = pick_device(self.device_request)
            model = build(spec, device)
            with self._lock:
                return self._loaded.setdefault(name, model)  # type: ignore[no-any-return]

    def loaded(self) -> list[str]:
        """Names of models loaded so far (for readiness checks)."""
        with self._lock:
            return sorted(self._loaded)
