"""Train the complication classifier (`inference.radiograph.hardware_patches`) into a hardware model folder.

`python -m inference.train.hardware` runs this stage after the segmentation (``--patch-iterations``); on its
own it adds (or replaces) the stage in an existing model folder, keeping its segmentation network:

    python -m inference.train.hardware_patches --cache ../cache/synth-hardware-v3 --model FOLDER

Data (`PatchBank`): every visible true implant of the cache's training samples; with ``--found-rods`` also
windows along the rod pieces the folder's own segmentation finds on them, labelled by the true gap (measured
2026-12-06 and not in the shipped recipe: see the hardware model's notes).  The samples held out from the
segmentation training (every ``--val-every``-th) tune each complication's threshold (Youden's J on the
implants the whole model finds) and give its AUC.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from inference.radiograph.hardware_patch_data import PatchBank, complication_scores, train_patch_net, youden
from inference.train import common

log = logging.getLogger("inference.train.hardware_patches")


def collect(model: Any, cache: Path, exclude_sources: set[str], val_every: int, found_rods: bool) -> tuple[PatchBank, list[Any], dict[str, int]]:
    """The patch bank of the training samples and the held-out samples with implants (`common.cache_role`'s
    split), and how many rod pieces the segmentation found."""
    from inference.synth.build import iter_cache

    bank, held_out = PatchBank(), []
    counted = {"samples": 0, "found_rod_pieces": 0}
    t0 = time.time()
    for k, sample in enumerate(iter_cache(cache)):
        role = common.cache_role(k, sample, exclude_sources, val_every)
        if role is None:
            continue
        if role == "held_out":
            if sample.implant_specs:
                held_out.append(sample)
            continue
        image = bank.add(sample)
        if found_rods:
            counted["found_rod_pieces"] += bank.add_found_rods(model, sample, image)
        counted["samples"] += 1
        if counted["samples"] % 200 == 0:
            log.info("patch data: %d samples (%.0f s)", counted["samples"], time.time() - t0)
    return bank, held_out, counted


def add_stage(
    model_folder: Path, cache: Path, exclude_sources: set[str], val_every: int, iterations: int, seed: int, command: str,
    found_rods: bool = False,
) -> dict[str, Any]:
    """Train the classifier, tune the complication thresholds on the held-out samples, and write both into
    the model folder (weights.pt gains "complications"; model.json its thresholds and training record)."""
    from inference.radiograph import network
    from inference.radiograph.hardware import HardwareModel
    from inference.registry import ModelSpec

    t0 = time.time()
    model = HardwareModel.from_spec(ModelSpec.read(model_folder))
    bank, held_out, counted = collect(model, cache, exclude_sources, val_every, found_rods)
    log.info("complication classifier items: %s; %s", bank.counts(), counted)
    net = train_patch_net(bank, iterations, seed, log)
    model.patch_net = net
    pairs = complication_scores(model, held_out)
    defaults = model.params.complication_threshold
    tuning = {comp: youden(values, defaults[comp]) for comp, values in pairs.items()}
    info = {
        "command": command,
        "iterations": iterations,
        "minutes": round((time.time() - t0) / 60, 1),
        "items": bank.counts(),
        "found_rods": found_rods,
        "found_rod_pieces": counted["found_rod_pieces"],
        "parameters": network.parameter_count(net),
        "held_out_samples": len(held_out),
        "excluded_sources": sorted(exclude_sources),
    }
    meta = common.add_stage_weights(model_folder, "complications", net.state_dict())
    meta.setdefault("postprocess", {})["complication_threshold"] = {**defaults, **{c: e["threshold"] for c, e in tuning.items()}}
    meta.setdefault("training", {})["complication_classifier"] = info
    meta["training"]["complication_tuning"] = tuning
    common.write_json(model_folder / "model.json", meta)
    log.info("complication thresholds tuned on %d held-out samples: %s; wrote %s (%s)", len(held_out), tuning, model_folder, meta["version"])
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inference.train.hardware_patches", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True, help="data-engine cache with implants (.npz shards)")
    ap.add_argument("--model", type=Path, required=True, help="hardware model folder to add the stage to")
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-every", type=int, default=10, help="as the segmentation training: every n-th sample is held out")
    ap.add_argument("--exclude-sources", default="", help="comma list of CT sources left out (leave-one-patient-out)")
    ap.add_argument("--found-rods", action="store_true", help="also windows along the rods the folder's segmentation finds")
    args = ap.parse_args(argv)
    common.setup_logging()
    common.setup(args.seed, args.threads)
    if not (args.model / "model.json").is_file():
        ap.error(f"--model: {args.model}/model.json not found")
    if not (args.cache / "manifest.json").is_file():
        ap.error(f"--cache: {args.cache}/manifest.json not found")
    command = "python -m inference.train.hardware_patches " + " ".join(sys.argv[1:] if argv is None else argv)
    add_stage(args.model, args.cache, {s for s in args.exclude_sources.split(",") if s}, args.val_every, args.iterations, args.seed,
              command, found_rods=args.found_rods)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
