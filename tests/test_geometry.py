"""Geometry of the proposals stage: range image, ground removal, segmentation, projection, quality on ground truth."""
from __future__ import annotations

import json

import numpy as np
import pytest

from raydseg.config import ProposalsConfig
from raydseg.geometry import analytic, quality
from raydseg.geometry.column_bits import MAX_ROWS
from raydseg.geometry.ground import (_angle_image, _ground_bfs, _ground_bits, ground_plane_ransac, ground_range_image,
                                     savgol_coeffs)
from raydseg.geometry.project import densify_segments, fill_masks, project_points, project_segments, visible_points
from raydseg.geometry.proposals import camera_segments, density_mask, sweep_segments
from raydseg.geometry.range_image import build_range_image, estimate_columns
from raydseg.geometry.segment import _bfs_segments, _segment_bits, filter_segments, segment_stats


@pytest.fixture(scope="module")
def street():
    return analytic.raycast(analytic.street_boxes(), noise_m=0.01, dropout=0.03, seed=1)


def _labels(scene) -> np.ndarray:
    """Analytic scene -> trainIds (road 0 for the ground, car 13 for boxes)."""
    return np.where(scene["ground"], 0, 13).astype(np.uint8)


def test_range_image_rows_from_ring_and_from_elevation_agree():
    s = analytic.raycast([], beams=16, columns=256, fov_up_deg=-3.0)  # every beam hits the ground
    xyz = s["points"][:, :3]
    ri_ring = build_range_image(xyz, s["ring"], n_cols=256)
    ri_elev = build_range_image(xyz, None, n_beams=16, n_cols=256)
    assert ri_ring.shape == (16, 256)
    # ring 0 is the lowest beam -> the bottom row; elevation binning recovers the same rows
    assert np.array_equal(ri_ring.row, 15 - s["ring"].astype(np.int32))
    assert np.array_equal(ri_elev.row, ri_ring.row)
    # one point per pixel, each pixel's representative maps back to its own pixel
    idx = ri_ring.index[ri_ring.index >= 0]
    assert len(idx) == len(xyz)
    assert estimate_columns(xyz, s["ring"]) == 256


def test_savgol_coefficients_match_the_textbook_quadratic_window():
    assert np.allclose(savgol_coeffs(5), np.array([-3, 12, 17, 12, -3]) / 35)
    assert np.allclose(savgol_coeffs(7), np.array([-2, 3, 6, 7, 6, 3, -2]) / 21)
    with pytest.raises(ValueError, match="odd"):
        savgol_coeffs(6)


def test_ground_removal_separates_plane_from_boxes(street):
    sw = sweep_segments(street["points"], street["ring"], ProposalsConfig())
    p, r = quality.ground_precision_recall(sw.ground, _labels(street), sw.use)
    assert p >= 0.98 and r >= 0.99, (p, r)


def test_ground_bit_flood_reaches_exactly_the_pixels_of_the_bfs(street):
    # the uint64-per-column flood (images up to 64 rows) must reach the BFS's fixpoint, pixel for pixel
    rng = np.random.default_rng(0)
    ri = build_range_image(street["points"][:, :3], street["ring"])
    cases = [(_angle_image(ri.range_cm, ri.horizontal_cm, ri.height_cm, gap, savgol_coeffs(7)), ri.range_cm, gap)
             for gap in range(3)]
    for _ in range(300):  # holes, undefined angles, gaps wider than the image, one-column images
        W, H = int(rng.integers(1, 40)), int(rng.integers(1, MAX_ROWS + 1))
        rm = (rng.random((W, H)) > rng.random() * 0.6).astype(np.float32)
        ang = (rng.random((W, H)) * 30).astype(np.float32)
        ang[rng.random((W, H)) < 0.1] = np.nan
        cases.append((ang, rm, int(rng.integers(0, 5))))
    n_ground = 0
    for ang, rm, gap in cases:
        for thr, start, slope in ((7.0, 30.0, 20.0), (3.0, 10.0, 8.0)):
            bfs = _ground_bfs(ang, rm, thr, start, slope, gap)
            assert np.array_equal(_ground_bits(ang, rm, thr, start, slope, gap), bfs), (ang.shape, gap, thr)
            n_ground += int(bfs.sum())
    assert n_ground > 50_000


@pytest.mark.parametrize("beams", [32, 96], ids=["bit-flood", "bfs-over-64-rows"])
def test_ground_removal_follows_a_slope_that_one_plane_cannot_fit(beams):
    # ground rising at 8 % after x = 10 m: the range-image method follows it, one RANSAC plane cannot
    s = analytic.raycast([], beams=beams, columns=512)
    xyz = s["points"][:, :3].copy()
    far = xyz[:, 0] > 10
    xyz[far, 2] += 0.08 * (xyz[far, 0] - 10)
    cfg = ProposalsConfig()
    sw = sweep_segments(np.c_[xyz, s["points"][:, 3]], s["ring"], cfg)
    assert sw.ground[sw.use].mean() >= 0.99
    ransac = ground_plane_ransac(xyz, threshold_m=0.2)
    assert ransac.mean() < 0.95


