"""The annotated Secondary Capture, checked pixel by pixel where the renderer says it drew things."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from inference.results import ScreeningOutcome
from reports import OutputKind, build_outputs, examples, sc, style
from reports.common import DISCLAIMER


def _near(pixels: np.ndarray, colour: style.RGB, tolerance: int = 40) -> np.ndarray:
    return (np.abs(pixels.astype(int) - np.asarray(colour)) <= tolerance).all(axis=-1)


def _crop(pixels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return pixels[max(0, y0):y1, max(0, x0):x1]


@pytest.fixture(scope="module")
def dx_rendering(cases):
    case = cases["lateral-dx"]
    return case, sc.render(case.result, case.result.images[0], case.sources)


def test_sc_pixels_are_the_rendering(cases, outputs, dx_rendering):
    _, rendering = dx_rendering
    ds = next(o.dataset for o in outputs["lateral-dx"] if o.kind is OutputKind.SC)
    assert np.array_equal(ds.pixel_array, rendering.pixels)


def test_level_labels_sit_beside_their_vertebra_in_its_colour(dx_rendering):
    case, rendering = dx_rendering
    pixels = rendering.pixels
    for vertebra in case.result.images[0].vertebrae:
        text = style.short_level(vertebra, 0)
        box = rendering.find(text).box
        colour = style.ALERT_COLOUR if style.is_fractured(vertebra) else style.vertebra_colour(vertebra)
        glyphs = _near(_crop(pixels, box), colour)
        assert glyphs.sum() >= 15, f"{text}: {glyphs.sum()} pixels of {colour} in {box}"
        # Right of the outline, at the height of the vertebra's centroid.
        right = max(rendering.to_canvas(x, y)[0] for x, y in vertebra.outline)
        _, cy = rendering.to_canvas(*vertebra.centroid)
        assert box[0] > right
        assert box[1] - 2 <= cy <= box[3] + 2 or vertebra.fracture is not None


def test_fractured_vertebra_gets_a_red_grade_line(dx_rendering):
    case, rendering = dx_rendering
    l1 = case.result.images[0].vertebrae[0]
    detail = rendering.find(style.fracture_text(l1))
    assert detail.text == "Genant 2 wedge, 38 % loss"
    assert _near(_crop(rendering.pixels, detail.box), style.ALERT_COLOUR).sum() >= 30
    # Its outline is drawn red too: sample the middle of the outline's bottom edge.
    (x0, y1), (x1, _) = l1.outline[3], l1.outline[2]
    cx, cy = rendering.to_canvas((x0 + x1) / 2, y1)
    patch = rendering.pixels[round(cy) - 3:round(cy) + 4, round(cx) - 3:round(cx) + 4]
    assert _near(patch, style.ALERT_COLOUR).any()


def test_banner_and_verdict(dx_rendering):
    case, rendering = dx_rendering
    pixels = rendering.pixels
    assert tuple(pixels[2, 2]) == sc.BANNER_BACKGROUND
    banner = rendering.find(DISCLAIMER)
    assert banner.box[3] <= rendering.banner_height
    assert (_crop(pixels, banner.box).max(axis=-1) < 80).sum() > 200, "dark disclaimer text on the yellow banner"
    assert any(m.name in t.text for t in rendering.texts for m in case.result.models)
    verdict = rendering.find("FINDING PRESENT" if any(t.text == "FINDING PRESENT" for t in rendering.texts) else "FINDING")
    assert verdict.box[0] >= rendering.panel_box[0]
    around = _crop(pixels, (verdict.box[0] - 4, verdict.box[1], verdict.box[2] + 4, verdict.box[3]))
    assert _near(around, style.OUTCOME_COLOURS[ScreeningOutcome.FINDING_PRESENT]).mean() > 0.3


def _bone_and_soft_tissue(case, rendering):
    image = case.result.images[0]
    l3 = next(v for v in image.vertebrae if v.level in ("L3",))
    xs = [p[0] for p in l3.outline]
    ys = [p[1] for p in l3.outline]
    # Between two height lines / screws: a quarter in from the left edge, at mid height.
    bx = min(xs) + 0.3 * (max(xs) - min(xs))
    by = (min(ys) + max(ys)) / 2
    bone = rendering.pixels[tuple(round(v) for v in rendering.to_canvas(bx, by))[::-1]]
    soft = rendering.pixels[tuple(round(v) for v in rendering.to_canvas(8, by))[::-1]]
    return bone.astype(int), soft.astype(int)


@pytest.mark.parametrize("name", ["lateral-dx", "ap-cr"])
def test_source_is_windowed_with_bone_white(cases, name):
    """DX MONOCHROME2 and CR MONOCHROME1 both show bone bright, soft tissue dark."""
    case = cases[name]
    rendering = sc.render(case.result, case.result.images[0], case.sources)
    bone, soft = _bone_and_soft_tissue(case, rendering)
    assert (bone == bone[0]).all() and (soft == soft[0]).all(), "grey, not tinted"
    assert bone[0] > soft[0] + 60, (name, bone, soft)


def test_display_pixels_follows_the_source_voi():
    pixels = np.arange(0, 4000, 4, dtype=np.uint16).reshape(25, 40)
    from inference.synth.dicom import radiograph_dataset

    ds = radiograph_dataset(pixels, seed="voi")
    ds.WindowCenter, ds.WindowWidth = 2000, 1000
    out = sc.display_pixels(ds)
    assert out[pixels <= 1500].max() == 0.0 and out[pixels >= 2500].min() == 1.0
    several = copy.deepcopy(ds)
    several.WindowCenter, several.WindowWidth = [2000, 500], [1000, 200]  # the first window is the default
    assert np.allclose(sc.display_pixels(several), out)
    inverted = copy.deepcopy(ds)
    inverted.PhotometricInterpretation = "MONOCHROME1"
    assert np.allclose(sc.display_pixels(inverted), 1.0 - out)
    # A VOI LUT Sequence wins over the window (here an inverting 12-bit LUT).
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.LUTData = [4095 - v for v in range(4096)]
    with_lut = copy.deepcopy(ds)
    with_lut.VOILUTSequence = [lut]
    assert np.allclose(sc.display_pixels(with_lut), (4095 - pixels) / 4095.0)
    # No window at all: the 0.5-99.5 percentile range.
    bare = copy.deepcopy(ds)
    del bare.WindowCenter, bare.WindowWidth
    assert sc.display_pixels(bare).min() == 0.0 and sc.display_pixels(bare).max() == 1.0


def _text_height(rendering, text) -> int:
    x0, y0, x1, y1 = rendering.find(text).box
    return y1 - y0


@pytest.mark.slow
def test_legible_at_thumbnail_and_full_screen_sizes():
    """A 3000 px radiograph: banner and verdict readable in a 256 px thumbnail, labels at full screen."""
    case = examples.lateral_dx(scale=5.0, seed="legibility")
    rendering = sc.render(case.result, case.result.images[0], case.sources)
    height, width = rendering.pixels.shape[:2]
    assert max(height, width) <= 2 * sc.MAX_IMAGE_SIDE
    thumbnail = 256 / max(height, width)
    full_screen = min(1000 / height, 1800 / width)  # a 1920x1080 monitor minus the viewer's chrome
    assert _text_height(rendering, DISCLAIMER) * thumbnail >= 7
    assert _text_height(rendering, "FINDING") * thumbnail >= 7
    assert _text_height(rendering, "L3") * full_screen >= 12
    assert _text_height(rendering, "Genant 2 wedge, 38 % loss") * full_screen >= 9
    # The thumbnail still shows the red verdict box and the yellow banner.
    small = np.asarray(Image.fromarray(rendering.pixels).resize(
        (round(width * thumbnail), round(height * thumbnail)), Image.Resampling.LANCZOS))
    assert _near(small, style.ALERT_COLOUR).sum() > 100
    assert _near(small, sc.BANNER_BACKGROUND).sum() > 1000


def test_ct_capture_is_a_sagittal_reformat(cases, outputs):
    case = cases["ct"]
    ds = next(o.dataset for o in outputs["ct"] if o.kind is OutputKind.SC)
    assert list(ds.PatientOrientation) == ["P", "F"]
    assert len(ds.SourceImageSequence) == len(case.sources)
    rendering = sc.render(case.result, case.result.images[0], case.sources)
    l3, l4 = rendering.find("L3"), rendering.find("L4")
    assert l3.box[1] < l4.box[1], "head at the top: L3 above L4"


def test_no_finding_is_green(cases):
    case = cases["ct"]
    rendering = sc.render(case.result, case.result.images[0], case.sources)
    verdict = rendering.find("NO FINDING")
    around = _crop(rendering.pixels, (verdict.box[0] - 4, verdict.box[1], verdict.box[2] + 4, verdict.box[3]))
    assert _near(around, style.OUTCOME_COLOURS[ScreeningOutcome.NO_FINDING]).mean() > 0.3


def test_outputs_of_one_kind_only(cases):
    case = cases["ap-cr"]
    outs = build_outputs(case.result, case.sources, kinds=[OutputKind.SC])
    assert [o.kind for o in outs] == [OutputKind.SC]


def test_height_loss_measurement_is_not_drawn_twice(dx_rendering):
    """The grade line beside L1 carries the loss; the measurement is listed in the legend only."""
    _, rendering = dx_rendering
    on_image = [t for t in rendering.texts if t.box[0] < rendering.panel_box[0] and "height loss" in t.text]
    assert on_image == []
    assert any("vertebral height loss L1: 38.0 %" in t.text for t in rendering.texts)


def test_labels_of_implants_at_the_image_edge_stay_on_the_image(cases):
    # Levels unknown (naming off) put a complication's label left of everything at its height; an implant
    # near the left edge ran its text off the canvas.
    import dataclasses

    case = cases["ap-cr"]
    image = case.result.images[0]
    loose = next(i for i in image.implants if i.complications)
    dx = min(x for x, _ in loose.outline) - 3.0
    moved = dataclasses.replace(loose, levels=(), outline=tuple((x - dx, y) for x, y in loose.outline),
                                centroid=(loose.centroid[0] - dx, loose.centroid[1]))
    unnamed = dataclasses.replace(image, implants=tuple(moved if i is loose else i for i in image.implants),
                                  vertebrae=tuple(dataclasses.replace(v, level=None) for v in image.vertebrae))
    rendering = sc.render(case.result, unnamed, case.sources)
    label = rendering.find("screw loosening?")
    image_right = rendering.panel_box[0]
    assert 0 <= label.box[0] and label.box[2] <= image_right, label.box
    assert _near(_crop(rendering.pixels, label.box), style.ALERT_COLOUR).sum() >= 30
    for text in rendering.texts:  # nothing else leaves the canvas either
        assert text.box[0] >= 0 and text.box[2] <= rendering.pixels.shape[1], text


def test_text_without_spaces_is_broken_to_the_panel_width():
    # A UID in a reason has no space to break at; it ran off the right edge of the capture.
    from PIL import ImageFont

    font = ImageFont.load_default(size=20)
    text = "image 2.25.93665776931120283016100813198010555244: fractures not assessed"
    lines = sc._wrap(text, font, 200)
    assert all(font.getlength(line) <= 200 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def _panel_text(rendering: sc.Rendering) -> str:
    """Every text drawn in the results panel, joined as read (wrapped lines re-joined with spaces)."""
    return " ".join(t.text for t in rendering.texts if t.box[0] >= rendering.panel_box[0])


def test_the_key_shows_the_finding_colour_only_when_something_is_drawn_in_it(cases):
    import dataclasses

    from inference.results import HardwareStatus, ScreeningVerdict

    case = cases["ap-cr"]
    image = case.result.images[0]
    flagged = sc.render(case.result, image, case.sources)
    assert "finding / possible complication" in _panel_text(flagged)
    intact = dataclasses.replace(image, findings=(),
                                 implants=tuple(dataclasses.replace(i, complications=()) for i in image.implants))
    result = dataclasses.replace(case.result, images=(intact,), verdict=ScreeningVerdict(
        outcome=ScreeningOutcome.NOT_ASSESSABLE, reasons=("fractures not assessed",), hardware=HardwareStatus.INTACT))
    rendering = sc.render(result, intact, case.sources)
    text = _panel_text(rendering)
    assert "finding / possible complication" not in text
    assert "pedicle screws (4)" in text  # the rest of the key is still there


def test_vertebrae_of_unknown_level_are_counted_not_listed(cases):
    import dataclasses

    case = cases["ap-cr"]
    image = case.result.images[0]
    named = _panel_text(sc.render(case.result, image, case.sources))
    assert "Vertebrae: L2, L3, L4, L5" in named
    unnamed = dataclasses.replace(image, vertebrae=tuple(dataclasses.replace(v, level=None) for v in image.vertebrae))
    text = _panel_text(sc.render(case.result, unnamed, case.sources))
    assert "Vertebrae: 4 found, level unknown: ?1-?4 from the top" in text
    assert "(level unknown)" not in text
    # The key shows the grey they are drawn in, not a level colour.
    assert "vertebra outline (no level named)" in text and "colour by level" not in text
    assert "vertebra outline (colour by level)" in named
    one_unknown = dataclasses.replace(image, vertebrae=(*image.vertebrae[:3], dataclasses.replace(image.vertebrae[3], level=None)))
    text = _panel_text(sc.render(case.result, one_unknown, case.sources))
    assert "Vertebrae: L2, L3, L4; 1 more, level unknown: ?1 from the top" in text


def test_a_not_assessed_note_the_verdict_already_gives_is_not_repeated(cases):
    import dataclasses

    from inference.results import Complication

    case = cases["ap-cr"]
    image = dataclasses.replace(case.result.images[0], notes=(
        Complication.SCREW_LOOSENING.not_assessed_note, Complication.ROD_FRACTURE.not_assessed_note, "an unrelated note"))
    verdict = dataclasses.replace(case.result.verdict, reasons=(
        *case.result.verdict.reasons, "hardware: screw loosening not assessed by this model version"))
    result = dataclasses.replace(case.result, images=(image,), verdict=verdict)
    text = _panel_text(sc.render(result, image, case.sources))
    assert "Note: screw loosening not assessed" not in text
    assert "Note: rod fracture not assessed" in text
    assert "Note: an unrelated note" in text


def test_level_labels_of_detections_a_few_pixels_apart_do_not_overlap(cases):
    """Two detections whose centres lie a few pixels apart (a fragment beside a body) printed "?7" over "?8"."""
    import dataclasses

    case = cases["lateral-dx"]
    image = case.result.images[0]
    first = image.vertebrae[0]
    twin = dataclasses.replace(first, level=None, centroid=(first.centroid[0], first.centroid[1] + 4.0),
                               outline=tuple((x, y + 4.0) for x, y in first.outline))
    crowded = dataclasses.replace(image, vertebrae=(*image.vertebrae, twin))
    rendering = sc.render(case.result, crowded, case.sources)
    on_image = [t for t in rendering.texts if t.box[2] <= rendering.panel_box[0] and t.box[1] >= rendering.banner_height]
    assert len(on_image) >= len(crowded.vertebrae)
    for k, a in enumerate(on_image):
        for b in on_image[k + 1:]:
            apart = a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
            assert apart, (a, b)


def test_crowded_level_labels_stay_on_the_image_and_near_their_vertebrae(cases):
    """Clashing labels used to be pushed downwards one after another: on a real film "?19" ended beside the
    twentieth vertebra and "?20" off the bottom of the image."""
    import dataclasses

    case = cases["lateral-dx"]
    image = case.result.images[0]
    rows = image.source.rows
    last = max(image.vertebrae, key=lambda v: v.centroid[1])
    shift = rows - 2.0 - last.centroid[1]  # the lowest vertebra at the bottom edge, two more crowded on it
    crowd = [dataclasses.replace(last, level=None, centroid=(last.centroid[0], last.centroid[1] + shift - d),
                                 outline=tuple((x, y + shift - d) for x, y in last.outline)) for d in (0.0, 3.0, 6.0)]
    crowded = dataclasses.replace(image, vertebrae=(*image.vertebrae, *crowd))
    rendering = sc.render(case.result, crowded, case.sources)
    bottom = rendering.banner_height + round(rows * rendering.scale)
    on_image = [t for t in rendering.texts if t.box[2] <= rendering.panel_box[0] and t.box[1] >= rendering.banner_height]
    assert len(on_image) >= len(crowded.vertebrae)
    assert all(t.box[3] <= bottom + 1 for t in on_image)
    for k, a in enumerate(on_image):
        for b in on_image[k + 1:]:
            assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1], (a, b)


def test_the_key_names_only_what_is_drawn_when_a_sacrum_is_all_there_is(cases):
    import dataclasses

    case = cases["ap-cr"]
    image = case.result.images[0]
    sacrum = dataclasses.replace(image.vertebrae[-1], level="S1")
    alone = dataclasses.replace(image, vertebrae=(sacrum,))
    text = _panel_text(sc.render(case.result, alone, case.sources))
    assert "sacrum outline" in text and "vertebra outline" not in text
