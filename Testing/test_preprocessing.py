"""Normalisation is robust to lesion load and to a skull; post-processing rules do what they say."""

from __future__ import annotations

import numpy as np
import pytest

from DeepWMLLib.postprocessing import exclude_edge_slices, postprocess, remove_small_components
from DeepWMLLib.preprocessing import PreprocessingConfig, head_mask, normalise_intensity


def phantom(lesion_fraction=0.0, skull=False, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(20), np.arange(96), np.arange(96), indexing="ij")
    r = np.sqrt((y - 48) ** 2 + (x - 48) ** 2)
    vol = np.full(r.shape, 10.0)
    brain = r < 36
    vol[brain] = 400 + rng.normal(0, 20, brain.sum())
    if skull:
        vol[(r >= 38) & (r < 41)] = 800  # scalp fat: bright on FLAIR
        vol[(r >= 36) & (r < 38)] = 60  # bone: dark
    if lesion_fraction:
        lesion = brain & (rng.random(r.shape) < lesion_fraction)
        vol[lesion] = 900
    return vol * scale


def test_normalised_brain_level_barely_moves_with_lesion_load():
    base = normalise_intensity(phantom())
    heavy = normalise_intensity(phantom(lesion_fraction=0.05))
    brain = np.sqrt((np.arange(96)[:, None] - 48) ** 2 + (np.arange(96)[None] - 48) ** 2) < 30
    assert abs(np.median(base[:, brain]) - np.median(heavy[:, brain])) < 0.2


def test_normalised_brain_level_barely_moves_with_skull():
    stripped = normalise_intensity(phantom())
    with_skull = normalise_intensity(phantom(skull=True))
    brain = np.sqrt((np.arange(96)[:, None] - 48) ** 2 + (np.arange(96)[None] - 48) ** 2) < 30
    assert abs(np.median(stripped[:, brain]) - np.median(with_skull[:, brain])) < 0.3


def test_normalisation_is_scale_invariant_and_bounded():
    a = normalise_intensity(phantom(lesion_fraction=0.01))
    b = normalise_intensity(phantom(lesion_fraction=0.01, scale=37.5))
    assert np.allclose(a, b, atol=1e-3)
    assert a.dtype == np.float32 and a.min() >= -8 and a.max() <= 16


def test_head_mask_ignores_background():
    vol = phantom(skull=True)
    mask = head_mask(vol)
    assert not mask[:, :5, :5].any()
    assert mask[:, 48, 48].all()


@pytest.mark.parametrize("where", ["padded rows", "padded slice", "one stray voxel"])
def test_head_mask_and_normalisation_ignore_values_far_below_the_scan(where):
    """Reslice padding (-32768) or one voxel far below the rest must not squeeze the scan into the top
    of the threshold's histogram: the head mask and the normalised head stay as without them."""
    vol = phantom(skull=True)
    odd = vol.copy()
    if where == "padded rows":
        odd[:, :6, :] = -32768
    elif where == "padded slice":
        odd[0] = -32768
    else:
        odd[3, 2, 2] = -1e5
    touched = odd != vol
    expected = head_mask(vol)
    assert np.array_equal(head_mask(odd)[~touched], expected[~touched])
    np.testing.assert_allclose(normalise_intensity(odd)[~touched], normalise_intensity(vol)[~touched], atol=0.05)


def test_preprocessing_config_validation():
    assert PreprocessingConfig.from_dict({"grid_size": [128, 128], "grid_spacing_mm": None}).grid_spacing_mm is None
    with pytest.raises(ValueError):
        PreprocessingConfig.from_dict({"grid_size": [8, 8]})
    with pytest.raises(ValueError):
        PreprocessingConfig.from_dict({"colour": "blue"})