def test_segment_bit_labelling_gives_exactly_the_labels_of_the_bfs(street):
    # the uint64-per-column labelling (images up to 64 rows) must find the BFS's segments with its numbering
    rng = np.random.default_rng(0)
    ri = build_range_image(street["points"][:, :3], street["ring"])
    blocked = ground_range_image(ri).T
    cases = [(ri.range_cm, ri.elevation_cm, blocked, gap) for gap in range(3)]
    for i in range(300):  # holes, ground pixels, gaps wider than the image, one-column images
        W, H = int(rng.integers(1, 40)), int(rng.integers(1, MAX_ROWS + 1))
        rm = np.where(rng.random((W, H)) > rng.random() * 0.6, rng.uniform(1, 30, (W, H)), 0)
        if i % 3 == 0:  # one smooth surface: large segments
            rm = np.where(rm > 0, 10 + rng.normal(0, 0.3, (W, H)), 0)
        el = np.linspace(0.05, -0.4, H)[None, :] + rng.normal(0, 0.002, (W, H))
        bl = (rng.random((W, H)) < rng.random() * 0.3).astype(np.uint8)
        cases.append((rm.astype(np.float32), el.astype(np.float32), bl, int(rng.integers(0, 5))))
    n_segments = 0
    for rm, el, bl, gap in cases:
        for beta in (5.0, 10.0):
            bfs, n = _bfs_segments(rm, el, bl, np.radians(beta), gap)
            bits, n_bits = _segment_bits(rm, el, bl, np.radians(beta), gap)
            assert n_bits == n and np.array_equal(bits, bfs), (rm.shape, gap, beta)
            n_segments += n
    assert n_segments > 10_000


def test_segmentation_recovers_each_box_as_one_pure_segment(street):
    sw = sweep_segments(street["points"], street["ring"], ProposalsConfig())
    seg, inst = sw.segment_id, street["instance"]
    assert quality.segment_purity(seg, _labels(street), inst) >= 0.99
    rec, n = quality.instance_recall(seg, inst, min_points=50, min_cover=0.75)
    assert n == 6 and rec == 1.0
    majority = [np.bincount(seg[inst == k]).argmax() for k in range(1, 7)]
    assert 0 not in majority and len(set(majority)) == 6  # pedestrian and the car behind it stay apart


def test_segments_are_filtered_by_point_count_and_extent():
    labels = np.array([1] * 30 + [2] * 5 + [3] * 40 + [0] * 3)
    xyz = np.zeros((len(labels), 3))
    xyz[:30, 0] = np.linspace(0, 1.0, 30)     # segment 1: 30 points, 1 m long
    xyz[35:75, 0] = np.linspace(0, 40.0, 40)  # segment 3: 40 points, 40 m long
    out = filter_segments(labels, xyz, min_points=20, max_points=1000)
    assert set(np.unique(out)) == {0, 1, 2} and (out[30:35] == 0).all()
    assert out[35] == 1  # renumbered by decreasing size
    out = filter_segments(labels, xyz, min_points=20, max_points=1000, max_extent_m=10.0)
    assert set(np.unique(out[:30])) == {1} and (out[35:] == 0).all()
    st = segment_stats(out, xyz)
    assert st["n_points"].tolist() == [30] and np.allclose(st["extent"][0], [1.0, 0, 0])


def test_dbscan_baseline_recovers_the_boxes(street):
    cfg = ProposalsConfig(segment_method="dbscan", dbscan_eps_m=0.7, dbscan_min_points=3)
    sw = sweep_segments(street["points"], street["ring"], cfg)
    rec, n = quality.instance_recall(sw.segment_id, street["instance"])
    assert n == 6 and rec >= 5 / 6
    with pytest.raises(ValueError, match="segment_method\n  Input should be 'range_image' or 'dbscan'"):
        ProposalsConfig(segment_method="nope")  # the config refuses it before any sweep
    with pytest.raises(ValueError, match="unknown segment method"):
        sweep_segments(street["points"], street["ring"], ProposalsConfig.model_construct(segment_method="nope"))


