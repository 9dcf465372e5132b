"""The real radiographs' splits: whose film is which, which split a model trained on, which films it never saw.

The real films (``radiographs/cadma_train``) are split by a hash of a name.  Two schemes trained the shipped
weights, and a third is for every training from now on:

* ``cadma-v1`` (the vertebra model so far; ``inference.train.cadma.split_of`` in its records): sha256 of the
  source name (`source_key`), 12 % test, 10 % val;
* ``real-v1`` (the hardware model so far, and the data engine's implant overlays; ``inference.synth.real.
  real_split`` in their records): sha256 of the source stem (`source_stem`) mod 100, 15 % test, 10 % val;
* ``patient-v2`` (`TRAINING_SCHEME`): sha256 of the PATIENT (`patient_key`) mod 100, 15 % test, 10 % val, so
  that a patient's films sit on one side, and one split for both models and the cache that feeds them.

With the two old schemes most of the hardware model's test films were training films of the vertebra model
(whose vertebrae the hardware evaluation uses end to end), the vertebra model's synthetic cache drew implants
onto films of the hardware scheme's "train" part (34 of them in the vertebra model's own test split), and the
films of one patient (AASCE ``...-159-A-AP`` / ``...-159-C-AP``) could sit on both sides.  A model records its
scheme in ``model.json`` (``training.data.real.split_scheme``; absent: the old scheme of that model), so its
evaluation always scores the films its own training held out; and `unseen_by_both` names the films neither
model learnt from, for all of a patient's films.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

#: A film's name or path: the films a function is given come back as they were given.
NameT = TypeVar("NameT", bound=str | Path)

#: The scheme every training uses from now on (see the module text).
TRAINING_SCHEME = "patient-v2"
#: The scheme of a model whose model.json names none: the shipped weights trained before schemes were recorded.
VERTEBRA_LEGACY_SCHEME = "cadma-v1"
HARDWARE_LEGACY_SCHEME = "real-v1"


def source_key(name: str | Path) -> str:
    """Name of the source image a Roboflow export file came from (``Image_287_jpg.rf.<hash>.jpg`` -> ``Image_287``)."""
    stem = Path(name).name.split(".rf.")[0]
    return stem[:-4] if stem.endswith("_jpg") else stem


def source_stem(name: str | Path) -> str:
    """The source image's stem: the file name without Roboflow's ``.rf.<hash>`` part (``Image_287_jpg``)."""
    stem = Path(name).name.split(".rf.")[0]
    return stem.rsplit(".", 1)[0] if stem.lower().endswith((".jpg", ".png", ".txt")) else stem


def patient_key(name: str | Path) -> str:
    """The patient a film belongs to, as far as its name tells: an AASCE film's letter (``-159-A-AP``) and a
    second film's ``_1_1`` (``N11-S-21-F_1_0`` / ``_1_1``) are dropped; any other name is its own patient."""
    key = re.sub(r"-[A-Z]-AP$", "", source_key(name))
    return re.sub(r"_\d+_\d+$", "", key)


