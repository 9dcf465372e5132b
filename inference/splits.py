"""Which real radiographs each shipped model learnt from, which neither saw, and whose patient that is.

The two radiograph models split the real films (``radiographs/cadma_train``) with two different hashes: the
vertebra model with `inference.train.cadma.split_of` (12 % test, 10 % val), the hardware model with
`inference.synth.real.real_split` (15 % test, 10 % val).  So most of the hardware model's test films are
training films of the vertebra model, whose vertebrae the hardware evaluation uses end to end; and films of
one patient (the AASCE films ``...-159-A-AP`` and ``...-159-C-AP``) can sit on both sides of either split.
Worse, the vertebra model's synthetic training cache drew implants onto real films of the hardware split's
"train" part, with their boxes as weak labels, and 34 of those are in the vertebra model's own test split.
The shipped weights were trained so, and their evaluation has to live with it: this module names the films
each model learnt from and the films held out from a model (or from both) for all of a patient's films,
the only ones that measure the node on a film nobody tuned on.  (A next training run should use one
split, grouped by patient, for everything.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from inference.synth.real import real_split
from inference.train.cadma import source_key, split_of


def patient_key(name: str | Path) -> str:
    """The patient a film belongs to, as far as its name tells: an AASCE film's letter (``-159-A-AP``) and a
    second film's ``_1_1`` (``N11-S-21-F_1_0`` / ``_1_1``) are dropped; any other name is its own patient."""
    key = source_key(Path(name))
    key = re.sub(r"-[A-Z]-AP$", "", key)
    return re.sub(r"_\d+_\d+$", "", key)


def vertebra_split(name: str | Path) -> str:
    """"train" | "val" | "test" of the vertebra model's training."""
    return split_of(source_key(Path(name)))


def hardware_split(name: str | Path) -> str:
    """"train" | "val" | "test" of the hardware model's training."""
    return real_split(Path(name).name)


def patient_disjoint(names: Iterable[str | Path], seen: Iterable[str | Path]) -> list[str | Path]:
    """`names` whose patient has no film among `seen` (the films a model learnt from or was tuned on)."""
    patients = {patient_key(n) for n in seen}
    return [n for n in names if patient_key(n) not in patients]


def cache_films(meta: dict[str, Any]) -> list[str]:
    """The real films a model's synthetic training cache drew implants onto (its `model.json` manifest): the
    vertebra model learnt from those too, with their boxes as weak labels, whatever its own split says."""
    synthetic = meta.get("training", {}).get("data", {}).get("synthetic", {})
    real = synthetic.get("manifest", {}).get("provenance", {}).get("real_images", {})
    return [Path(f).name for f in real.get("files", [])]


def vertebra_seen(all_names: Iterable[str | Path], meta: dict[str, Any]) -> list[str | Path]:
    """Films the vertebra model trained or was tuned on: its train and val splits and its cache's films."""
    return [n for n in all_names if vertebra_split(n) in ("train", "val")] + list(cache_films(meta))


def hardware_seen(all_names: Iterable[str | Path]) -> list[str | Path]:
    """Films the hardware model trained or was tuned on: its train and val splits (its cache draws from train)."""
    return [n for n in all_names if hardware_split(n) in ("train", "val")]


def unseen_by_both(all_names: Iterable[str | Path], vertebra_meta: dict[str, Any]) -> list[str | Path]:
    """Films in the test split of both models whose patient has no film either model trained or tuned on."""
    names = list(all_names)
    both = [n for n in names if vertebra_split(n) == "test" and hardware_split(n) == "test"]
    return patient_disjoint(both, vertebra_seen(names, vertebra_meta) + hardware_seen(names))