def test_projection_lands_a_known_point_on_its_analytic_pixel():
    K, T = analytic.camera(320, 160, focal=160.0)
    T = T.copy()
    T[:3, 3] = [0.1, -0.2, 0.3]  # some translation too
    xyz = np.array([[10.0, 2.0, 1.0], [-5.0, 0.0, 0.0], [0.1, 0.0, 0.0]])  # depths 10.3, -4.7, 0.4
    u, v, z, inside = project_points(xyz, K, T, 320, 160, near=0.5)
    cam = np.array([-2.0 + 0.1, -1.0 - 0.2, 10.0 + 0.3])
    assert z[0] == pytest.approx(10.3)
    assert u[0] == pytest.approx(160 * cam[0] / cam[2] + 159.5)
    assert v[0] == pytest.approx(160 * cam[1] / cam[2] + 79.5)
    assert inside.tolist() == [True, False, False]  # behind the camera; closer than `near`


def test_lens_distortion_moves_points_in_both_projection_kernels_and_drops_those_outside_its_valid_region():
    """With (k1, k2, p1, p2, k3) a point lands on K (OpenCV's distortion of X/Z, Y/Z), in `project_points` and in the
    proposals' `project_segments` alike. A point far outside the field of view, where the polynomial turns back into
    the image (radial factor below Waymo's 0.8), is outside in both. All-zero coefficients are the pinhole."""
    w, h = 1920, 1280
    K = np.array([[2060.0, 0, 959.5], [0, 2055.0, 639.5], [0, 0, 1]])
    k1, k2, p1, p2, k3 = lens = np.array([0.04, -0.33, 0.0005, -0.0008, 0.002])
    gx, gy = np.meshgrid(np.linspace(-0.45, 0.45, 10), np.linspace(-0.3, 0.3, 7))
    x, y = np.r_[gx.ravel(), 1.2], np.r_[gy.ravel(), 0.0]  # the last: r = 1.2, radial factor 0.37
    z = np.linspace(5, 40, len(x))
    cam = np.c_[x * z, y * z, z]  # T = identity: points in the camera frame
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
    u_want = K[0, 0] * (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)) + K[0, 2]
    v_want = K[1, 1] * (y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y) + K[1, 2]
    assert radial[-1] < 0.8 and 0 <= u_want[-1] < w - 0.5 and K[0, 0] * x[-1] + K[0, 2] > w  # folded back inside
    u, v, _, inside = project_points(cam, K, np.eye(4), w, h, distortion=lens)
    assert inside.tolist() == [True] * 70 + [False] and np.isnan(u[-1])
    assert np.abs(u[:70] - u_want[:70]).max() < 1e-9 and np.abs(v[:70] - v_want[:70]).max() < 1e-9
    assert np.hypot(u[:70] - (K[0, 0] * x[:70] + K[0, 2]), v[:70] - (K[1, 1] * y[:70] + K[1, 2])).max() > 20
    seg = np.arange(1, len(x) + 1, dtype=np.uint16)
    out = project_segments(cam, seg, np.zeros(len(x), bool), K, np.eye(4), w, h, distortion=lens, radius_px=0)
    assert out["n_in_image"] == 70 and out["n_visible"] == 70
    rows, cols = np.rint(v_want[:70]).astype(int), np.rint(u_want[:70]).astype(int)
    assert out["segment_ids"][rows, cols].tolist() == seg[:70].tolist()
    assert out["n_pixels"][1:].tolist() == [1] * 70 + [0]
    pinhole = project_points(cam, K, np.eye(4), w, h)
    for a, b in zip(project_points(cam, K, np.eye(4), w, h, distortion=np.zeros(5)), pinhole):
        np.testing.assert_array_equal(a, b)


def rolling_shutter_reference(cam, rs):
    """Camera-0 points (N, 3) -> (points at their capture time (N, 3), time (N,) s) by bisection on the rolling-shutter
    record's model (raydseg.geometry.rolling_shutter's docstring): p(t) = (I - t [w]x)(p0 - t v) and
    t = t0 + dt_dx X/Z + dt_dy Y/Z, coded apart from the kernels' Newton steps."""
    v, w, (t0, ax, ay) = rs[:3], rs[3:6], rs[6:]

    def moved(t):
        q = cam - t[:, None] * v
        return q - t[:, None] * np.cross(w, q)

    lo, hi = np.full(len(cam), -0.5), np.full(len(cam), 0.5)
    for _ in range(70):
        mid = 0.5 * (lo + hi)
        p = moved(mid)
        neg = mid - t0 - ax * p[:, 0] / p[:, 2] - ay * p[:, 1] / p[:, 2] < 0
        lo, hi = np.where(neg, mid, lo), np.where(neg, hi, mid)
    t = 0.5 * (lo + hi)
    return moved(t), t