def test_small_components_removed_by_volume():
    mask = np.zeros((5, 20, 20), np.uint8)
    mask[2, 2:4, 2:4] = 1  # 4 voxels
    mask[1:4, 10:15, 10:15] = 1  # 75 voxels
    kept = remove_small_components(mask, voxel_volume_mm3=2.0, min_volume_mm3=10.0)
    assert kept[2, 2:4, 2:4].sum() == 0 and kept.sum() == 75


def test_minimum_lesion_size_is_in_mm3_and_inclusive():
    """0.5 mm3 voxels and a 5 mm3 minimum: 10 voxels are 5.0 mm3, kept (the bound is inclusive); 9 voxels are
    4.5 mm3, removed. Counting voxels instead of mm3 would keep both (9 >= 5)."""
    mask = np.zeros((3, 12, 12), np.uint8)
    mask[1, 1, 0:10] = 1  # 10 voxels: 5.0 mm3
    mask[1, 8, 0:9] = 1  # 9 voxels: 4.5 mm3
    kept = remove_small_components(mask, voxel_volume_mm3=0.5, min_volume_mm3=5.0)
    assert kept[1, 1].sum() == 10 and kept[1, 8].sum() == 0 and kept.sum() == 10


def test_diagonal_voxels_are_one_lesion():
    mask = np.zeros((3, 3, 3), np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = 1  # 26-connected
    assert remove_small_components(mask, 1.0, 3.0).sum() == 3


def test_edge_slices_excluded_only_when_asked():
    mask = np.ones((10, 4, 4), np.uint8)
    assert exclude_edge_slices(mask, 0.0).sum() == 160
    out = exclude_edge_slices(mask, 0.1)
    assert out[0].sum() == 0 and out[-1].sum() == 0 and out[1:-1].all()


@pytest.mark.parametrize("slices,fraction,cleared", [(100, 0.29, 29), (180, 0.35, 63), (200, 0.145, 29), (9, 0.2, 1)])
def test_edge_slices_count_is_the_decimal_product_rounded_down(slices, fraction, cleared):
    """0.29 of 100 slices cleared 28 at each end, not 29: in binary 100 * 0.29 is 28.999999999999996."""
    out = exclude_edge_slices(np.ones((slices, 2, 2), np.uint8), fraction)
    assert out[:cleared].sum() == 0 and out[-cleared:].sum() == 0
    assert out[cleared:-cleared].all()


def test_threshold_applies():
    prob = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10)
    assert postprocess(prob, 0.5, 1.0, 0.0).sum() == 500
    with pytest.raises(ValueError):
        postprocess(prob, 1.5, 1.0)


def test_a_probability_equal_to_the_threshold_is_lesion():
    """The mask is probability >= threshold: a float32 sigmoid of logit 0 is exactly 0.5 and is lesion; the float32
    just below it is not. The same holds for the brain mask's probability at BRAIN_THRESHOLD (0.5): a lesion whose
    voxels all have brain probability exactly 0.5 is inside and stays."""
    prob = np.zeros((3, 4, 4), np.float32)
    prob[1, 1, 1] = 0.5
    prob[1, 2, 3] = np.nextafter(np.float32(0.5), np.float32(0))
    mask = postprocess(prob, 0.5, 1.0, 0.0)
    assert mask[1, 1, 1] == 1 and mask.sum() == 1
    brain = np.full(prob.shape, 0.5, np.float32)
    assert postprocess(prob, 0.5, 1.0, 0.0, brain_probabilities=brain).sum() == 1


def test_edge_slices_are_cleared_before_small_lesions_are_removed():
    """Post-processing clears the edge slices first, then removes lesions under the minimum size: a 6-voxel lesion
    (1 mm3 voxels) with 4 voxels on the first of 10 slices keeps 2 voxels after the edge rule (0.1: slices 0 and 9),
    under the 5 mm3 minimum, so nothing is left (the other order left those 2 voxels as a lesion)."""
    prob = np.zeros((10, 4, 4), np.float32)
    prob[0, 0, 0:4] = 0.9
    prob[1, 1, 0:2] = 0.9
    assert postprocess(prob, 0.5, 1.0, 5.0, exclude_edge_fraction=0.1).sum() == 0


