"""Hardware post-processing on constructed probability maps: instances, levels, sides, words, verdict.

No network: the maps are drawn by hand on the network grid (1 mm per pixel) of a 0.5 mm radiograph, so each
rule (screws split at centre peaks, rods followed through screw heads, levels from the bodies, the patient's
left from the orientation, "no implants", "at the edge") is checked exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from inference.radiograph import preprocess
from inference.radiograph.hardware import (
    SourcePiece,
    absorb_screws_along_rods,
    interpret,
    region_to_canonical,
    vertebra_geometry,
)
from inference.radiograph.hardware_post import (
    CAGE,
    CHANNELS,
    LOOSENING,
    METAL,
    PLATE,
    ROD,
    ROD_FRACTURE,
    SCREW,
    SCREW_CENTRE,
    HardwareParams,
    ImplantSummary,
    Piece,
    VertebraGeom,
    absorb_hugging_rods,
    compact_span,
    find_pieces,
    instrumentation_text,
    join_rods_end_to_end,
    level_near,
    rod_pieces,
    screws_along_rods,
    vertebrae_spanned,
)
from inference.results import (
    Complication,
    FindingKind,
    HardwareStatus,
    ImplantKind,
    RegionMask,
    Side,
    SourceImage,
    Vertebra,
)

ROWS, COLS = 440, 320  # source pixels, 0.5 mm
SPACING = (0.5, 0.5)
SCALE = (0.5, 0.5)  # network px per source px -> 1 mm per network px
BODIES = {"L3": 90, "L4": 160, "L5": 230}  # body centre rows (source)
MID = 160  # midline column (source)


def _rect(shape: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[max(r0, 0) : r1, max(c0, 0) : c1] = True
    return m


def _vertebrae() -> list[Vertebra]:
    out = []
    for level, row in BODIES.items():
        m = _rect((ROWS, COLS), row - 28, row + 28, MID - 40, MID + 40)
        out.append(Vertebra(level, RegionMask.from_dense(m), (), (MID + 0.5, row + 0.5)))
    sacrum = _rect((ROWS, COLS), 290, 380, MID - 60, MID + 60)
    out.append(Vertebra("S1", RegionMask.from_dense(sacrum), (), (MID + 0.5, 335.5)))
    return out


def _line(prob: np.ndarray, ch: int, p0: tuple[float, float], p1: tuple[float, float], half_width: float, value: float = 0.95) -> None:
    """Paint a thick segment between (x, y) network points into channel `ch`."""
    h, w = prob.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    d = np.array(p1) - np.array(p0)
    t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / float(d @ d), 0, 1)
    dist = np.hypot(xx - (p0[0] + t * d[0]), yy - (p0[1] + t * d[1]))
    prob[ch] = np.maximum(prob[ch], np.where(dist <= half_width, value, 0.0))


def _blob(prob: np.ndarray, ch: int, centre: tuple[float, float], sigma: float = 2.0) -> None:
    h, w = prob.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    prob[ch] = np.maximum(prob[ch], np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma**2)))


def construct(levels=("L3", "L4", "L5"), cage: bool = True, loose: tuple[str, int] | None = None, rod_gap: bool = False) -> np.ndarray:
    """Network-grid maps of a posterior construct: two screws per level, two rods, an L4-5 cage."""
    prob = np.zeros((len(CHANNELS), ROWS // 2, COLS // 2), dtype=np.float32)
    mid = MID / 2
    for level in levels:
        y = BODIES[level] / 2
        for side in (-1, 1):  # column direction: +1 = larger column
            head = (mid + side * 24, y)
            tip = (mid + side * 8, y + 1)
            _line(prob, SCREW, head, tip, 3.0)
            _blob(prob, SCREW_CENTRE, ((head[0] + tip[0]) / 2, (head[1] + tip[1]) / 2))
            if loose == (level, side):
                _line(prob, LOOSENING, head, tip, 5.0, 0.9)
    top = BODIES[levels[0]] / 2 - 8
    bottom = BODIES[levels[-1]] / 2 + 8
    for side in (-1, 1):
        x = mid + side * 25
        if rod_gap and side == 1:
            _line(prob, ROD, (x, top), (x, 68.0), 2.5)
            _line(prob, ROD, (x, 71.0), (x, bottom), 2.5)
            _blob(prob, ROD_FRACTURE, (x, 69.5), 2.0)
        else:
            _line(prob, ROD, (x, top), (x, bottom), 2.5)
    if cage:
        _line(prob, CAGE, (mid - 10, 97.5), (mid + 10, 97.5), 3.0)
    prob[METAL] = prob[[SCREW, ROD, CAGE]].max(axis=0)
    return prob


def radiograph(view: str = "AP", left_sign: int | None = 1) -> preprocess.Radiograph:
    return preprocess.Radiograph(
        pixels=np.zeros((ROWS, COLS), np.float32), pixel_spacing_mm=SPACING, spacing_source="PixelSpacing", view=view,
        anterior_sign=None, orientation=preprocess.Orientation(), stored_shape=(ROWS, COLS), left_sign=left_sign,
    )


SOURCE = SourceImage("1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.1.1", ("1.2.3.4.5",), ROWS, COLS, SPACING, view="AP", modality="DX")


def run(prob: np.ndarray, rad: preprocess.Radiograph | None = None, vertebrae: list[Vertebra] | None = None, source: SourceImage = SOURCE,
        params: HardwareParams | None = None):
    rad = rad or radiograph()
    geoms = vertebra_geometry(_vertebrae() if vertebrae is None else vertebrae, rad.orientation)
    return interpret(prob, SCALE, 1.0, rad, geoms, source, params or HardwareParams())


def test_posterior_construct_levels_sides_and_summary() -> None:
    out = run(construct())
    screws = [i for i in out.implants if i.kind is ImplantKind.PEDICLE_SCREW]
    rods = [i for i in out.implants if i.kind is ImplantKind.ROD]
    cages = [i for i in out.implants if i.kind is ImplantKind.INTERBODY_CAGE]
    assert len(screws) == 6 and len(rods) == 2 and len(cages) == 1
    # left_sign +1: the patient's left lies toward larger columns.
    for s in screws:
        assert s.side is (Side.LEFT if s.centroid[0] > MID else Side.RIGHT)
        assert s.mask.shape == (ROWS, COLS) and len(s.outline) >= 3
        # Axis runs head -> tip, the tip toward the midline.
        head, tip = s.axis
        assert abs(tip[0] - MID) < abs(head[0] - MID)
    assert sorted(s.levels[0] for s in screws) == ["L3", "L3", "L4", "L4", "L5", "L5"]
    for level, row in BODIES.items():
        assert all(abs(s.centroid[1] - row) < 10 for s in screws if s.levels == (level,))
    assert {r.side for r in rods} == {Side.LEFT, Side.RIGHT}
    assert all(r.levels == ("L3", "L4", "L5") and len(r.axis) >= 3 for r in rods)
    assert cages[0].levels == ("L4", "L5") and cages[0].side is Side.MIDLINE
    assert out.instrumentation == "posterior instrumentation L3–L5: 6 pedicle screws, 2 rods; interbody cage L4–5"
    assert out.status is HardwareStatus.INTACT and not out.findings


def test_viewer_left_is_patient_right_when_orientation_says_so() -> None:
    out = run(construct(cage=False), rad=radiograph(left_sign=-1))
    for s in (i for i in out.implants if i.kind is ImplantKind.PEDICLE_SCREW):
        assert s.side is (Side.RIGHT if s.centroid[0] > MID else Side.LEFT)


def test_without_orientation_or_on_a_lateral_sides_are_unknown() -> None:
    out = run(construct(cage=False), rad=radiograph(left_sign=None))
    assert {i.side for i in out.implants} == {Side.UNKNOWN}
    assert any("orientation" in n for n in out.notes)
    lat = dataclasses.replace(SOURCE, view="LAT")
    out = run(construct(cage=False), rad=radiograph(view="LAT", left_sign=None), source=lat)
    assert {i.side for i in out.implants} == {Side.UNKNOWN}
    assert out.instrumentation.startswith("posterior instrumentation L3–L5: pedicle screws at 3 levels, rods (lateral view")


def test_loosened_screw_is_a_finding_with_evidence() -> None:
    out = run(construct(loose=("L4", 1)))
    assert out.status is HardwareStatus.POSSIBLE_COMPLICATION
    assert len(out.findings) == 1
    f = out.findings[0]
    assert f.kind is FindingKind.SCREW_LOOSENING and f.levels == ("L4",)
    assert "left L4 pedicle screw" in f.description and f.sop_instance_uid == SOURCE.sop_instance_uids[0]
    loose = [i for i in out.implants if i.complications]
    assert len(loose) == 1 and loose[0].complications == (Complication.SCREW_LOOSENING,)
    xs = [p[0] for p in f.evidence]
    assert len(f.evidence) >= 3 and min(xs) <= loose[0].centroid[0] <= max(xs)


def test_a_complication_not_assessed_is_never_reported_and_says_so() -> None:
    out = run(construct(loose=("L4", 1)), params=HardwareParams(not_assessed=("screw loosening",)))
    assert not out.findings and out.status is HardwareStatus.INTACT
    assert "screw loosening not assessed" in out.notes and out.not_assessed == ("screw loosening",)
    with pytest.raises(ValueError, match="unknown complications"):
        HardwareParams.from_dict({"not_assessed": ["screw wobble"]})


def test_a_kind_not_named_is_reported_as_other_metal() -> None:
    plate = np.zeros_like(construct())
    _line(plate, PLATE, (MID / 2, 40.0), (MID / 2, 85.0), 6.0)
    plate[METAL] = plate[PLATE]
    named = run(plate)
    assert [i.kind for i in named.implants] == [ImplantKind.PLATE]
    assert named.instrumentation.startswith("anterior plate")
    out = run(plate, params=HardwareParams(not_named=("plate",)))
    assert [i.kind for i in out.implants] == [ImplantKind.OTHER]
    assert out.instrumentation == "1 other implant"
    assert out.status is HardwareStatus.NOT_ASSESSABLE and "not recognised as spinal hardware" in out.reasons[0]
    # Other kinds on the same image keep their names.
    both = construct(cage=False)
    _line(both, PLATE, (MID / 2, 40.0), (MID / 2, 85.0), 6.0)
    both[METAL] = np.maximum(both[METAL], both[PLATE])
    kinds = {i.kind for i in run(both, params=HardwareParams(not_named=("plate",))).implants}
    assert ImplantKind.PLATE not in kinds and {ImplantKind.PEDICLE_SCREW, ImplantKind.ROD} <= kinds
    with pytest.raises(ValueError, match="unknown implant kinds"):
        HardwareParams(not_named=("staple",))


def test_hardware_nobody_checked_is_not_assessable_rather_than_intact() -> None:
    # Screws and rods, every failure mode switched off: nothing was looked for, so no "intact".
    off = HardwareParams(not_assessed=tuple(c.value for c in Complication))
    out = run(construct(cage=False), params=off)
    assert out.status is HardwareStatus.NOT_ASSESSABLE and not out.findings
    assert out.instrumentation.startswith("posterior instrumentation L3–L5")
    (reason,) = out.reasons
    assert "no failure mode of the implants found is assessed" in reason
    assert "pedicle screws: screw loosening, screw breakage not assessed" in reason and "rods: rod fracture not assessed" in reason
    # A cage alone, subsidence not assessed: the same.
    cage_only = np.zeros_like(construct())
    _line(cage_only, CAGE, (MID / 2 - 10, 97.5), (MID / 2 + 10, 97.5), 3.0)
    cage_only[METAL] = cage_only[CAGE]
    out = run(cage_only, params=HardwareParams(not_assessed=("cage subsidence",)))
    assert [i.kind for i in out.implants] == [ImplantKind.INTERBODY_CAGE]
    assert out.status is HardwareStatus.NOT_ASSESSABLE
    assert out.reasons == ("hardware not assessable: no failure mode of the implants found is assessed by this model "
                           "version (interbody cages: cage subsidence not assessed)",)
    # One failure mode still looked for (rod fracture) is enough for "intact".
    rods_on = HardwareParams(not_assessed=("screw loosening", "screw breakage", "cage subsidence"))
    assert run(construct(), params=rods_on).status is HardwareStatus.INTACT


def test_fractured_rod_stays_one_rod_with_a_gap_finding() -> None:
    out = run(construct(cage=False, rod_gap=True))
    rods = [i for i in out.implants if i.kind is ImplantKind.ROD]
    assert len(rods) == 2
    broken = [r for r in rods if r.complications]
    assert len(broken) == 1 and broken[0].side is Side.LEFT
    f = next(f for f in out.findings if f.kind is FindingKind.ROD_FRACTURE)
    cy = np.mean([p[1] for p in f.evidence])
    assert abs(cy - 139) < 6  # the gap (network row ~69.5 -> source row ~139)


def test_no_metal_means_no_implants() -> None:
    out = run(np.zeros((len(CHANNELS), ROWS // 2, COLS // 2), np.float32))
    assert out.status is HardwareStatus.NO_IMPLANTS and not out.implants and not out.findings
    assert out.instrumentation == "" and any("no implants" in n for n in out.notes)
    # A few scattered bright pixels are noise, not hardware.
    prob = np.zeros((len(CHANNELS), ROWS // 2, COLS // 2), np.float32)
    prob[[METAL, SCREW], 10, 10] = 0.9
    prob[[METAL, ROD], 50, 100] = 0.9
    assert find_pieces(prob, 1.0, HardwareParams()) == []


def test_a_faint_screw_beside_a_confident_construct_is_not_reported() -> None:
    """Beside confident hardware, a screw piece whose mean probability stays below `screw_min_score` (most of
    them were false on the validation films) is dropped; a rod as faint is not held to it; on a film where
    everything is faint the screw stays (left to `min_score`: dropping it would answer "no implants")."""
    prob = construct(cage=False)
    mid = MID / 2
    _line(prob, SCREW, (mid + 24, 145.0), (mid + 8, 146.0), 3.0, value=0.8)  # below the construct
    _blob(prob, SCREW_CENTRE, (mid + 16, 145.5))
    _line(prob, ROD, (mid - 60, 20.0), (mid - 60, 70.0), 2.5, value=0.8)  # beside it
    prob[METAL] = prob[[SCREW, ROD, CAGE]].max(axis=0)

    def kinds(params: HardwareParams) -> list[ImplantKind]:
        return [p.kind for p in find_pieces(prob, 1.0, params)]

    found = kinds(HardwareParams())
    assert found.count(ImplantKind.PEDICLE_SCREW) == 6
    assert found.count(ImplantKind.ROD) == 3
    assert kinds(HardwareParams(screw_min_score=0.0)).count(ImplantKind.PEDICLE_SCREW) == 7

    prob = np.zeros_like(prob)
    _line(prob, SCREW, (mid + 24, 145.0), (mid + 8, 146.0), 3.0, value=0.8)
    _blob(prob, SCREW_CENTRE, (mid + 16, 145.5))
    prob[METAL] = prob[SCREW]
    assert kinds(HardwareParams()) == [ImplantKind.PEDICLE_SCREW]


def test_implants_cut_by_the_border_are_not_assessable() -> None:
    prob = construct(cage=False)
    _line(prob, ROD, (MID / 2 - 25, 0.0), (MID / 2 - 25, 60.0), 2.5)  # right rod runs off the top edge
    out = run(prob)
    assert out.status is HardwareStatus.NOT_ASSESSABLE
    assert any("image edge" in r and "rod" in r for r in out.reasons)


def test_unnamed_vertebrae_leave_levels_unknown() -> None:
    unnamed = [dataclasses.replace(v, level=None) for v in _vertebrae()]
    out = run(construct(), vertebrae=unnamed)
    assert all(i.levels == () for i in out.implants)
    # The chain still says how long the construct is.
    assert out.vertebrae_spanned == 3
    assert out.instrumentation == (
        "posterior instrumentation across 3 vertebrae (levels not named): 6 pedicle screws, 2 rods; interbody cage (levels not named)"
    )
    assert any("levels not named" in n for n in out.notes)


def test_turned_image_masks_come_back_on_the_stored_grid() -> None:
    # Stored grid transposed relative to canonical (PatientOrientation "F\L" style).
    orient = preprocess.Orientation(transpose=True)
    rad = dataclasses.replace(radiograph(), orientation=orient, stored_shape=(COLS, ROWS))
    stored_vertebrae = []
    for v in _vertebrae():
        dense = orient.from_canonical(v.mask.dense())
        cx, cy = v.centroid
        stored_vertebrae.append(Vertebra(v.level, RegionMask.from_dense(dense), (), (cy, cx)))
    source = dataclasses.replace(SOURCE, rows=COLS, columns=ROWS)
    out = run(construct(), rad=rad, vertebrae=stored_vertebrae, source=source)
    ref = run(construct())
    assert len(out.implants) == len(ref.implants)
    for a, b in zip(out.implants, ref.implants, strict=True):
        assert a.mask.shape == (COLS, ROWS)
        assert np.array_equal(a.mask.dense(), b.mask.dense().T)
        assert a.centroid == pytest.approx((b.centroid[1], b.centroid[0]))
        assert a.levels == b.levels
    offset, crop = region_to_canonical(stored_vertebrae[0].mask, orient)
    assert np.array_equal(crop, _vertebrae()[0].mask.array) and offset == _vertebrae()[0].mask.offset


@pytest.mark.parametrize(
    ("upper", "lower", "text"),
    [("L4", "L5", "L4–5"), ("L5", "S1", "L5–S1"), ("T12", "L1", "T12–L1"), ("C5", "C6", "C5–6")],
)
def test_disc_levels_are_spelled_as_surgeons_do(upper: str, lower: str, text: str) -> None:
    assert compact_span(upper, lower) == text


def test_summary_sentence_of_the_issue() -> None:
    implants = [ImplantSummary(ImplantKind.PEDICLE_SCREW, (lv,)) for lv in ("L3", "L4", "L5", "S1") for _ in range(2)]
    implants += [ImplantSummary(ImplantKind.ROD, ("L3", "L4", "L5", "S1"))] * 2
    implants += [ImplantSummary(ImplantKind.INTERBODY_CAGE, ("L4", "L5")), ImplantSummary(ImplantKind.INTERBODY_CAGE, ("L5", "S1"))]
    assert instrumentation_text(implants, "AP") == "posterior instrumentation L3–S1: 8 pedicle screws, 2 rods; interbody cages L4–5, L5–S1"
    plate = [ImplantSummary(ImplantKind.PLATE, ("C5", "C6", "C7"))]
    assert instrumentation_text(plate, "AP") == "anterior plate C5–7"
    unnamed = [ImplantSummary(ImplantKind.PLATE, ())] * 3
    assert instrumentation_text(plate + unnamed, "AP") == "anterior plate C5–7; 3 anterior plates (levels not named)"
    assert instrumentation_text(unnamed[:1], "AP") == "anterior plate (levels not named)"
    assert instrumentation_text([], "AP") == ""


def test_unnamed_construct_still_says_how_many_vertebrae_it_spans() -> None:
    # Screws on chain ranks 2, 3 and 5 (a skipped level inside the construct still counts), no level names.
    implants = [ImplantSummary(ImplantKind.PEDICLE_SCREW, (), rank) for rank in (2, 2, 3, 3, 5, 5)]
    implants += [ImplantSummary(ImplantKind.ROD, ())] * 2
    assert vertebrae_spanned(implants) == 4
    assert instrumentation_text(implants, "AP") == "posterior instrumentation across 4 vertebrae (levels not named): 6 pedicle screws, 2 rods"
    # One vertebra, or screws not assigned to any: no span claimed.
    single = [ImplantSummary(ImplantKind.PEDICLE_SCREW, (), 3)] * 2 + [ImplantSummary(ImplantKind.PEDICLE_SCREW, ())]
    assert vertebrae_spanned(single) is None
    assert instrumentation_text(single, "AP") == "posterior instrumentation (levels not named): 3 pedicle screws"


def test_rods_found_in_pieces_are_reported_as_pieces_not_as_rods() -> None:
    """Two long rods the network found in 8 pieces (as on the real postoperative film) are not "8 rods"."""
    screws = [ImplantSummary(ImplantKind.PEDICLE_SCREW, (), rank, column) for rank in range(3) for column in (-1, 1)]
    pieces = [ImplantSummary(ImplantKind.ROD, (), None, column) for column in (-1, -1, -1, 1, 1, 1, 1, 1)]
    text = "posterior instrumentation across 3 vertebrae (levels not named): 6 pedicle screws, rods on both sides (8 pieces)"
    assert instrumentation_text(screws + pieces, "AP") == text
    # One rod per side stays "2 rods"; a unilateral rod in three pieces; pieces whose side is unknown.
    assert instrumentation_text(screws + pieces[2:4], "AP").endswith("6 pedicle screws, 2 rods")
    assert instrumentation_text(screws + pieces[:3], "AP").endswith("6 pedicle screws, rod on one side (3 pieces)")
    unknown = [ImplantSummary(ImplantKind.ROD, ())] * 3
    assert instrumentation_text(screws + unknown, "AP").endswith("6 pedicle screws, 3 rod pieces")
    assert instrumentation_text(screws + unknown[:2], "AP").endswith("6 pedicle screws, 2 rods")
    # A piece whose side is unknown might lie on the other side: no side is claimed.
    assert instrumentation_text(screws + pieces[:1] + unknown[:2], "AP").endswith("6 pedicle screws, 3 rod pieces")


def test_rod_interrupted_at_every_screw_head_is_one_rod() -> None:
    prob = construct(cage=False)
    for level in BODIES.values():  # the rod map drops where the heads cover the rod
        prob[ROD, int(level / 2) - 4 : int(level / 2) + 4, :] = 0.0
    out = run(prob)
    rods = [i for i in out.implants if i.kind is ImplantKind.ROD]
    assert len(rods) == 2 and not any(r.complications for r in rods)
    assert all(r.levels == ("L3", "L4", "L5") for r in rods)


def test_a_piece_alongside_a_rod_is_part_of_it() -> None:
    # Seen on real films with implants drawn on: most false rods were fragments beside a rod found whole.
    prob = construct(cage=False)
    mid = MID / 2
    _line(prob, ROD, (mid + 31, 64.0), (mid + 41, 66.0), 1.5)  # a sliver 2-13 mm beside the right rod, across it
    _line(prob, ROD, (mid - 17, 100.0), (mid + 17, 100.0), 1.5)  # a cross-link 4 mm short of both rods
    prob[METAL] = prob[[SCREW, ROD, CAGE]].max(axis=0)

    def rods(params: HardwareParams) -> list:
        return [p for p in find_pieces(prob, 1.0, params) if p.kind is ImplantKind.ROD]

    assert len(rods(HardwareParams(rod_hug_mm=0.0))) == 4  # off: the sliver and the cross-link are rods of their own
    joined = rods(HardwareParams())  # on by default (10 mm)
    # The sliver joins the right rod; the cross-link (mostly farther than 10 mm from either) and the two
    # rods, 50 mm apart, stay apart.
    assert len(joined) == 3
    columns = sorted(p.offset[1] + p.mask.shape[1] / 2 for p in joined)
    assert columns[0] < mid - 20 and abs(columns[1] - mid) < 3 and columns[2] > mid + 20


def test_a_piece_near_both_rods_joins_one_of_them_not_the_rods_to_each_other() -> None:
    left = (np.ones((80, 5), bool), (0, 0))
    right = (np.ones((70, 5), bool), (0, 21))  # 16 px from the left rod: neither hugs the other at 10 px
    bridge = (np.ones((3, 14), bool), (40, 6))  # between them, within 10 px of both
    joined = absorb_hugging_rods([bridge, right, left], 10.0)
    assert sorted(int(crop.sum()) for crop, _ in joined) == [350, 400 + 42]


def test_rod_pieces_meeting_end_to_end_are_one_rod() -> None:
    # Seen on the real VAL films with implants drawn on: a rod stretch under a screw head is as wide as it is
    # long, so its principal axis does not point along the rod and the axis rule left it a rod of its own.
    prob = np.zeros((len(CHANNELS), 120, 80), np.float32)
    prob[ROD, 0:60, 20:25] = 0.9  # the rod above
    prob[ROD, 65:85, 14:32] = 0.9  # 5 rows below it: 20 rows, 18 columns, centred on the rod's column

    def rods(params: HardwareParams) -> int:
        return len(rod_pieces(prob, 1.0, params))

    assert rods(HardwareParams(rod_join_gap_mm=0.0)) == 2  # off: the axis and the "alongside" rules leave it apart
    assert rods(HardwareParams()) == 1  # on by default (10 mm gap, 8 mm offset)
    prob[ROD, 65:85, 14:32] = 0.0
    prob[ROD, 65:85, 34:52] = 0.9  # the same piece 20 columns to the side: another rod's, or not a rod
    assert rods(HardwareParams()) == 2


def test_side_by_side_rods_are_not_joined_end_to_end() -> None:
    upper = (np.ones((40, 5), bool), (0, 20))
    lower = (np.ones((40, 5), bool), (46, 22))  # 6 rows below, 2 columns over: the same rod
    other_side = (np.ones((100, 5), bool), (0, 60))  # the other rod, beside both
    offside = (np.ones((30, 5), bool), (106, 45))  # 6 rows below the other rod, 15 columns off its end
    joined = join_rods_end_to_end([upper, lower, other_side, offside], gap_px=10.0, offset_px=8.0, end_px=6.0)
    assert sorted(int(crop.sum()) for crop, _ in joined) == [150, 400, 500]


def test_a_screw_running_along_a_rod_is_part_of_it_on_laterals() -> None:
    def piece(kind: ImplantKind, r0: int, r1: int, c0: int, c1: int) -> Piece:
        return Piece(kind, np.ones((r1 - r0, c1 - c0), bool), (r0, c0))

    rod = piece(ImplantKind.ROD, 0, 100, 40, 45)  # the posterior rod, cranio-caudal
    along = piece(ImplantKind.PEDICLE_SCREW, 30, 50, 39, 46)  # on it and along it: a stretch of rod
    across = piece(ImplantKind.PEDICLE_SCREW, 70, 76, 15, 60)  # a lateral screw crossing the rod front to back
    across_short = piece(ImplantKind.PEDICLE_SCREW, 60, 65, 36, 50)  # mostly on the rod, but across it
    apart = piece(ImplantKind.PEDICLE_SCREW, 10, 30, 70, 75)  # along the rod's direction, 25 px from it
    pieces = [rod, along, across, across_short, apart]
    assert screws_along_rods(pieces, 1.0, 0.5, 30.0) == {1: 0}
    assert screws_along_rods(pieces, 1.0, 0.0, 30.0) == {}  # 0: off
    assert screws_along_rods([along, across], 1.0, 0.5, 30.0) == {}  # no rod found: nothing to lie along
    # The stretch is metal of the rod: it joins the rod's outline (at source resolution, here twice the
    # network grid's) rather than vanishing from the segmentation.
    placed = [SourcePiece(p, (2 * p.offset[0], 2 * p.offset[1]), np.kron(p.mask, np.ones((2, 2), bool)), (0.0, 0.0)) for p in pieces]
    kept = absorb_screws_along_rods(placed, 1.0, 0.5, 30.0)
    assert [sp.piece.kind for sp in kept] == [ImplantKind.ROD] + [ImplantKind.PEDICLE_SCREW] * 3
    assert int(kept[0].mask.sum()) == 4 * (100 * 5 + 20 * 2) and kept[0].offset == (0, 78)
    # Centroid row (source pixels): the rod's 2000 pixels centred on row 100, the stretch's 160 new ones on row 80.
    assert kept[0].centroid[1] == pytest.approx((2000 * 100 + 160 * 80) / 2160, abs=0.5)
    assert all(a is b for a, b in zip(kept[1:], placed[2:], strict=True))


def test_evidence_stays_inside_the_image() -> None:
    prob = construct(cage=False, loose=("L3", -1))
    prob = prob[:, 43:, :]  # L3 now sits at the top edge of a shorter image
    rows = prob.shape[1] * 2
    rad = dataclasses.replace(radiograph(), pixels=np.zeros((rows, COLS), np.float32), stored_shape=(rows, COLS))
    shifted = []
    for v in _vertebrae():
        dense = v.mask.dense()[86:]
        if dense.any():
            shifted.append(Vertebra(v.level, RegionMask.from_dense(dense), (), (v.centroid[0], v.centroid[1] - 86)))
    out = run(prob, rad=rad, vertebrae=shifted, source=dataclasses.replace(SOURCE, rows=rows))
    assert out.findings
    for f in out.findings:
        assert all(0 <= x <= COLS and 0 <= y <= rows for x, y in f.evidence)


def test_rod_gap_level_is_the_nearest_vertebra_not_the_nearest_named_one() -> None:
    # Seen on a lumbar film with naming off: only the sacrum carries a level ("S1"), and a rod gap four
    # vertebrae higher was reported "near S1".
    body = np.ones((20, 30), bool)
    spine = [VertebraGeom(None, (100.0, 40.0 + 30 * k), body, (30 + 30 * k, 85)) for k in range(5)]
    spine.append(VertebraGeom("S1", (100.0, 200.0), np.ones((40, 60), bool), (180, 70)))
    assert level_near(75.0, spine) is None
    named = [dataclasses.replace(v, level=lv) for v, lv in zip(spine, ("L1", "L2", "L3", "L4", "L5", "S1"), strict=True)]
    assert level_near(75.0, named) == "L2"
    assert level_near(205.0, named) == "S1"
    # Far beyond the last vertebra: no level rather than the last one's.
    assert level_near(400.0, named) is None


def test_metal_beside_the_spine_is_not_spinal_hardware() -> None:
    # Seen on real scoliosis films: the buckles and snaps of a brace, two to four body widths out, were
    # reported as screws, rods and plates.
    def spine(rows):  # bodies 80 px wide on the midline, unnamed (as the vertebra model gives them today)
        return [Vertebra(None, RegionMask.from_dense(_rect((ROWS, COLS), r - 14, r + 14, MID - 40, MID + 40)), (), (MID + 0.5, r + 0.5))
                for r in rows]

    vertebrae = spine(range(20, 231, 35))  # seven bodies, 35 px apart: judged from row 20 to row 142
    buckle_x = (MID + 130) / 2  # 1.6 body widths right of the midline (network grid: half the source)

    def with_buckle(prob, top, bottom):
        prob = prob.copy()
        _line(prob, ROD, (buckle_x, top), (buckle_x, bottom), 2.5)
        prob[METAL] = prob[[SCREW, ROD, CAGE]].max(axis=0)
        return prob

    out = run(with_buckle(construct(), 20.0, 60.0), vertebrae=vertebrae)
    assert len([i for i in out.implants if i.kind is ImplantKind.ROD]) == 2
    assert len([i for i in out.implants if i.kind is ImplantKind.PEDICLE_SCREW]) == 6
    assert any("1 metal object(s) beside the spine" in n for n in out.notes)
    # Alone, it makes the image "no implants", not a construct.
    empty = np.zeros_like(construct())
    assert run(with_buckle(empty, 20.0, 60.0), vertebrae=vertebrae).status is HardwareStatus.NO_IMPLANTS
    # Near the lowest vertebrae found (where iliac screws sit, and where the chain often runs on into the
    # sacrum) and below them nothing is judged; nor with fewer than three vertebrae.
    assert run(with_buckle(empty, 85.0, 110.0), vertebrae=vertebrae).status is not HardwareStatus.NO_IMPLANTS
    assert run(with_buckle(empty, 125.0, 150.0), vertebrae=vertebrae).status is not HardwareStatus.NO_IMPLANTS
    assert run(with_buckle(empty, 20.0, 60.0), vertebrae=vertebrae[:2]).status is not HardwareStatus.NO_IMPLANTS
    # 0 switches the test off; laterals are not judged (posterior elements and plates sit off the bodies there).
    alone = with_buckle(empty, 20.0, 60.0)
    assert run(alone, vertebrae=vertebrae, params=HardwareParams(max_off_spine_widths=0.0)).status is not HardwareStatus.NO_IMPLANTS
    lateral = run(alone, rad=radiograph("LAT", None), vertebrae=vertebrae, source=dataclasses.replace(SOURCE, view="LAT"))
    assert lateral.status is not HardwareStatus.NO_IMPLANTS