def test_rolling_shutter_moves_points_in_both_projection_kernels_to_their_capture_time():
    """With a rolling-shutter record (camera velocity, angular velocity, capture-time plane) a point lands where the
    camera sees it at the point's own capture time (the module's model solved by bisection), through the lens, at that
    time's depth, in `project_points` and in the proposals' `project_segments` alike; without it the points miss by
    pixels. A record with no motion is the global shutter (1e-9 px)."""
    w, h = 1920, 1280
    K = np.array([[2060.0, 0, 959.5], [0, 2055.0, 639.5], [0, 0, 1]])
    lens = np.array([0.04, -0.33, 0.0005, -0.0008, 0.002])
    gx, gy = np.meshgrid(np.linspace(-0.4, 0.4, 10), np.linspace(-0.27, 0.27, 7))
    z = np.linspace(3, 40, gx.size)
    cam = np.c_[gx.ravel() * z, gy.ravel() * z, z]  # T = identity: points in the camera frame at T's time
    rs = np.array([2.0, -0.3, 14.0, 0.01, -0.25, 0.02, 0.004, 0.0, 0.05])  # 30 ms top to bottom, 5 ms late
    want, t = rolling_shutter_reference(cam, rs)
    assert np.ptp(t) > 0.02
    x, y = want[:, 0] / want[:, 2], want[:, 1] / want[:, 2]
    r2 = x * x + y * y
    k1, k2, p1, p2, k3 = lens
    radial = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
    u_want = K[0, 0] * (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)) + K[0, 2]
    v_want = K[1, 1] * (y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y) + K[1, 2]
    u, v, depth, inside = project_points(cam, K, np.eye(4), w, h, distortion=lens, rolling_shutter=rs)
    assert inside.all()
    assert np.abs(u - u_want).max() < 1e-6 and np.abs(v - v_want).max() < 1e-6
    np.testing.assert_allclose(depth, want[:, 2], atol=1e-9)
    u0, v0, _, _ = project_points(cam, K, np.eye(4), w, h, distortion=lens)
    assert np.median(np.hypot(u0 - u_want, v0 - v_want)) > 3
    seg = np.arange(1, len(cam) + 1, dtype=np.uint16)
    out = project_segments(cam, seg, np.zeros(len(cam), bool), K, np.eye(4), w, h, distortion=lens,
                           rolling_shutter=rs, radius_px=0)
    assert out["n_in_image"] == len(cam) and out["n_visible"] == len(cam)
    assert out["segment_ids"][np.rint(v_want).astype(int), np.rint(u_want).astype(int)].tolist() == seg.tolist()
    still = np.r_[np.zeros(6), 0.0, 0.0, 0.05]
    for rec, dist in ((still, lens), (still, None)):
        for a, b in zip(project_points(cam, K, np.eye(4), w, h, distortion=dist, rolling_shutter=rec),
                        project_points(cam, K, np.eye(4), w, h, distortion=dist)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


def test_projection_drops_occluded_points():
    # a foreground segment's sparse points at 5 m, background points at 20 m in the gaps between them
    px = np.array([10, 14, 12, 30])
    py = np.array([10, 10, 11, 10])
    depth = np.array([5.0, 5.0, 20.0, 20.0])
    group = np.array([1, 1, 2, 2])
    vis = visible_points(px, py, depth, group, 64, 32, radius_px=2)
    assert vis.tolist() == [True, True, False, True]
    # points of the same surface never hide each other (slanted ground)
    vis = visible_points(px, py, depth, np.array([0, 0, 0, 0]), 64, 32, radius_px=2)
    assert vis.all()


def test_densify_assigns_each_pixel_to_its_nearest_visible_point_within_the_radius():
    img = densify_segments(np.array([10, 20]), np.array([5, 5]), np.array([5.0, 5.0]), np.array([3, 0]), 40, 12,
                           radius_px=4)
    assert img.dtype == np.uint16
    assert img[5, 10] == 3 and img[5, 14] == 3 and img[5, 15] == 0  # 15 is beyond the radius of both points
    assert img[5, 17] == 0  # nearer the label-0 (ground / unsegmented) point: it claims the pixel
    assert img[5, 6] == 3 and img[5, 5] == 0  # beyond the radius
    assert img[1, 10] == 3 and img[0, 10] == 0


def test_zbuffer_and_densify_match_brute_force_on_random_points():
    # the kernels pack depths into int64 keys and pull per image row; a direct per-pixel search must agree
    rng = np.random.default_rng(0)
    W, H, n = 37, 23, 120
    px, py = rng.integers(0, W, n), rng.integers(0, H, n)
    depth = rng.uniform(1.0, 30.0, n).astype(np.float32).astype(np.float64)
    label, group = rng.integers(0, 6, n), rng.integers(-1, 4, n)
    vis = visible_points(px, py, depth, group, W, H, radius_px=2)
    for i in range(n):
        near = (np.abs(px - px[i]) <= 2) & (np.abs(py - py[i]) <= 2)
        nearest = np.full((H, W), np.inf)  # the z-buffer keeps one point per pixel: its nearest
        nearest_g = np.zeros((H, W), int)
        for j in np.flatnonzero(near)[np.argsort(-depth[near], kind="stable")]:
            nearest[py[j], px[j]], nearest_g[py[j], px[j]] = depth[j], group[j]
        lim = depth[i] - (0.3 + 0.05 * depth[i])
        hidden = (nearest < lim) & ((nearest_g != group[i]) | (group[i] == -1))
        assert vis[i] == (not hidden.any()), i
    img = densify_segments(px, py, depth, label, W, H, radius_px=3)
    yy, xx = np.mgrid[:H, :W]
    for y, x in zip(yy.ravel(), xx.ravel()):
        d2 = (px - x) ** 2 + (py - y) ** 2
        cand = np.flatnonzero(d2 <= 9)
        if len(cand) == 0:
            assert img[y, x] == 0
            continue
        best = cand[np.lexsort((label[cand], depth[cand], d2[cand]))[0]]  # nearest, then nearer depth
        assert img[y, x] == label[best], (y, x)
    with pytest.raises(ValueError, match="depths must be positive"):
        densify_segments(px, py, -depth, label, W, H)
    with pytest.raises(ValueError, match="radius_px must be in"):
        densify_segments(px, py, depth, label, W, H, radius_px=1000)


def test_segment_image_has_no_background_painted_through_a_foreground_object(street):
    cfg = ProposalsConfig()
    sw = sweep_segments(street["points"], street["ring"], cfg)
    K, T = analytic.camera()
    out = camera_segments(street["points"][:, :3], sw, K, T, 320, 160, cfg)
    ped = np.bincount(sw.segment_id[street["instance"] == 2]).argmax()
    car_behind = np.bincount(sw.segment_id[street["instance"] == 3]).argmax()
    # the pedestrian's bounding columns/rows in the image, from its exact box corners
    corners = np.array([[x, y, z] for x in (10.0, 10.6) for y in (2.0, 2.6) for z in (-1.8, 0.0)])
    u, v, _, _ = project_points(corners, K, T, 320, 160)
    inner = out["segment_ids"][int(v.min()) + 3:int(v.max()) - 2, int(u.min()) + 2:int(u.max()) - 1]
    assert (inner == ped).mean() >= 0.9 and not (inner == car_behind).any()
    assert out["n_visible"] < out["n_in_image"]
    assert set(out["seg_id"].tolist()) >= {ped, car_behind}
    assert out["ground_px"].sum() > 500 and out["ground_px"][:60].sum() == 0  # no ground above the horizon


def test_density_options_keep_every_nth_beam_and_a_random_fraction(street):
    keep, ring = density_mask(street["points"][:, :3], street["ring"], ProposalsConfig(beam_stride=2))
    assert set(np.unique(street["ring"][keep]) % 2) == {1} or set(np.unique(street["ring"][keep]) % 2) == {0}
    assert len(np.unique(street["ring"][keep])) == 16
    keep, _ = density_mask(street["points"][:, :3], None, ProposalsConfig(beam_stride=4, n_beams=32))
    assert 0.2 < keep.mean() < 0.3
    keep, _ = density_mask(street["points"][:, :3], street["ring"], ProposalsConfig(point_fraction=0.3), seed=3)
    assert abs(keep.mean() - 0.3) < 0.02
    sw = sweep_segments(street["points"], street["ring"], ProposalsConfig(point_fraction=0.3), seed=3)
    assert (sw.segment_id[~sw.use] == 0).all() and (~sw.ground[~sw.use]).all() and abs(sw.use.mean() - 0.3) < 0.02


# ---------------------------------------------------------------- synthetic source (exact per-point ground truth)
@pytest.fixture(scope="module")
def synthetic_frame():
    synthetic = pytest.importorskip("raydseg.data.sources.synthetic")
    from raydseg.config import load_config

    cfg = load_config(overrides=["synthetic.frames_per_sequence=1"]).synthetic
    shard = synthetic.list_shards(cfg, 0)[0]
    return synthetic.generate_sequence(shard, cfg)[0]


def test_synthetic_ground_purity_recall_and_image_agreement(synthetic_frame):
    from raydseg.data.schema import decode_image

    f = synthetic_frame
    cfg = ProposalsConfig()
    sw = sweep_segments(f["points"], f["ring"], cfg)
    gp, gr = quality.ground_precision_recall(sw.ground, f["gt_label"], sw.use)
    purity = quality.segment_purity(sw.segment_id, f["gt_label"], f["gt_instance"])
    recall, n_inst = quality.instance_recall(sw.segment_id, f["gt_instance"])
    cam = f["cameras"][0]
    out = camera_segments(f["points"][:, :3], sw, cam["K"], cam["T_cam_lidar"], cam["width"], cam["height"], cfg)
    agree, n_px = quality.image_agreement(out["segment_ids"], decode_image(cam["gt_instance"]))
    print(f"synthetic: ground P={gp:.3f} R={gr:.3f} purity={purity:.3f} instance recall={recall:.3f} "
          f"({n_inst} instances) image agreement={agree:.3f} over {n_px} px")
    assert gp >= 0.93 and gr >= 0.95
    assert purity >= 0.9
    assert n_inst >= 3 and recall >= 0.7
    assert n_px > 0.05 * cam["width"] * cam["height"] and agree >= 0.9


# ---------------------------------------------------------------- real KITTI sweeps
def test_real_kitti_sweep_projects_inside_the_image_with_plausible_segments(shared_data, tmp_path):
    from PIL import Image

    root = shared_data / "kitti_object_vis"
    meta = json.loads((root / "derived_frames.json").read_text())["frames"]["000001"]
    pts = np.fromfile(root / meta["cloud"], np.float32).reshape(-1, 4)
    K, T = np.array(meta["K"]), np.array(meta["T_cam2_lidar"])
    W, H = meta["image_size_wh"]
    cfg = ProposalsConfig(n_cols=2048)
    sw = sweep_segments(pts, None, cfg)
    u, v, z, inside = project_points(pts[:, :3], K, T, W, H)
    assert inside.sum() == pytest.approx(meta["points_in_image"], abs=50)  # the oracle counted with floor()
    assert np.all((u[inside] > -0.5) & (u[inside] < W - 0.5) & (v[inside] > -0.5) & (v[inside] < H - 0.5))
    out = camera_segments(pts[:, :3], sw, K, T, W, H, cfg)
    n_seg, cam_seg = int(sw.segment_id.max()), len(out["seg_id"])
    ground = sw.ground[sw.use].mean()
    cover = (out["segment_ids"] > 0).mean()
    print(f"KITTI 000001: {n_seg} segments, {cam_seg} in camera, ground {ground:.2f}, coverage {cover:.2f}")
    assert 20 <= n_seg <= 600 and 5 <= cam_seg <= 200
    assert 0.3 <= ground <= 0.8
    assert 0.05 <= cover <= 0.7
    assert out["ground_px"][: int(H * 0.3)].sum() < 0.01 * out["ground_px"].sum()  # ground below the horizon
    # the image's lower half is mostly road: ground hits there, segments nowhere near the bottom rows centre
    img = np.asarray(Image.open(root / meta["image"]).convert("RGB")).copy()
    seg = out["segment_ids"]
    rng = np.random.default_rng(0)
    palette = rng.integers(40, 255, (int(seg.max()) + 1, 3)).astype(np.uint8)
    m = seg > 0
    img[m] = (0.5 * img[m] + 0.5 * palette[seg[m]]).astype(np.uint8)
    img[out["ground_px"] > 0] = [255, 0, 255]
    Image.fromarray(img).save(tmp_path / "kitti_000001_segments.png")
    assert (tmp_path / "kitti_000001_segments.png").stat().st_size > 10_000


def test_ransac_ground_method_is_selectable_and_works_on_a_flat_street(street):
    sw = sweep_segments(street["points"], street["ring"], ProposalsConfig(ground_method="ransac"))
    p, r = quality.ground_precision_recall(sw.ground, _labels(street), sw.use)
    assert p >= 0.97 and r >= 0.99, (p, r)
    with pytest.raises(ValueError, match="ground_method\n  Input should be 'range_image' or 'ransac'"):
        ProposalsConfig(ground_method="flat")  # the config refuses it before any sweep
    with pytest.raises(ValueError, match="unknown ground method"):
        sweep_segments(street["points"], street["ring"], ProposalsConfig.model_construct(ground_method="flat"))


# ---------------------------------------------------------------- filled masks
def test_fill_masks_closes_gaps_inside_a_surface_and_stops_at_other_surfaces():
    G, U = 9, 10  # ground id, unsegmented id (segments are 1..8)
    img = np.zeros((40, 6), np.int32)
    img[[2, 3, 8, 9, 14, 15], 0] = 1  # a segment's scanlines 4 rows apart -> filled rows 2..15
    img[[2, 3, 8, 9], 1] = 1
    img[5, 1] = 2  # another segment between two rows of segment 1: an occlusion boundary, nothing filled
    img[[20, 35], 2] = G  # ground scanlines 14 rows apart, then the bottom rows below the lowest one
    img[[20, 27, 35], 3] = [G, 3, G]  # an obstacle between two ground scanlines: no ground over it
    img[[20, 35], 4] = U  # unsegmented points are never filled
    img[[2, 30], 5] = 1  # a gap longer than the limit stays empty
    out = fill_masks(img, G, seg_gap_px=6, ground_gap_px=16)
    assert (out[2:16, 0] == 1).all() and (out[16:, 0] == 0).all() and (out[:2, 0] == 0).all()
    assert (out[2:4, 1] == 1).all() and (out[8:10, 1] == 1).all() and (out[[4, 6, 7], 1] == 0).all()
    assert (out[20:, 2] == G).all() and (out[:20, 2] == 0).all()
    assert (out[21:27, 3] == 0).all() and (out[28:35, 3] == 0).all() and (out[35:, 3] == G).all()
    assert (out[21:35, 4] == 0).all() and (out[36:, 4] == 0).all()
    assert (out[3:30, 5] == 0).all()
    assert np.array_equal(fill_masks(img, G, 0, 0), img)  # both off: unchanged


def _pixel_truth(boxes, K, width, height, sensor_height=1.8, max_range=40.0):
    """Per-pixel analytic ground truth of analytic.camera(): -2 sky / beyond range, 0 ground, k = box k-1 + 1."""
    v, u = np.mgrid[:height, :width]
    rays_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u, float)], -1)
    d = rays_cam.reshape(-1, 3) @ analytic.R_CAM_LIDAR  # camera -> LiDAR axes (R is orthonormal)
    t = np.full(len(d), np.inf)
    inst = np.full(len(d), -2)
    down = d[:, 2] < -1e-9
    t[down] = -sensor_height / d[down, 2]
    inst[down] = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        for k, (lo, hi) in enumerate(boxes):
            t1, t2 = np.asarray(lo) / d, np.asarray(hi) / d
            tmin = np.nanmax(np.minimum(t1, t2), axis=1)
            tmax = np.nanmin(np.maximum(t1, t2), axis=1)
            hit = (tmax >= tmin) & (tmin > 0) & (tmin < t)
            t[hit], inst[hit] = tmin[hit], k + 1
    inst[np.linalg.norm(d, axis=1) * t > max_range] = -2
    return inst.reshape(height, width)


