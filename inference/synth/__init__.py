"""The data engine: synthetic training data for the radiograph models (issue 4 item 1, issue 5 item 1).

Public API (contract "data engine -> training", docs/team/contracts.md):

* `inference.synth.render.render_sample(seed, SynthConfig(...)) -> SynthSample`: a DRR from the shared
  CTs (or a phantom) with per-pixel body / vertebra / implant label maps, keypoints, truth heights and
  Genant grades; deterministic by seed.  `SynthConfig.data_dir=None` gives phantoms only (tests).
* `inference.synth.real.render_real_sample(seed, config, data_dir, split="train")`: implants rendered onto
  a REAL radiograph, same `SynthSample` format (weak labels: -1 ignore, -2 unnamed vertebra, 0 background).
* `inference.splits.split_of(name, scheme) -> "train" | "val" | "test"`: the held-out split of the real
  radiographs, shared with training and evaluation; the cache builder draws overlays on the "train" films of
  its `--split-scheme` only.
* `python -m inference.synth.build --data ../shared/data --out DIR --count N --seed S [--views AP,LAT]
  [--implants-prob p] [--real-prob q] [--workers k]`: .npz shards + manifest.json;
  `inference.synth.build.iter_cache(DIR)` / `read_shard(path)` read them back.
* `inference.synth.dicom`: DX / CR / CT writers; `write_sample(sample, path, seed=..., modality=...,
  photometric=..., bits_stored=...)` writes a sample as a DICOM radiograph.
* `python -m inference.synth.preview --data ../shared/data --out sheet.png [--labels]`: contact sheet.

Modules: `anatomy` (CT loading, body masks, stitching, vertebra geometry and 3D heights), `drr`
(cone-beam projector, label projection), `warp` (articulated curvature, compression deformities),
`phantom` (procedural spines), `implants` (screws, rods, cages, plates, failure modes, exact projection),
`augment` (image formation and looks), `real`, `build`, `preview`, `sample` (the dataclasses).
"""