def _scipy_to_network(grid, stack):
    from scipy import ndimage

    cval = stack.reshape(stack.shape[0], -1).min(axis=1)
    sigma = [0.0] + [0.5 * np.sqrt(z * z - 1) if z > 1.2 else 0.0 for z in grid.zoom]
    if max(sigma) > 0:
        stack = ndimage.gaussian_filter(stack, sigma, mode="nearest")
    return np.stack([ndimage.affine_transform(s, grid.zoom, offset=grid.offset, output_shape=grid.grid_size, order=1,
                                              mode="constant", cval=float(c), prefilter=False)
                     for s, c in zip(stack, cval)])


def _scipy_to_input(grid, stack):
    from scipy import ndimage

    zoom = 1.0 / np.array(grid.zoom)
    offset = -np.array(grid.offset) * zoom
    return np.stack([ndimage.affine_transform(s, zoom, offset=offset, output_shape=grid.input_shape, order=1,
                                              mode="constant", cval=0.0, prefilter=False) for s in stack])


@pytest.mark.parametrize("seed", range(6))
def test_network_grid_resampling_matches_scipy_ndimage(seed):
    """The gather-based resampler samples exactly as ndimage.affine_transform (linear, constant
    outside) after ndimage.gaussian_filter: shrinking, enlarging, anisotropic, off-centre."""
    from DeepWMLLib.preprocessing import NetworkGrid

    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(40, 160, 2))
    zoom = tuple(float(v) for v in rng.uniform(0.5, 2.6, 2))
    grid_size = (64, 48)
    offset = tuple(float(v) for v in rng.uniform(-30, 30, 2))
    grid = NetworkGrid(shape, grid_size, zoom, offset)
    stack = rng.normal(100, 30, (3,) + shape).astype(np.float32)
    np.testing.assert_allclose(grid.to_network(stack), _scipy_to_network(grid, stack), atol=1e-3)
    maps = rng.random((3,) + grid_size).astype(np.float32)
    np.testing.assert_allclose(grid.to_input(maps), _scipy_to_input(grid, maps), atol=1e-5)


def test_lesion_labels_match_scipy_ndimage():
    from scipy import ndimage

    from DeepWMLLib.postprocessing import label_components

    rng = np.random.default_rng(3)
    for density in (0.05, 0.2, 0.4):
        mask = rng.random((12, 40, 36)) < density
        expected, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        labels, n = label_components(mask)
        assert n == count and np.array_equal(labels, expected)
    assert label_components(np.zeros((2, 5, 5), bool))[1] == 0
    full = label_components(np.ones((3, 4, 5), bool))
    assert full[1] == 1 and np.all(full[0] == 1)
    corners = np.zeros((4, 5, 6), bool)
    corners[0, 0, 0] = corners[-1, -1, -1] = corners[1, 1, 1] = True  # the first two touch diagonally
    labels, n = label_components(corners)
    assert n == 2 and labels[0, 0, 0] == labels[1, 1, 1] == 1 and labels[-1, -1, -1] == 2


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 12345])
def test_percentiles_match_numpy(n):
    from DeepWMLLib.preprocessing import percentiles

    rng = np.random.default_rng(n)
    for dtype in (np.float32, np.uint16, np.float64):
        values = (rng.random(n) * 3000).astype(dtype)
        for q in ([25, 50, 75], [99.5], [0, 100], [1, 99]):
            assert np.allclose(percentiles(values, q), np.percentile(values, q), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["noise", "air at 0", "a few values", "periodic at the sample's stride", "NaN"])