def test_filled_masks_cover_the_ground_between_scanlines_and_keep_segments_on_their_objects():
    # 16 beams seen by a 320x160 camera (focal 160): scanlines ~5 px apart on objects, far more on the near ground
    boxes = analytic.street_boxes()
    scene = analytic.raycast(boxes, beams=16, columns=1024, max_range=40.0)
    sw = sweep_segments(scene["points"], scene["ring"], ProposalsConfig(n_beams=16))
    K, T = analytic.camera()
    truth = _pixel_truth(boxes, K, 320, 160)
    box_of_seg = {s: np.bincount(scene["instance"][sw.segment_id == s]).argmax()
                  for s in np.unique(sw.segment_id[sw.segment_id > 0])}
    kw = dict(near=0.5, use=sw.use, radius_px=1)
    plain = project_segments(scene["points"][:, :3], sw.segment_id, sw.ground, K, T, 320, 160, **kw)
    filled = project_segments(scene["points"][:, :3], sw.segment_id, sw.ground, K, T, 320, 160, fill_gap_px=8,
                              ground_fill_px=48, **kw)

    def ground_recall_precision(g):
        g = g > 0
        return (g & (truth == 0)).sum() / (truth == 0).sum(), (g & (truth == 0)).sum() / g.sum()

    def seg_stats(seg):
        m = seg > 0
        owner = np.vectorize(lambda s: box_of_seg.get(s, -1))(seg[m])
        return m.sum(), (owner == truth[m]).mean()

    r0, p0 = ground_recall_precision(plain["ground_px"])
    r1, p1 = ground_recall_precision(filled["ground_px"])
    (n0, a0), (n1, a1) = seg_stats(plain["segment_ids"]), seg_stats(filled["segment_ids"])
    print(f"ground recall {r0:.3f} -> {r1:.3f}, precision {p0:.3f} -> {p1:.3f}; segment px {n0} -> {n1}, "
          f"agreement {a0:.3f} -> {a1:.3f}")
    assert r0 < 0.3 and r1 >= 0.85 and p1 >= 0.97  # the ground is filled between its scanlines, never over a box
    assert n1 >= 1.3 * n0 and a1 >= 0.95  # segment masks grow into filled silhouettes, still on their own box
    assert filled["n_pixels"][1:].sum() == (filled["segment_ids"] > 0).sum()


