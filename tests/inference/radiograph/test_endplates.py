"""Geometry of the six-point morphometry stage (crop frames, targets, sides, heights) and its training data;
no weights needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from phantoms import FIXED_SET, phantom

from inference.radiograph import endplates
from inference.radiograph.endplates import SIDE_POINTS, BodyPoints, CropFrame


def test_crop_units_round_trip_on_a_tilted_frame() -> None:
    t = math.radians(20)
    frame = CropFrame((100.0, 200.0), (math.sin(t), math.cos(t)), 64.0)
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-0.5, 0.25]])
    xy = frame.to_source(pts)
    assert xy[0] == pytest.approx([100.0, 200.0])
    assert np.hypot(*(xy[2] - xy[0])) == pytest.approx(32.0)  # one crop unit is half the side
    assert frame.to_crop(xy) == pytest.approx(pts)
    # Columns grow to the right of a spine running down the image.
    assert CropFrame((0, 0), (0.0, 1.0), 10).across == (1.0, -0.0)


def test_chain_frames_follow_the_spine_and_skip_gaps() -> None:
    # Five bodies 30 px apart on a line at 10 degrees, the fourth missed (a 60 px gap).
    d = np.array([math.sin(math.radians(10)), math.cos(math.radians(10))])
    centroids = [tuple(np.array([50.0, 20.0]) + 30.0 * k * d) for k in (0, 1, 2, 4, 5)]
    frames = endplates.chain_frames(centroids)
    assert len(frames) == 5
    for f in frames:
        assert f.axis == pytest.approx(tuple(d), abs=1e-9)
    assert [f.side_px / endplates.CROP_STEPS for f in frames] == pytest.approx([30.0] * 5)
    assert endplates.chain_frames([(1.0, 2.0)]) == []


def test_body_crop_shows_a_bright_body_upright_and_scaled() -> None:
    image = np.zeros((300, 300), np.float32)
    image[120:160, 100:200] = 1.0  # a wide bright block, 40 px tall
    frame = CropFrame((150.0, 140.0), (0.0, 1.0), 128.0)  # 2 source px per crop px
    crop = endplates.body_crop(image, frame, size=64)
    assert crop.shape == (64, 64) and crop.dtype == np.float32
    rows = np.flatnonzero(crop[:, 32] > 0.5)
    assert rows.min() == pytest.approx(22, abs=1) and rows.max() == pytest.approx(41, abs=1)
    # Turned 90 degrees: the block's long side now runs along the crop's rows.
    turned = endplates.body_crop(image, CropFrame((150.0, 140.0), (1.0, 0.0), 128.0), size=64)
    assert (turned[:, 32] > 0.5).sum() > 40 and (turned[32, :] > 0.5).sum() < 25


def test_targets_put_anterior_on_the_side_the_flag_says() -> None:
    corners = {
        "anterior_superior": (120.0, 100.0), "anterior_inferior": (120.0, 125.0),
        "middle_superior": (100.0, 102.0), "middle_inferior": (100.0, 123.0),
        "posterior_superior": (80.0, 100.0), "posterior_inferior": (80.0, 128.0),
    }
    frame = CropFrame((100.0, 112.0), (0.0, 1.0), 64.0)
    t = endplates.crop_targets(frame, corners, high_anterior=True)
    assert t[SIDE_POINTS.index("high_superior")] == pytest.approx(frame.to_crop(np.array(corners["anterior_superior"])))
    assert t[SIDE_POINTS.index("low_inferior")] == pytest.approx(frame.to_crop(np.array(corners["posterior_inferior"])))
    points = BodyPoints(dict(zip(SIDE_POINTS, map(tuple, frame.to_source(t)), strict=True)), 0.9, frame)
    h = endplates.heights_px(points, True, (0.5, 0.5))
    assert [h[n][0] for n in ("anterior", "middle", "posterior")] == pytest.approx([12.5, 10.5, 14.0])
    h = endplates.heights_px(points, False, None)  # the other way round, in pixels
    assert [h[n][0] for n in ("anterior", "posterior")] == pytest.approx([28.0, 25.0])


def test_anterior_side_from_the_header_or_the_chain_vote() -> None:
    down, up = CropFrame((0, 0), (0.0, 1.0), 10), CropFrame((0, 0), (0.0, -1.0), 10)
    pts = {n: (0.0, 0.0) for n in SIDE_POINTS}
    # Header: anterior toward +x; a frame pointing down has +columns toward +x, one pointing up toward -x.
    bodies = [BodyPoints(pts, 0.1, down), BodyPoints(pts, 0.1, up)]
    assert endplates.anterior_is_high(bodies, +1) == [True, False]
    assert endplates.anterior_is_high(bodies, -1) == [False, True]
    # No header: the vote in image terms (P(anterior toward +x) 0.1 and 0.9 -> 0.5 mean; three confident
    # bodies toward -x win).
    bodies = [BodyPoints(pts, 0.2, down)] * 3 + [BodyPoints(pts, 0.9, down)]
    assert endplates.anterior_is_high(bodies, None) == [False] * 4


def test_recentring_moves_the_crop_to_the_points() -> None:
    frame = CropFrame((100.0, 100.0), (0.0, 1.0), 40.0)
    pts = np.array([[-0.5, -0.4], [-0.5, 0.6], [0.0, -0.4], [0.0, 0.6], [0.5, -0.4], [0.5, 0.6]])
    moved = endplates.recentred(frame, pts)
    assert moved.centre == pytest.approx((100.0, 102.0)) and moved.axis == pytest.approx((0.0, 1.0)) and moved.side_px == 40.0


def test_network_shapes_and_round_trip_of_its_state() -> None:
    net = endplates.build_net(8)
    crops = np.random.default_rng(0).random((3, endplates.CROP_PX, endplates.CROP_PX)).astype(np.float32)
    pts, side = endplates.predict(endplates.load_net(net.state_dict(), 8), crops)
    assert pts.shape == (3, 6, 2) and side.shape == (3,) and np.all((side > 0) & (side < 1))
    placed = endplates.place_points(net.eval(), np.zeros((200, 200), np.float32), [(100.0, 60.0), (100.0, 90.0), (100.0, 120.0)])
    assert len(placed) == 3 and set(placed[0].points) == set(SIDE_POINTS)


def test_training_items_and_examples_from_a_phantom_lateral() -> None:
    from inference.train import endplates as train

    sample = phantom(*FIXED_SET[0])  # lateral lumbar, L1 wedge
    items = train.sample_items(0, sample)
    assert len(items) >= 4 and all(min(i.heights_mm) >= train.MIN_HEIGHT_MM for i in items)
    assert any(i.grade >= 2 for i in items)
    images = [np.asarray(sample.image, dtype=np.float32)]
    rng = np.random.default_rng(0)
    for item in items:
        crop, target, high = train.make_example(images, item, None)
        assert crop.shape == (endplates.CROP_PX, endplates.CROP_PX) and np.abs(target).max() < 1.0
        # Superior points above inferior ones; the anterior pair on the side the flag says.
        assert np.all(target[0::2, 1] < target[1::2, 1])
        ant, post = (target[4], target[0]) if high else (target[0], target[4])
        assert (ant[0] > post[0]) == bool(high)
        crop, target, high = train.make_example(images, item, rng)  # jittered, maybe mirrored
        assert np.isfinite(crop).all() and np.abs(target).max() < 1.5 and np.all(target[0::2, 1] < target[1::2, 1])


def test_a_stage_is_added_to_a_model_folder(tmp_path) -> None:  # noqa: ANN001
    import json

    import torch

    from inference.registry import sha256_file
    from inference.train import common

    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    (tmp_path / "model.json").write_text(json.dumps({"name": "m", "version": "1.0+old", "metrics": {"f1": 1.0}}))
    meta = common.add_stage_weights(tmp_path, "endplates", {"b": torch.zeros(3)})
    assert meta["sha256"] == sha256_file(tmp_path / "weights.pt") and meta["version"] == "1.0+" + meta["sha256"][:8]
    assert meta["metrics"] == {}
    state = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert set(state) == {"segmentation", "endplates"} and torch.equal(state["segmentation"]["w"], torch.ones(2))
    common.add_stage_weights(tmp_path, "endplates", {"b": torch.ones(3)})  # replaced, not nested again
    state = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert set(state) == {"segmentation", "endplates"} and torch.equal(state["endplates"]["b"], torch.ones(3))


def test_the_shipped_stage_can_be_copied_into_a_new_network_folder(tmp_path) -> None:  # noqa: ANN001
    """A network retrained on another split keeps the six-point stage (it never saw a real film nor the
    network's output): copied, with where it came from, and the loaded model uses it."""
    import json

    import torch

    from inference.radiograph.model import VertebraModel
    from inference.registry import ModelRegistry, ModelSpec
    from inference.train.endplates import main

    shipped = ModelRegistry().spec("spine-xr-vertebrae")
    states = torch.load(shipped.folder / "weights.pt", map_location="cpu", weights_only=True)
    folder = tmp_path / "spine-xr-vertebrae"
    folder.mkdir()
    torch.save(states["segmentation"], folder / "weights.pt")  # a network alone, as the trainer writes it
    meta = {k: v for k, v in shipped.metadata.items() if k not in ("format",)}
    meta["architecture"] = {k: v for k, v in meta["architecture"].items() if k != "endplates"}
    meta["training"] = {k: v for k, v in meta["training"].items() if k != "endplates"}
    (folder / "model.json").write_text(json.dumps(meta))
    assert main(["--model", str(folder), "--copy-from", str(shipped.folder)]) == 0
    written = json.loads((folder / "model.json").read_text())
    assert written["training"]["endplates"]["copied_from"]["version"] == shipped.metadata["version"]
    assert written["architecture"]["endplates"] == shipped.metadata["architecture"]["endplates"]
    assert written["metrics"] == {}
    copied = torch.load(folder / "weights.pt", weights_only=True)["endplates"]
    assert all(torch.equal(copied[k], states["endplates"][k]) for k in states["endplates"])
    assert VertebraModel.from_spec(ModelSpec.read(folder)).endplates is not None