def test_tail_percentiles_are_percentiles_to_the_bit(kind):
    """The image's black and top, each tail sorted alone: the same numbers on ties (a scan's air, half of it 0), on
    values whose sample misses the tail (periodic at TAIL_STRIDE), on NaN (sorted last) and in the middle."""
    from DeepWMLLib.preprocessing import TAIL_STRIDE, percentiles, tail_percentiles

    rng = np.random.default_rng(7)
    for n in (1, 2, 5, 300, 20000):
        values = {"noise": rng.normal(300, 80, n).astype(np.float32),
                  "air at 0": np.where(rng.random(n) < 0.55, 0, rng.integers(1, 300, n)).astype(np.float32),
                  "a few values": rng.integers(0, 4, n).astype(np.uint16),
                  "periodic at the sample's stride": (np.arange(n) % TAIL_STRIDE).astype(np.float64),
                  "NaN": np.where(rng.random(n) < 0.02, np.nan, rng.normal(size=n))}[kind]
        before = values.copy()
        for q in ([0.5, 99.5], [0.5], [99.5], [0, 100], [0.01, 99.99], [25, 50, 75]):
            assert np.array_equal(tail_percentiles(values, q), percentiles(values, q), equal_nan=True), (n, q)
        assert np.array_equal(values, before, equal_nan=True)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 12345])