def test_sky_is_marked_above_each_columns_highest_return_and_below_the_top_beam_on_the_analytic_street():
    from raydseg.geometry.project import SKY_PX

    boxes = analytic.street_boxes()  # the far wall (25 m, 6 m tall) closes the street: above it is sky
    scene = analytic.raycast(boxes, beams=32, columns=1024, fov_up_deg=12.0, max_range=40.0)
    sw = sweep_segments(scene["points"], scene["ring"], ProposalsConfig(n_beams=32))
    K, T = analytic.camera()
    truth = _pixel_truth(boxes, K, 320, 160)
    kw = dict(near=0.5, use=sw.use, radius_px=2)
    off = project_segments(scene["points"][:, :3], sw.segment_id, sw.ground, K, T, 320, 160, **kw)
    on = project_segments(scene["points"][:, :3], sw.segment_id, sw.ground, K, T, 320, 160, sky_margin_deg=1.0, **kw)
    assert set(np.unique(off["ground_px"])) <= {0, 1}  # off by default: the ground mask as before
    assert np.array_equal(on["segment_ids"], off["segment_ids"])
    assert np.array_equal(on["ground_px"] == 1, off["ground_px"] == 1)
    sky = on["ground_px"] == SKY_PX
    v, u = np.mgrid[:160, :320]
    elevation = np.degrees(np.arctan2(K[1, 2] - v, np.hypot(K[0, 0], u - K[0, 2])))  # pinhole, level camera
    reachable = (truth == -2) & (elevation <= 12.0)  # sky the top beam could have seen
    precision, recall = (sky & (truth == -2)).sum() / sky.sum(), (sky & reachable).sum() / reachable.sum()
    print(f"sky: {sky.sum()} px, precision {precision:.3f}, recall within the LiDAR's field of view {recall:.3f}")
    assert precision >= 0.99 and recall >= 0.8
    assert not sky[elevation > 12.0 + 0.1].any()  # never above the top beam
    # sky_above_top_beam: the open columns' sky goes on above the top beam (the street's end is open)
    up = project_segments(scene["points"][:, :3], sw.segment_id, sw.ground, K, T, 320, 160, sky_margin_deg=1.0,
                          sky_above_top_beam=True, **kw)["ground_px"] == SKY_PX
    precision, recall = (up & (truth == -2)).sum() / up.sum(), (up & (truth == -2)).sum() / (truth == -2).sum()
    print(f"above the top beam too: {up.sum()} px, precision {precision:.3f}, recall of all sky {recall:.3f}")
    assert precision >= 0.99 and recall >= 0.8 and up[elevation > 12.0 + 0.1].sum() > 0.3 * up.sum()
    assert np.array_equal(up & (elevation <= 12.0 - 0.1), sky & (elevation <= 12.0 - 0.1))


