"""What a radiologist sees: the node's outputs opened in OHIF 3.13.2 reading from Orthanc over DICOMweb.

One lateral lumbar DX and its SEG, SR, SC and presentation state go into a real Orthanc (DICOMweb
plugin); a headless Chromium opens the study in OHIF and the test checks pixels and text on screen:

* the SEG overlay is drawn on the DX, where the vertebrae are (OHIF 3.13 hangs on "Loading SEG..."
  for a radiograph SEG without plane geometry; `reports.seg` encodes one that displays);
* the SR's vertebra outlines and height measurements are drawn with their labels;
* the Secondary Capture shows, banner included.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from peers import wait_for
from PIL import Image

from inference.results import ImplantKind
from reports import OutputKind, OutputOptions, build_outputs, examples, style

pytestmark = pytest.mark.viewer

VIEWPORT = {"width": 1400, "height": 900}


@pytest.fixture(scope="module")
def study(viewer_orthanc, tmp_path_factory):
    """The lateral DX case stored in Orthanc with all four outputs."""
    case = examples.lateral_dx(scale=1.5)
    outputs = build_outputs(case.result, case.sources)
    folder: Path = tmp_path_factory.mktemp("study")
    files = []
    for i, ds in enumerate([*case.sources, *(o.dataset for o in outputs)]):
        path = folder / f"{i:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    answers = [viewer_orthanc.upload(path) for path in files]
    assert all(a["Status"] in ("Success", "AlreadyStored") for a in answers), answers
    assert len({a["ParentStudy"] for a in answers}) == 1, "Orthanc filed every output into the source's study"
    assert len({a["ParentPatient"] for a in answers}) == 1
    return case, {o.kind: o.dataset for o in outputs}


def _open(browser, ohif, study_uid):
    context = browser.new_context(viewport=VIEWPORT)
    # OHIF's onboarding tour would cover the viewer: mark it as already shown.
    context.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
    page = context.new_page()
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text[:300]}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    page.goto(f"{ohif}/viewer?StudyInstanceUIDs={study_uid}", wait_until="load")
    page.wait_for_selector('[data-cy^="study-browser-thumbnail"]', timeout=60_000)
    return context, page, messages


def _series_item(page, description: str):
    return page.locator('[data-cy^="study-browser-thumbnail"]').filter(has_text=description).first


def _viewport_pixels(page) -> tuple[np.ndarray, dict]:
    canvas = page.locator('[data-cy="viewport-pane"] canvas').first
    box = canvas.bounding_box()
    png = page.screenshot(clip=box)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int), box


def _image_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of the displayed image: everything not black around it."""
    lit = pixels.max(axis=2) > 8
    rows, cols = np.nonzero(lit)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _hue_mask(pixels: np.ndarray, rgb: style.RGB) -> np.ndarray:
    """Pixels tinted towards `rgb` (the overlay is blended with the grey image beneath)."""
    r, g, b = (pixels[..., i] for i in range(3))
    grey = (r + g + b) / 3
    target = np.asarray(rgb, dtype=float) - np.mean(rgb)
    tint = np.stack([r - grey, g - grey, b - grey], axis=-1)
    strength = np.linalg.norm(tint, axis=-1)
    cosine = (tint @ target) / (np.maximum(strength, 1e-6) * np.linalg.norm(target))
    return (strength > 18) & (cosine > 0.9)


def _on_screen(box: tuple[int, int, int, int], rows: int, cols: int, x: float, y: float) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    return x0 + x * (x1 - x0) / cols, y0 + y * (y1 - y0) / rows