def test_median_is_numpy_s_to_the_bit(n):
    """The FLAIR check's white matter level: np.median's very number and type (a float32 scan's median of two
    middle values is their float32 mean), and NaN where a value is NaN, without np.median's import of numpy.ma."""
    from DeepWMLLib.preprocessing import median

    rng = np.random.default_rng(n)
    for dtype in (np.float32, np.float64, np.float16, np.uint16, np.int16, np.uint8):
        values = (rng.normal(300, 200, n) if np.dtype(dtype).kind in "fi" else rng.random(n) * 250).astype(dtype)
        for given in (values, values.reshape(1, -1)):
            found, expected = median(given), np.median(given)
            assert found == expected and type(found) is type(expected), (dtype, found, expected)
        if np.dtype(dtype).kind == "f":
            values[n // 2] = np.nan
            assert np.isnan(median(values)) and np.isnan(np.median(values))


def test_index_percentiles_match_numpy_on_repeated_indices():
    from DeepWMLLib.preprocessing import _index_percentiles

    rng = np.random.default_rng(1)
    for _ in range(100):
        counts = rng.integers(0, 6, size=int(rng.integers(1, 50)))
        counts[rng.integers(counts.size)] += 1
        for q in ([1, 99], [0, 100], [50]):
            assert np.allclose(_index_percentiles(counts, q), np.percentile(np.repeat(np.arange(counts.size), counts), q))


def test_volume_plan_does_not_depend_on_the_order_the_file_stores_its_slices_in():
    """Large volumes are subsampled for the head mask and the normalisation statistics; a scan stored
    superior to inferior must still get the statistics of the same scan stored the other way."""
    import SimpleITK as sitk

    from DeepWMLLib import io
    from DeepWMLLib.preprocessing import plan_volume

    rng = np.random.default_rng(3)
    z, y, x = np.mgrid[:100, :200, :200]
    head = ((x - 100) / 98.0) ** 2 + ((y - 100) / 98.0) ** 2 + ((z - 50) / 60.0) ** 2 < 1  # 2.2 M voxels
    array = np.where(head, 100 + 30 * np.sin(z / 3.0) + rng.normal(0, 15, head.shape), rng.normal(5, 3, head.shape))
    image = sitk.GetImageFromArray(array.astype(np.float32))  # 4 M voxels: both subsampled
    image.SetSpacing((0.9, 0.9, 1.5))
    upside_down = sitk.DICOMOrient(image, "LPI")
    plans = []
    for volume in (image, upside_down):
        stack, frame = io.to_axial_stack(volume)
        plans.append((stack, frame, plan_volume(stack, frame, [PreprocessingConfig()])))
    (stack_a, _, a), (stack_b, frame_b, b) = plans
    assert frame_b.n_slices == 100 and np.array_equal(stack_a, stack_b[::-1])
    assert (a.centre, a.scale, a.head_voxels) == (b.centre, b.scale, b.head_voxels)
    assert np.array_equal(np.sort(100 - 1 - b.kept), a.kept)


def _head_with_body_below(body_slices: int, seed: int = 5):
    """A 150 mm tall head (3 mm slices, 4 mm pixels, 480 mm field of view) and, below it, `body_slices`: the upper
    half air (where the neck would be), the lower half bright, 450 mm wide soft tissue (shoulders), as a
    large-coverage scan has; the head's voxels are the same."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:50, :120, :120]
    head = ((x - 60) / 20.0) ** 2 + ((y - 60) / 24.0) ** 2 + ((z - 25) / 26.0) ** 2 < 1
    array = np.where(head, 300 + 60 * np.sin(x / 3.0) + rng.normal(0, 20, head.shape), rng.normal(5, 3, head.shape))
    if body_slices:
        yy, xx = np.mgrid[:120, :120]
        shoulders = ((xx - 60) / 56.0) ** 2 + ((yy - 62) / 25.0) ** 2 < 1
        body = np.where(shoulders, 600 + rng.normal(0, 40, (body_slices, 120, 120)), rng.normal(5, 3, (body_slices, 120, 120)))
        body[body_slices // 2:] = rng.normal(5, 3, (body_slices - body_slices // 2, 120, 120))
        array = np.concatenate([body, array])
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((4.0, 4.0, 3.0))
    image.SetOrigin((0.0, 0.0, -3.0 * body_slices))  # the head where it is without the body below
    return image


def test_neck_and_shoulders_below_the_head_change_neither_the_normalisation_nor_the_grid():
    """A scan reaching 200 mm and more below the top of the head (the neck and shoulders of a sagittal 3D FLAIR)
    is normalised as the head alone and its network grid centred on the head; the slices that far below are not
    segmented. Before, the shoulders' bright soft tissue joined the head mask: other statistics, a shifted grid."""
    from DeepWMLLib import io
    from DeepWMLLib.preprocessing import plan_volume

    config = PreprocessingConfig()
    alone, with_body = (plan_volume(*io.to_axial_stack(_head_with_body_below(n)), [config]) for n in (0, 40))
    # the same within the few per cent that more background slices move the head mask's threshold (before: 93 %)
    assert with_body.centre == pytest.approx(alone.centre, rel=0.02)
    assert with_body.scale == pytest.approx(alone.scale, rel=0.02)
    assert with_body.head_voxels == pytest.approx(alone.head_voxels, rel=0.02)
    top = 40 + alone.kept.max()  # the head's highest slice, in the scan with the body below
    assert top - 200 // 3 == 23 and with_body.below_head == 20  # slices 0..22 left out: the shoulders' 0..19 told
    assert np.array_equal(with_body.kept, alone.kept + 40)  # the head's slices segmented, no other
    grid_a, grid_b = alone.grids[config], with_body.grids[config]
    assert np.allclose(grid_a.offset, grid_b.offset, atol=0.5) and grid_a.zoom == grid_b.zoom
    # a head alone, however tall its scan's coverage above it, loses no slice
    assert alone.below_head == 0 and alone.kept.size == 50


def test_segment_says_when_slices_below_the_head_were_not_segmented(monkeypatch):
    """The warning comes from the plan of the volume (which slices are the head's), not from the network's marks:
    the shipped model's plan with its network replaced by 'bright means lesion' (conftest.oracle_network; the
    network itself on 90 slices of a 480 mm field of view was most of this test's 40 s)."""
    from conftest import oracle_network

    from DeepWMLLib.segment import segment_image

    oracle_network(monkeypatch)
    warnings = segment_image(_head_with_body_below(40), brain_model=None, ventricle_model=None).report["warnings"]
    assert any("the scan reaches below the head: 20 axial slices, more than 200 mm below the top of the head"
               in w for w in warnings), warnings
    assert not any("below the head" in w for w in segment_image(_head_with_body_below(0), brain_model=None,
                                                                 ventricle_model=None).report["warnings"])


def test_empty_slices_below_the_head_are_not_said_to_be_left_out(monkeypatch):
    """A volume padded with empty slices far below the head (a 256 mm cube that a conformed or template-space
    FLAIR comes in) holds no neck or shoulders: nothing was left out of the segmentation or the normalisation, and
    no warning says so. (The shipped model's plan, its network replaced by conftest.oracle_network: the warning
    comes from the plan.)"""
    import SimpleITK as sitk
    from conftest import oracle_network

    from DeepWMLLib.segment import segment_image

    oracle_network(monkeypatch)
    padded = sitk.ConstantPad(_head_with_body_below(0), [0, 0, 40], [0, 0, 0], 5.0)  # 120 mm of air below
    warnings = segment_image(padded, brain_model=None, ventricle_model=None).report["warnings"]
    assert not any("below the head" in w for w in warnings), warnings


@pytest.mark.parametrize("flip", [False, True])
def test_a_scan_cropped_on_its_own_voxel_grid_is_sampled_at_the_same_points_of_the_head(flip):
    """The network grid's pixels fall on the same points in space for a scan and the same scan cropped on its own
    voxel grid (the field of view cut through the head at two sides, slices dropped): the network sees the same
    head sampled alike. Before, the grid followed the head's centre to a fraction of a pixel, and the
    network's marks change with that sub-pixel phase (Dice 0.87-0.89 on real scans)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(7)
    z, y, x = np.mgrid[:12, :300, :300]
    head = ((x - 141.3) / 100.0) ** 2 + ((y - 152.6) / 125.0) ** 2 < 1
    array = np.where(head, 300 + rng.normal(0, 20, head.shape), rng.normal(5, 3, head.shape)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.72, 0.72, 3.0))
    image.SetOrigin((-101.17, -93.87, -20.0))  # the head's centre 0.57 mm and 16.0 mm from the scanner's 0
    if flip:  # stored RAS-like: rows and columns run the other way in the file
        image = sitk.Flip(image, [True, True, False])
    cropped = image[46:, :272, 2:]  # 3.6 mm of the head cut off at one side, 4 mm at another, 2 slices dropped
    config = PreprocessingConfig()

    assert np.allclose(_network_points(image, config), _network_points(cropped, config), atol=1e-6)


def _network_points(volume, config, pixels=(0, 255)):
    """Where network pixels (k, k) for k in `pixels` lie in the scanner's space, from the grid of the volume's plan:
    in mm along the file's in-plane axes (which a crop leaves as they are); not along the slices' normal, which
    a slice dropped moves."""
    from DeepWMLLib import io
    from DeepWMLLib.preprocessing import plan_volume

    stack, frame = io.to_axial_stack(volume)
    grid = plan_volume(stack, frame, [config]).grids[config]
    in_plane = np.array(volume.GetDirection()).reshape(3, 3)[:, [frame.row_axis, frame.col_axis]]
    found = []
    for k in pixels:
        row, col = (grid.offset[i] + k * grid.zoom[i] for i in (0, 1))
        index = [0.0, 0.0, 0.0]
        index[frame.row_axis] = frame.size[frame.row_axis] - 1 - row if frame.flip_row else row
        index[frame.col_axis] = frame.size[frame.col_axis] - 1 - col if frame.flip_col else col
        found.append(np.array(volume.TransformContinuousIndexToPhysicalPoint(index)) @ in_plane)
    return np.array(found)


@pytest.mark.parametrize("cut", range(0, 40, 4))
def test_a_crop_that_moves_the_grid_to_another_lattice_point_samples_the_same_points(cut):
    """A crop that cuts through the head moves its centre, at times past half a lattice step: the grid then sits
    one step over, and its pixels must still fall on the points the uncropped scan's grid samples (a shift by
    whole network pixels, as many as the U-Net's poolings span), or the network sees the head at another
    sub-pixel phase and marks other lesions (Dice 0.81 for the 8.9 pixels an 8 mm step moved it by). A sagittal
    scan stored as the file's slices, oblique, with its rows and columns each run the other way."""
    import SimpleITK as sitk

    from DeepWMLLib.preprocessing import grid_centre_step_mm

    rng = np.random.default_rng(3)
    k, j, i = np.mgrid[:150, :160, :20]  # numpy (k, j, i): i runs left-right across 20 sagittal slices
    head = ((j - 80) / 70.0) ** 2 + ((k - 75) / 60.0) ** 2 < 1
    array = np.where(head, 300 + rng.normal(0, 20, head.shape), rng.normal(5, 3, head.shape)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((4.0, 1.1, 0.8))
    tilt = np.deg2rad(12)
    # file axis 0 (i) runs towards the patient's right, 1 (j) anterior, 2 (k) superior, tilted 12 degrees
    direction = np.array([[-1, 0, 0], [0, -np.cos(tilt), np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]]).T
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin((37.3, 81.9, -52.6))
    config = PreprocessingConfig()
    cropped = image[:, cut:, :]  # the field of view cut through the back of the head
    whole, part = _network_points(image, config), _network_points(cropped, config)
    steps = (part - whole) / grid_centre_step_mm(config.grid_spacing_mm)
    assert np.allclose(steps, np.round(steps), atol=1e-6), steps


@pytest.mark.parametrize("spacing_mm, grid", [(0.9, 256), (1.8, 128)])
def test_the_grid_stays_within_half_a_lattice_step_of_15_mm_of_the_heads_centre(spacing_mm, grid):
    """The brain-mask and ventricle networks' grids (128 pixels of 1.8 mm) took the lesion network's 16-pixel step,
    28.8 mm there: their grid lay up to 14.4 mm off the head's centre, and the ventricle network marked 6-22 % less of
    the labelled cases' ventricles. Each grid's centre now lies within 7.5 mm of the head's, in both axes, and
    still on whole pixels of one lattice (the crop test above)."""
    import SimpleITK as sitk

    config = PreprocessingConfig(grid_size=(grid, grid), grid_spacing_mm=spacing_mm)
    k, j, i = np.mgrid[:6, :200, :200]
    for shift in np.linspace(0, 30, 13):  # the head's centre moved across a whole step of either lattice
        head = ((i - 100 - shift / 1.0) / 70.0) ** 2 + ((j - 100 - shift / 1.0) / 80.0) ** 2 < 1
        image = sitk.GetImageFromArray(np.where(head, 300.0, 5.0).astype(np.float32))
        image.SetSpacing((1.0, 1.0, 5.0))
        ends = _network_points(image, config, pixels=(0, grid - 1))
        centre = ends.mean(axis=0)  # mm along the file's i and j axes (identity direction, origin 0)
        assert np.all(np.abs(centre - (99.5 + shift)) <= 7.5 + 0.5), (shift, centre)


def test_thresholds_and_fractions_outside_their_ranges_are_refused():
    """The probability threshold is in (0, 1): at 0 every voxel of the scan would be lesion, at 1 none. The edge
    fraction is in [0, 0.5): at 0.5 both ends' halves meet and the whole mask is cleared (10 slices: 5 + 5)."""
    prob = np.full((10, 2, 2), 0.7, np.float32)
    for threshold in (0.0, 1.0):
        with pytest.raises(ValueError, match="threshold"):
            postprocess(prob, threshold, 1.0, 0.0)
    with pytest.raises(ValueError, match="edge-slice fraction"):
        exclude_edge_slices(np.ones((10, 2, 2), np.uint8), 0.5)
    assert exclude_edge_slices(np.ones((10, 2, 2), np.uint8), 0.49).sum() == 2 * 4  # 4 cleared at each end