def test_sky_pixels_need_a_return_near_the_column_and_keep_the_margin_above_it():
    from raydseg.geometry.sky import sky_pixels

    elevation = np.repeat(np.radians(np.linspace(20, -20, 41))[:, None], 6, axis=1)  # rows 1 degree apart
    px, py = np.array([1, 1]), np.array([30, 25])  # column 1: returns at -10 and -5 degrees
    sky = sky_pixels(elevation, px, py, np.radians(10.0), np.radians(2.0), column_radius=1)
    rows = np.flatnonzero(sky[:, 1])
    assert rows.min() == 10 and rows.max() == 22  # from the top beam (+10) down to -3 = -5 + the 2-degree margin
    assert sky[:, 0].tolist() == sky[:, 2].tolist() == sky[:, 1].tolist()  # neighbours within the column radius
    assert not sky[:, 3:].any()  # nothing known where no return is near
    px, py = np.array([1, 1, 5]), np.array([30, 25, 11])  # and column 5's highest return at +9 degrees
    up = sky_pixels(elevation, px, py, np.radians(10.0), np.radians(2.0), column_radius=1, above_top_beam=True)
    assert np.flatnonzero(up[:, 1]).tolist() == list(range(23))  # open: everything above -3 degrees
    assert not up[:, 3:].any()  # column 5's top beam hit something within the margin: a façade may go on above it