def test_seg_overlay_is_drawn_on_the_radiograph(browser, ohif, study):
    case, outputs = study
    image = case.result.images[0]
    context, page, messages = _open(browser, ohif, case.result.study_instance_uid)
    try:
        # The DX alone first: where is the image on screen?
        wait_for(lambda: _viewport_pixels(page)[0].max() > 60, timeout=60, what="the DX to render")
        grey, _ = _viewport_pixels(page)
        box = _image_box(grey)
        _series_item(page, "AI Spine SEG").dblclick()
        yes = page.get_by_role("button", name="Yes", exact=True)
        l3 = next(v for v in image.vertebrae if v.level == "L3")
        colour = style.vertebra_colour(l3)

        def tinted():
            if yes.count():
                yes.first.click()
            if "Loading SEG" in page.inner_text("body"):
                return None
            pixels, _ = _viewport_pixels(page)
            mask = _hue_mask(pixels, colour)
            if mask.sum() <= 400:
                return None
            # Loading the SEG may re-fit the image in the viewport, and a frame caught mid-way shows the
            # overlay where the image no longer is (seen intermittently): wait for two equal frames.
            frame = (int(mask.sum()), _image_box(pixels))
            settled = last.get("frame") == frame
            last["frame"] = frame
            return (mask, pixels) if settled else None

        last: dict[str, tuple] = {}
        mask, pixels = wait_for(tinted, timeout=60, interval=0.5, what=f"the L3 segment ({colour}) overlay")
        box = _image_box(pixels)  # where the DX is on screen now
        # The tinted region lies where L3 is on the DX (the SEG is aligned with the source pixels).
        rows, cols = image.source.rows, image.source.columns
        xs = [p[0] for p in l3.outline]
        ys = [p[1] for p in l3.outline]
        sx0, sy0 = _on_screen(box, rows, cols, min(xs), min(ys))
        sx1, sy1 = _on_screen(box, rows, cols, max(xs), max(ys))
        ty, tx = np.nonzero(mask)
        inside = (tx >= sx0 - 3) & (tx <= sx1 + 3) & (ty >= sy0 - 3) & (ty <= sy1 + 3)
        assert inside.mean() > 0.6, (f"L3 tint centred at ({tx.mean():.0f}, {ty.mean():.0f}), expected in "
                                     f"({sx0:.0f}, {sy0:.0f})-({sx1:.0f}, {sy1:.0f})")
        cx, cy = _on_screen(box, rows, cols, *l3.centroid)
        assert abs(tx.mean() - cx) < 0.15 * (sx1 - sx0) and abs(ty.mean() - cy) < 0.2 * (sy1 - sy0)
        # Implant segments too (screws are amber).
        pixels, _ = _viewport_pixels(page)
        assert _hue_mask(pixels, style.IMPLANT_COLOURS[ImplantKind.PEDICLE_SCREW]).sum() > 50
        assert "Loading SEG" not in page.inner_text("body")
        # The segmentation panel lists the segments by their labels.
        panel = page.locator('[data-cy="panelSegmentation-btn"]')
        if panel.count():
            panel.first.click()
        wait_for(lambda: all(label in page.inner_text("body") for label in ("L3", "Sacrum", "Pedicle screws")),
                   timeout=30, what="segment labels in the segmentation panel")
    except Exception:
        print("\n".join(messages[-40:]))
        raise
    finally:
        context.close()


def _open_report(browser, ohif, study_uid: str, expected: str, rounds: int = 3):  # noqa: ANN001, ANN202
    """The viewer with the SR opened and `expected` drawn.

    OHIF asks "Do you want to continue tracking measurements for this study?" over an SR it opens and, in
    most runs here, draws the SR's measurements only once that is answered (it sometimes drew them with the
    question open, which is why a run that did not answer passed about half the time).  A reader who only
    wants to see the report answers "No" (preview, nothing tracked), and so does this helper.  In about one
    run in four OHIF then drew nothing, and opening the SR again did not help; showing the DX in the
    viewport and then the SR again did (every time in 4 such runs), so the helper does that, as a reader
    would."""
    context, page, messages = _open(browser, ohif, study_uid)
    grid = page.locator('[data-cy="viewport-grid"]')
    no = page.get_by_role("button", name="No", exact=True)

    def drawn() -> bool:
        if no.count():
            no.first.click()
        return expected in grid.inner_text()

    try:
        for attempt in range(rounds):
            _series_item(page, "AI Spine Report").dblclick()
            try:
                wait_for(drawn, timeout=20, interval=0.5, what=f"'{expected}' drawn by the SR viewport")
                return context, page, messages
            except TimeoutError:
                if attempt + 1 == rounds:
                    raise
            _series_item(page, "LSPINE LL").dblclick()
            wait_for(lambda: "SR" not in grid.inner_text().split(), timeout=20, what="the DX in the viewport")
    except Exception:
        print("\n".join(messages[-40:]))
        context.close()
        raise
    raise AssertionError("unreachable")