def _cadma_v1(name: str | Path) -> str:
    h = int(hashlib.sha256(source_key(name).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < 0.12 else ("val" if h < 0.22 else "train")


def _by_percent(key: str) -> str:
    h = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100
    return "test" if h < 15 else ("val" if h < 25 else "train")


SCHEMES: dict[str, Callable[[str | Path], str]] = {
    "cadma-v1": _cadma_v1,
    "real-v1": lambda name: _by_percent(source_stem(name)),
    "patient-v2": lambda name: _by_percent(patient_key(name)),
}


def split_of(name: str | Path, scheme: str = TRAINING_SCHEME) -> str:
    """"train" | "val" | "test" of a real film (file name or path) under `scheme`."""
    try:
        return SCHEMES[scheme](name)
    except KeyError:
        raise ValueError(f"unknown split scheme {scheme!r} (known: {', '.join(SCHEMES)})") from None


def describe(scheme: str) -> str:
    """One line for a model card or a manifest: what the scheme hashes and its shares."""
    return {
        "cadma-v1": "cadma-v1: sha256 of the source name; 78 % train, 10 % val, 12 % test",
        "real-v1": "real-v1: sha256 of the source stem mod 100; 75 % train, 10 % val, 15 % test",
        "patient-v2": "patient-v2: sha256 of the patient (all of a patient's films together) mod 100;"
                      " 75 % train, 10 % val, 15 % test",
    }[scheme]


def scheme_of(meta: dict[str, Any] | None, legacy: str) -> str:
    """The scheme a model (its ``model.json``) trained with; `legacy` when it names none."""
    real = ((meta or {}).get("training") or {}).get("data", {}).get("real") or {}
    return str(real.get("split_scheme") or legacy)


def vertebra_split(name: str | Path, meta: dict[str, Any] | None = None) -> str:
    """"train" | "val" | "test" of the vertebra model (`meta`: its model.json) for a film."""
    return split_of(name, scheme_of(meta, VERTEBRA_LEGACY_SCHEME))


def hardware_split(name: str | Path, meta: dict[str, Any] | None = None) -> str:
    """"train" | "val" | "test" of the hardware model (`meta`: its model.json) for a film."""
    return split_of(name, scheme_of(meta, HARDWARE_LEGACY_SCHEME))


def patient_disjoint(names: Iterable[NameT], seen: Iterable[str | Path]) -> list[NameT]:
    """`names` whose patient has no film among `seen` (the films a model learnt from or was tuned on)."""
    patients = {patient_key(n) for n in seen}
    return [n for n in names if patient_key(n) not in patients]


def lineage(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """A model's record (`model.json`) and those of the models it was fine-tuned from, nearest first
    (``training.initialised_from.model``, recorded by the vertebra trainer): a fine-tune has seen all they saw."""
    chain = [meta]
    while len(chain) < 32:  # a bound, not a depth seen: a hand-edited record could point at itself
        ancestor = ((chain[-1].get("training") or {}).get("initialised_from") or {}).get("model")
        if not ancestor:
            break
        chain.append(ancestor)
    return chain


def cache_films(meta: dict[str, Any]) -> list[str]:
    """The real films the synthetic training caches of a model and its ancestors (`lineage`) drew implants onto
    (their `model.json` manifests): the vertebra model learnt from those too, with their boxes as weak labels,
    whatever its own split says."""
    films = []
    for record in lineage(meta):
        synthetic = ((record.get("training") or {}).get("data") or {}).get("synthetic") or {}
        real = ((synthetic.get("manifest") or {}).get("provenance") or {}).get("real_images") or {}
        films += [Path(f).name for f in real.get("files") or []]
    return films


def vertebra_seen(all_names: Iterable[NameT], meta: dict[str, Any]) -> list[NameT | str]:
    """Films the vertebra model or a model it was fine-tuned from trained or was tuned on: their train and val
    splits (each by its own scheme) and their caches' films."""
    names = list(all_names)
    return [n for record in lineage(meta) for n in names if vertebra_split(n, record) in ("train", "val")] + cache_films(meta)


def hardware_seen(all_names: Iterable[NameT], meta: dict[str, Any] | None = None) -> list[NameT]:
    """Films the hardware model trained or was tuned on: its train and val splits (its cache draws from train).
    A hardware fine-tune from a model whose model.json describes its weights needs no `lineage`: the trainer
    holds it to that model's scheme (`inference.train.common.split_scheme`) and its cache to that scheme's train
    films, so what its base saw is in these splits too.  From weights no model.json describes, what they saw is
    not known (the trainer warns; leave-one-patient-out refuses such a model)."""
    return [n for n in all_names if hardware_split(n, meta) in ("train", "val")]


def unseen_by_both(all_names: Iterable[NameT], vertebra_meta: dict[str, Any],
                   hardware_meta: dict[str, Any] | None = None) -> list[NameT]:
    """Films in the test split of both models whose patient has no film either model trained or tuned on."""
    names = list(all_names)
    both = [n for n in names if vertebra_split(n, vertebra_meta) == "test" and hardware_split(n, hardware_meta) == "test"]
    return patient_disjoint(both, vertebra_seen(names, vertebra_meta) + hardware_seen(names, hardware_meta))