def test_pixel_elevation_inverts_the_lens_that_projects_points():
    from raydseg.geometry.sky import camera_elevation, pixel_elevation

    K, T = analytic.camera()
    T = T.copy()
    T[:3, :3] = T[:3, :3] @ np.array([[np.cos(0.2), -np.sin(0.2), 0], [np.sin(0.2), np.cos(0.2), 0], [0, 0, 1]])
    lens = np.array([-0.25, 0.08, 0.001, -0.0015, -0.01])  # a wide-angle lens
    rng = np.random.default_rng(0)
    el, az = rng.uniform(-0.35, 0.35, 400), rng.uniform(-0.4, 0.8, 400)
    xyz = 500.0 * np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], 1)
    for distortion in (None, lens):
        u, v, _, inside = project_points(xyz, K, T, 320, 160, distortion=distortion)
        # round the projection into pixel i at coordinate i (project_points' convention) at 500 m: translation-free
        c, r = np.floor(u[inside] + 0.5).astype(int), np.floor(v[inside] + 0.5).astype(int)
        grid = pixel_elevation(K, T, 320, 160, distortion)
        err = np.abs(grid[r, c] - el[inside])
        assert inside.sum() > 100 and err.max() < np.radians(0.4)  # within a pixel (0.36 degrees at f = 160)
        assert np.array_equal(camera_elevation(K, T, 320, 160, distortion), grid)