def test_sr_measurements_are_drawn_with_their_values(browser, ohif, study):
    case, _ = study
    image = case.result.images[0]
    l1 = next(v for v in image.vertebrae if v.level == "L1")
    expected = f"Anterior vertebral body height: {l1.heights.anterior.value_mm:.2f} mm"
    context, page, messages = _open_report(browser, ohif, case.result.study_instance_uid, expected)
    try:
        grid = page.locator('[data-cy="viewport-grid"]')
        text = grid.inner_text()
        assert "L1 vertebra" in text and "Sacrum" in text
        # Outlines are drawn as SVG annotations over the DX, one per measurement group with a region.
        drawn = wait_for(lambda: page.locator('[data-cy="viewport-pane"] svg path, '
                                                '[data-cy="viewport-pane"] svg polyline').count(),
                           timeout=30, what="SR outlines")
        assert drawn >= len(image.vertebrae)
    except Exception:
        print("\n".join(messages[-40:]))
        raise
    finally:
        context.close()


def test_secondary_capture_displays(browser, ohif, study):
    case, _ = study
    context, page, messages = _open(browser, ohif, case.result.study_instance_uid)
    try:
        _series_item(page, "AI Spine Annotated").dblclick()

        def shown():
            pixels, _ = _viewport_pixels(page)
            yellow = (pixels[..., 0] > 200) & (pixels[..., 1] > 170) & (pixels[..., 2] < 80)
            red = _hue_mask(pixels, style.ALERT_COLOUR)  # the FINDING PRESENT box, the fractured L1 outline
            return (int(yellow.sum()), int(red.sum())) if yellow.sum() > 2000 and red.sum() > 200 else None

        wait_for(shown, timeout=60, interval=0.5, what="the SC's yellow banner and red verdict box")
    except Exception:
        print("\n".join(messages[-40:]))
        raise
    finally:
        context.close()


@pytest.fixture(scope="module")
def ct_study(viewer_orthanc, tmp_path_factory):
    """A CT series with a LABELMAP SEG (the option some destinations ask for)."""
    case = examples.ct(slices=40, size=128, seed="viewer-ct")
    (seg,) = build_outputs(case.result, case.sources, kinds=[OutputKind.SEG],
                           options=OutputOptions(seg_format="labelmap"))
    folder: Path = tmp_path_factory.mktemp("ct")
    for i, ds in enumerate([*case.sources, seg.dataset]):
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        answer = viewer_orthanc.upload(path)
        assert answer["Status"] in ("Success", "AlreadyStored"), answer
    return case


def test_labelmap_seg_on_a_ct_series_in_segment_colours(browser, ohif, ct_study):
    case = ct_study
    context, page, messages = _open(browser, ohif, case.result.study_instance_uid)
    try:
        wait_for(lambda: _viewport_pixels(page)[0].max() > 60, timeout=60, what="the CT to render")
        _series_item(page, "AI Spine SEG").dblclick()
        yes = page.get_by_role("button", name="Yes", exact=True)
        colours = {v.level: style.vertebra_colour(v) for v in case.result.images[0].vertebrae}

        def tinted():
            if yes.count():
                yes.first.click()
            pixels, _ = _viewport_pixels(page)
            found = {level for level, colour in colours.items() if _hue_mask(pixels, colour).sum() > 400}
            return found or None

        found = wait_for(tinted, timeout=60, interval=0.5, what="a vertebra segment in its own colour")
        # OHIF opens the SEG on its first segment's slice: L3 must show in L3's colour, not a neighbour's.
        assert "L3" in found, found
        body = page.inner_text("body")
        assert "Loading SEG" not in body and "Background" not in body
    except Exception:
        print("\n".join(messages[-40:]))
        raise
    finally:
        context.close()
