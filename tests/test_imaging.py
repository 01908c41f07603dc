"""Tests for mammo_ray.imaging: decoding of real DICOM test files, the PS3.3 C.11 LUT pipeline, breast crop,
orientation, resizing and the degenerate inputs (1 pixel, all black, truncated and non-image files)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels import pixel_array

from mammo_ray import imaging
from mammo_ray.imaging import ImageReadError, Provenance

SIZE = (256, 128)

# The MG1 film (4664×3064, left MLO, chest wall on the left edge). Looked at by eye: the "L MLO" film label sits
# at about rows 220-720, columns 2320-2840, and a black redaction bar at rows 1600-2540, columns 2780-3000. The
# breast runs from the left edge to the nipple at about column 2060.
MG1_LABEL_BOX = (220, 2320, 720, 2840)  # y0, x0, y1, x1
MG1_NIPPLE_X = 2000


@pytest.fixture(scope="session")
def mg1(testdata: Path) -> tuple[np.ndarray, Dataset]:
    """The real mammogram, decoded once (about 0.5 s) for every test that needs it."""
    return imaging.decode(testdata / "MG1_J2KI.dcm")


def _pipeline_01(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    values, _ = imaging.apply_modality_lut(pixels, ds)
    values01, _ = imaging.apply_voi(values, ds)
    return imaging.invert_if_monochrome1(values01, ds.PhotometricInterpretation)[0]


# ----------------------------------------------------------------------------------------------------------------
# Every test data file decodes, or fails, as its README says
# ----------------------------------------------------------------------------------------------------------------

DECODABLE = [
    # file, shape, photometric, modality LUT, VOI, inverted
    ("JPEG-LL.dcm", (1024, 256), "MONOCHROME2", "none", "percentile_fallback", False),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", (768, 1024), "MONOCHROME2", "none", "window", False),
    ("MR_small_jpeg_ls_lossless.dcm", (64, 64), "MONOCHROME2", "none", "window", False),
    ("RG1_J2KI.dcm", (1955, 1841), "MONOCHROME1", "none", "window", True),
    ("RG3_J2KR.dcm", (1760, 1760), "MONOCHROME1", "none", "window", True),
    ("mlut_18.dcm", (512, 512), "MONOCHROME2", "sequence", "percentile_fallback", False),
    ("vlut_04.dcm", (512, 512), "MONOCHROME2", "none", "voi_lut_sequence", False),
    ("MG_synthetic_pixelspacing_testobject.dcm", (512, 512), "MONOCHROME2", "rescale", "window", False),
]


@pytest.mark.parametrize(("name", "shape", "photometric", "modality_lut", "voi", "inverted"), DECODABLE)
def test_testdata_file_preprocesses(testdata, name, shape, photometric, modality_lut, voi, inverted):
    out, prov = imaging.preprocess_file(testdata / name, SIZE)
    assert out.shape == SIZE and out.dtype == np.uint16
    assert out.max() > out.min()
    assert (prov.source_format, prov.photometric, prov.modality_lut, prov.voi, prov.inverted) == (
        "dicom",
        photometric,
        modality_lut,
        voi,
        inverted,
    )
    assert (prov.original_height, prov.original_width) == shape


@pytest.mark.parametrize(
    "name",
    # Lossless syntaxes: every installed plugin must give the same pixels (JPEG Lossless, JPEG-LS, J2K lossless).
    ["JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "MR_small_jpeg_ls_lossless.dcm", "RG3_J2KR.dcm"],
)
def test_lossless_files_decode_identically_with_every_plugin(testdata, name):
    pixels, _ = imaging.decode(testdata / name)
    for plugin in ("gdcm", "pylibjpeg"):
        np.testing.assert_array_equal(pixel_array(testdata / name, decoding_plugin=plugin), pixels)


def test_every_testdata_file_is_covered(testdata):
    covered = {row[0] for row in DECODABLE} | {"MG1_J2KI.dcm", "MG1_JPLY.dcm"}
    assert {path.name for path in testdata.glob("*.dcm")} == covered


def test_real_mammogram_decodes(mg1):
    pixels, ds = mg1
    assert pixels.shape == (4664, 3064) and pixels.dtype == np.uint16
    assert pixels.max() <= 4095  # 12 bits stored
    assert ds.Laterality == "L"


def test_malformed_jpeg_raises_image_read_error(testdata):
    path = testdata / "MG1_JPLY.dcm"
    with pytest.raises(ImageReadError) as info:
        imaging.preprocess_file(path, SIZE)
    assert info.value.path == str(path)
    assert "MG1_JPLY.dcm" in str(info.value)
    assert "decode" in info.value.reason and "\n" not in info.value.reason


def test_synthetic_mg_object_reads_as_mg_with_pixel_spacing(testdata):
    _, ds = imaging.decode(testdata / "MG_synthetic_pixelspacing_testobject.dcm")
    assert ds.Modality == "MG"
    assert "PixelSpacing" in ds or "ImagerPixelSpacing" in ds


# ----------------------------------------------------------------------------------------------------------------
# LUT pipeline on the real LUT test objects
# ----------------------------------------------------------------------------------------------------------------


def test_voi_lut_sequence_is_applied(testdata):
    pixels, ds = imaging.decode(testdata / "vlut_04.dcm")
    values, modality = imaging.apply_modality_lut(pixels, ds)
    out, voi = imaging.apply_voi(values, ds)
    assert (modality, voi) == ("none", "voi_lut_sequence")
    item = ds.VOILUTSequence[0]
    first_mapped, bits = item.LUTDescriptor[1], item.LUTDescriptor[2]
    table = np.asarray(item.LUTData, dtype=np.float64)
    expected = table[np.clip(pixels.astype(int) - first_mapped, 0, table.size - 1)] / (2**bits - 1)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_modality_lut_sequence_is_applied(testdata):
    pixels, ds = imaging.decode(testdata / "mlut_18.dcm")
    values, modality = imaging.apply_modality_lut(pixels, ds)
    assert modality == "sequence" and values.dtype == np.float32
    item = ds.ModalityLUTSequence[0]
    first_mapped = item.LUTDescriptor[1]
    assert first_mapped < 0  # signed first mapped value (-2048): the index must account for it
    table = np.asarray(item.LUTData, dtype=np.float64)
    expected = table[np.clip(pixels.astype(int) - first_mapped, 0, table.size - 1)]
    np.testing.assert_array_equal(values, expected)


@pytest.mark.parametrize(
    ("name", "dark_region", "bright_region"),
    [
        # chest CR: lung field (dark) against the spine/mediastinum (bright); regions as fractions (rows, cols)
        ("RG1_J2KI.dcm", ((0.25, 0.40), (0.22, 0.32)), ((0.35, 0.60), (0.46, 0.52))),
        # tibia CR: air inside the collimated field (dark) against the tibial shaft (bright)
        ("RG3_J2KR.dcm", ((0.10, 0.40), (0.27, 0.31)), ((0.10, 0.40), (0.47, 0.51))),
    ],
)
def test_monochrome1_is_inverted_so_anatomy_is_bright(testdata, name, dark_region, bright_region):
    pixels, ds = imaging.decode(testdata / name)
    img01 = _pipeline_01(pixels, ds)
    height, width = img01.shape

    def mean(array, region):
        (y0, y1), (x0, x1) = region
        return float(array[int(y0 * height) : int(y1 * height), int(x0 * width) : int(x1 * width)].mean())

    assert mean(pixels, dark_region) > mean(pixels, bright_region)  # stored MONOCHROME1: bone has low values
    assert mean(img01, bright_region) > mean(img01, dark_region) + 0.2


@pytest.mark.parametrize(
    ("photometric", "inverted"),
    [("MONOCHROME1", True), (" monochrome1 ", True), ("MONOCHROME2", False), ("PNG16", False), (None, False)],
)
def test_invert_if_monochrome1(photometric, inverted):
    values = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    out, done = imaging.invert_if_monochrome1(values, photometric)
    assert done is inverted
    np.testing.assert_allclose(out, 1 - values if inverted else values)


# ----------------------------------------------------------------------------------------------------------------
# Windowing (PS3.3 C.11.2.1.2 / C.11.2.1.3) and the fallback
# ----------------------------------------------------------------------------------------------------------------


def _window_ds(center, width, function=None) -> Dataset:
    ds = Dataset()
    ds.WindowCenter = center
    ds.WindowWidth = width
    if function:
        ds.VOILUTFunction = function
    return ds


@pytest.mark.parametrize(
    ("function", "inputs", "expected"),
    [
        # LINEAR, c=100, w=51: 0 at or below c-0.5-(w-1)/2 = 74.5, 1 above c-0.5+(w-1)/2 = 124.5
        (None, [74.5, 99.5, 124.5, 125.0, 0.0, 1000.0], [0.0, 0.5, 1.0, 1.0, 0.0, 1.0]),
        ("LINEAR", [74.5, 99.5, 124.5], [0.0, 0.5, 1.0]),
        # LINEAR_EXACT: 0 at c-w/2 = 74.5, 1 at c+w/2 = 125.5
        ("LINEAR_EXACT", [74.5, 100.0, 125.5], [0.0, 0.5, 1.0]),
        # SIGMOID: 1 / (1 + exp(-4 (x - c) / w))
        ("SIGMOID", [100.0, 151.0, 49.0, -1e6], [0.5, 1 / (1 + np.exp(-4.0)), 1 / (1 + np.exp(4.0)), 0.0]),
    ],
)
def test_window_functions(function, inputs, expected):
    values = np.array([inputs], dtype=np.float32)
    out, voi = imaging.apply_voi(values, _window_ds(100, 51, function))
    assert voi == "window" and out.dtype == np.float32
    np.testing.assert_allclose(out[0], expected, atol=1e-6)


def test_multi_valued_window_uses_the_first_pair():
    out, voi = imaging.apply_voi(np.array([[99.5]], dtype=np.float32), _window_ds([100, 2000], [51, 4000]))
    assert voi == "window" and out[0, 0] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "ds",
    [None, Dataset(), _window_ds(100, 0), _window_ds(100, 0, "SIGMOID"), _window_ds("", 51)],
    ids=["no-dataset", "no-tags", "zero-width", "zero-width-sigmoid", "empty-center"],
)
def test_missing_or_invalid_window_falls_back_to_percentiles(ds):
    values = np.arange(1000, dtype=np.float32).reshape(20, 50)
    out, voi = imaging.apply_voi(values, ds)
    assert voi == "percentile_fallback"
    low, high = _stretch_levels(values, out)
    assert low == pytest.approx(np.percentile(values, imaging.PERCENTILE_FALLBACK[0]), abs=1e-3)
    # A ramp has no calcification, label or hot pixel: its top is tissue. The knee (FALLBACK_KNEE) lies among its
    # brightest 1 %, and the ramp stays one straight line: nothing above the knee is stretched more than below it.
    knee = low + imaging.FALLBACK_KNEE * (high - low)
    assert np.percentile(values, 99) <= knee <= values.max()
    np.testing.assert_allclose(out, np.clip((values - low) / (high - low), 0, 1), atol=1e-6)


def _stretch_levels(values: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """The values that a linear stretch mapped to 0 and 1, fitted on the pixels it did not clip."""
    inside = (out > 0) & (out < 1)
    slope, intercept = np.polyfit(values[inside].astype(np.float64), out[inside].astype(np.float64), 1)
    return -intercept / slope, (1 - intercept) / slope


@pytest.mark.parametrize("value", [0.0, 7.0])
def test_percentile_fallback_on_constant_image_gives_zeros(value):
    out, voi = imaging.apply_voi(np.full((10, 10), value, dtype=np.float32), None)
    assert voi == "percentile_fallback" and not out.any()


def test_rescale_is_applied_in_float32():
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024"
    values, modality = imaging.apply_modality_lut(np.array([[0, 2048]], dtype=np.uint16), ds)
    assert modality == "rescale" and values.dtype == np.float32
    np.testing.assert_array_equal(values, [[-1024.0, 0.0]])


def test_16_bit_depth_survives_the_pipeline():
    ramp = np.tile(np.arange(0, 65536, 16, dtype=np.uint16), (8, 1))  # 4096 levels
    out, prov = imaging.preprocess_array(ramp, None, (8, 4096))
    assert prov.voi == "percentile_fallback"
    assert np.unique(out).size > 1024  # an 8-bit stage anywhere would leave at most 256 levels


# The fallback's bright end keeps calcifications: a 12-bit phantom (600×480) with a fatty half-ellipse breast
# (1200), a dense region inside it (2600; tissue noise SD 25, so its 99th percentile is about 2660), eight 2×2
# calcification specks in the dense region (2950 to 3300, 50 apart: 32 pixels, 0.01 % of the image) and a background
# of 100. The 99.5th percentile falls in the dense tissue and clipped every speck to 1.0 with it.
CALC_SHAPE = (600, 480)
CALC_SPECKS = [(slice(250 + 14 * i, 252 + 14 * i), slice(110 + 20 * (i % 2), 112 + 20 * (i % 2))) for i in range(8)]
CALC_LABEL = (slice(20, 80), slice(360, 456))  # a burned-in label on the far side, 3-pixel strokes: 1 % of the image
HOT_PIXELS = [(150 + 20 * i, 60 + 9 * i) for i in range(10)] + [(220 + 20 * i, 150) for i in range(5)]
# A biopsy clip, 20×20 pixels: 0.3 % of the breast's 132,000, twice what a 2.8 mm clip covers of a small (50 cm²)
# breast, yet below the 0.5 % that would carry the tissue top (imaging._TISSUE_TOP_PERCENTILE) onto it.
CLIP_IN_DENSE = (slice(380, 400), slice(150, 170))
CLIP_IN_FAT = (slice(150, 170), slice(230, 250))
# Noise whose extremes come in small correlated bursts, as in a raw image whose noise the detector blurs: 40 bursts
# of 2×2 pixels, 200 to 1300 above the tissue around them (0.12 % of the breast), away from the specks and clips.
NOISE_BURST_COUNT = 40


def _phantom_regions() -> tuple[np.ndarray, np.ndarray]:
    """The phantom's breast and dense region."""
    rows, cols = np.mgrid[0 : CALC_SHAPE[0], 0 : CALC_SHAPE[1]].astype(np.float64)
    breast = (cols / 312) ** 2 + ((rows - 300) / 270) ** 2 < 1
    dense = ((cols - 130) / 80) ** 2 + ((rows - 300) / 120) ** 2 < 1
    return breast, dense


def _noise_bursts(breast: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the ``NOISE_BURST_COUNT`` bursts, four pixels each, inside the breast, away from the
    specks and the clips."""
    free = breast.copy()
    free[240:360, 100:140] = False  # the specks
    for clip in (CLIP_IN_DENSE, CLIP_IN_FAT):
        free[clip[0].start - 5 : clip[0].stop + 5, clip[1].start - 5 : clip[1].stop + 5] = False
    free[:, -1] = free[-1, :] = False
    corners = np.flatnonzero(free & np.roll(free, -1, 0) & np.roll(free, -1, 1) & np.roll(free, (-1, -1), (0, 1)))
    ys, xs = np.divmod(np.random.default_rng(3).choice(corners, NOISE_BURST_COUNT, replace=False), CALC_SHAPE[1])
    offsets = np.array([(0, 0), (0, 1), (1, 0), (1, 1)])
    return (ys[:, None] + offsets[:, 0]).ravel(), (xs[:, None] + offsets[:, 1]).ravel()


def _calcification_phantom(
    label: int | None = None,
    hot: int | None = None,
    clip: tuple[slice, slice] | None = None,
    clip_value: int = 0,
    bursts: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Stored values, anatomy bright (MONOCHROME2 sense), and the dense region's mask; optionally a metal clip
    (``clip`` at ``clip_value``) and noise bursts (``NOISE_BURST_COUNT``)."""
    breast, dense = _phantom_regions()
    noise = np.random.default_rng(7).normal(0, 1, CALC_SHAPE)
    image = np.where(breast, np.where(dense, 2600.0, 1200.0) + 25 * noise, 100 + 5 * noise)
    if bursts:
        image[_noise_bursts(breast)] += np.linspace(200, 1300, NOISE_BURST_COUNT).repeat(4)
    if clip is not None:
        image[clip] = clip_value
    for index, speck in enumerate(CALC_SPECKS):
        image[speck] = 2950 + 50 * index
    if label is not None:  # horizontal strokes, 3 pixels on and 3 off
        label_rows = np.arange(CALC_LABEL[0].start, CALC_LABEL[0].stop)
        image[label_rows[(label_rows // 3) % 2 == 0], CALC_LABEL[1]] = label
    for y, x in HOT_PIXELS if hot is not None else []:  # single pixels in fat and in dense tissue
        image[y, x] = hot
    return np.rint(image).astype(np.uint16), dense


def _dense_and_specks(img01: np.ndarray, dense: np.ndarray) -> tuple[float, np.ndarray]:
    """The dense tissue's 99th percentile (specks left out) and each speck's brightest value."""
    tissue = dense.copy()
    for speck in CALC_SPECKS:
        tissue[speck] = False
    return float(np.percentile(img01[tissue], 99)), np.array([img01[speck].max() for speck in CALC_SPECKS])


@pytest.mark.parametrize(
    ("photometric", "stored_inverted", "label", "hot", "tags"),
    [
        pytest.param("MONOCHROME2", False, None, None, {}, id="specks"),
        # A label at the stored maximum covering 1 %: the 99.5th percentile landed on it and squeezed the tissue.
        pytest.param("MONOCHROME2", False, 4095, None, {}, id="label-at-max"),
        # A label below the image's maximum (a hot pixel holds that): only the breast mask keeps it out.
        pytest.param("MONOCHROME2", False, 3900, 4095, {}, id="label-below-max-hot-at-max"),
        # Single hot pixels brighter than every speck, below the maximum (the label holds that).
        pytest.param("MONOCHROME2", False, 4095, 3800, {}, id="hot-pixels-below-max"),
        # Inverted after the VOI step: the bright end is the low one in stored values.
        pytest.param("MONOCHROME1", True, 4095, 3800, {}, id="monochrome1"),
        pytest.param("MONOCHROME2", True, 4095, 3800, {"PresentationLUTShape": "INVERSE"}, id="inverse"),
        pytest.param("PNG16", False, 4095, 3800, None, id="png16"),
    ],
)
def test_fallback_keeps_calcifications_brighter_than_dense_tissue(photometric, stored_inverted, label, hot, tags):
    """Without a window the calcifications stay distinguishable from the densest tissue and from each other, and
    neither a burned-in label nor hot pixels squeeze the tissue's range: it maps as in the clean phantom."""
    clean, dense = _calcification_phantom()
    reference, _, _, _ = imaging._unit_image(clean, None, "PNG16")
    reference_dense, _ = _dense_and_specks(reference, dense)
    stored, _ = _calcification_phantom(label, hot)
    if stored_inverted:
        stored = (4095 - stored).astype(np.uint16)
    ds = None if tags is None else _gray_ds(photometric, **tags)
    img01, _, voi, inverted = imaging._unit_image(stored, ds, photometric)
    assert voi == "percentile_fallback" and inverted is stored_inverted
    dense_p99, specks = _dense_and_specks(img01, dense)
    assert specks.min() - dense_p99 >= 0.05, (dense_p99, specks)  # old: all specks and the dense tissue at 1.0
    assert np.all(np.diff(specks) > 0.005), specks  # brighter specks stay brighter, none flattened to one value
    assert abs(dense_p99 - reference_dense) <= 0.01, (dense_p99, reference_dense)
    assert 0.6 <= reference_dense <= 0.9, reference_dense  # the tissue keeps most of the range, with headroom
    breast_free = np.zeros(CALC_SHAPE, dtype=bool)
    breast_free[500:, 400:] = True  # background corner
    assert np.median(img01[breast_free]) <= 0.02


def _tissue_contrast(img01: np.ndarray, exclude: np.ndarray) -> float:
    """Mean of the dense region minus mean of the fat, ``exclude`` (specks, clip, bursts) left out: the tissue's
    contrast, which the pixel noise averages out of."""
    breast, dense = _phantom_regions()
    return float(img01[dense & ~exclude].mean() - img01[breast & ~dense & ~exclude].mean())


@pytest.mark.parametrize(
    ("photometric", "stored_inverted", "clip", "clip_value", "label", "bursts", "tags"),
    [
        # A clip in dense tissue, below the image's maximum (the label holds that).
        pytest.param("MONOCHROME2", False, CLIP_IN_DENSE, 3900, 4095, False, {}, id="clip-in-dense"),
        pytest.param("MONOCHROME2", False, CLIP_IN_FAT, 3900, 4095, False, {}, id="clip-in-fat"),
        # No label: the clip holds the image's maximum, only inside the breast, so it counts like a calcification.
        pytest.param("MONOCHROME2", False, CLIP_IN_DENSE, 4095, None, False, {}, id="clip-at-max"),
        # A noisy raw image: correlated bursts of noise far above the tissue, none of them a single hot pixel.
        pytest.param("MONOCHROME2", False, None, 0, 4095, True, {}, id="noise-bursts"),
        pytest.param("MONOCHROME2", False, CLIP_IN_FAT, 3900, 4095, True, {}, id="clip-and-noise"),
        # Inverted after the VOI step: the clip and the specks are the lowest stored values.
        pytest.param("MONOCHROME1", True, CLIP_IN_DENSE, 3900, 4095, False, {}, id="monochrome1"),
        pytest.param("MONOCHROME1", True, None, 0, 4095, True, {}, id="monochrome1-noise"),
        pytest.param(
            "MONOCHROME2", True, CLIP_IN_DENSE, 3900, 4095, False, {"PresentationLUTShape": "INVERSE"}, id="inverse"
        ),
        pytest.param("PNG16", False, CLIP_IN_DENSE, 3900, 4095, False, None, id="png16"),
    ],
)
def test_fallback_tissue_contrast_survives_a_clip_and_noise(
    photometric, stored_inverted, clip, clip_value, label, bursts, tags
):
    """Without a window a biopsy clip or noise bursts inside the breast, brighter than every calcification, leave
    the tissue's contrast as it is without them (a clip marks a prior biopsy, so squeezing the tissue of exactly
    those images would hand the model a shortcut), and the specks stay above the densest tissue, in order.

    Tolerance 2 % of the contrast: the clip's and the bursts' pixels (under 0.5 % of the breast) only move the tissue
    top up within the dense tissue's own noise: measured 0.0-0.5 %. The old single stretch to the brightest adjacent
    pair lost 14-20 % here."""
    ds = None if tags is None else _gray_ds(photometric, **tags)
    exclude = np.zeros(CALC_SHAPE, dtype=bool)
    for speck in CALC_SPECKS:
        exclude[speck] = True
    if clip is not None:
        exclude[clip] = True
    if bursts:
        exclude[_noise_bursts(_phantom_regions()[0])] = True
    results = []
    for perturbed in (False, True):
        stored, dense = _calcification_phantom(
            label, clip=clip if perturbed else None, clip_value=clip_value, bursts=bursts and perturbed
        )
        if stored_inverted:
            stored = (4095 - stored).astype(np.uint16)
        img01, _, voi, inverted = imaging._unit_image(stored, ds, photometric)
        assert voi == "percentile_fallback" and inverted is stored_inverted
        dense_p99, specks = _dense_and_specks(img01, dense & ~exclude)
        # Each speck stays above the densest tissue by about 4 SD of its noise (SD 25, 0.008 of the output) or more,
        # and above the speck 50 below it (measured: 0.04-0.05 beside a clip or bursts, 0.09 without).
        assert specks.min() - dense_p99 >= 0.03, (perturbed, dense_p99, specks)
        assert np.all(np.diff(specks) > 0.005), (perturbed, specks)
        results.append(_tissue_contrast(img01, exclude))
    clean, perturbed_contrast = results
    assert 0.3 <= clean <= 0.5, clean  # 1400 of the 2550 between background and dense tissue, most of the range
    assert abs(perturbed_contrast / clean - 1) <= 0.02, (clean, perturbed_contrast)


# ----------------------------------------------------------------------------------------------------------------
# The real mammogram: crop and orientation
# ----------------------------------------------------------------------------------------------------------------


def test_mg1_crop_keeps_breast_and_drops_the_film_label(mg1):
    pixels, ds = mg1
    out, prov = imaging.preprocess_array(pixels, ds, (512, 256))
    y0, x0, y1, x1 = prov.crop_box
    label_y0, label_x0, label_y1, label_x1 = MG1_LABEL_BOX
    overlaps_label = y0 < label_y1 and label_y0 < y1 and x0 < label_x1 and label_x0 < x1
    assert prov.breast_found and not overlaps_label, prov.crop_box
    assert x0 == 0 and x1 > MG1_NIPPLE_X  # chest wall and nipple both kept
    assert y0 <= 100 and y1 >= 4500  # MLO: the breast runs over the whole film height
    # The tag says L, the image agrees: no flip, chest wall (the bright side) on the left.
    assert (prov.flipped, prov.laterality_source) == (False, "tag")
    assert out[:, :64].mean() > 2 * out[:, -64:].mean()


@pytest.mark.parametrize(
    ("mirror", "laterality", "flipped", "source"),
    [
        (False, "L", False, "argument"),
        (False, "R", False, "tag_overridden_by_image"),  # the image clearly shows a left-sided chest wall
        (True, None, True, "tag_overridden_by_image"),  # mirrored pixels, header still says L
    ],
)
def test_mg1_orientation(mg1, mirror, laterality, flipped, source):
    pixels, ds = mg1
    pixels = np.ascontiguousarray(pixels[:, ::-1]) if mirror else pixels
    out, prov = imaging.preprocess_array(pixels, ds, (512, 256), laterality=laterality)
    assert (prov.flipped, prov.laterality_source) == (flipped, source)
    assert out[:, :64].mean() > 2 * out[:, -64:].mean()  # chest wall on the left either way


def test_mg1_breast_side_and_mask(mg1):
    pixels, ds = mg1
    img01 = _pipeline_01(pixels, ds)
    assert imaging.breast_side(img01) == "L"
    assert imaging.breast_side(img01[:, ::-1]) == "R"
    mask = imaging.breast_mask(img01)
    assert mask.shape == img01.shape and mask.dtype == bool
    label_y0, label_x0, label_y1, label_x1 = MG1_LABEL_BOX
    assert not mask[label_y0:label_y1, label_x0:label_x1].any()
    assert mask[2000:3000, 0:1500].mean() > 0.95  # the middle of the breast


# ----------------------------------------------------------------------------------------------------------------
# Synthetic breasts: orientation and crop
# ----------------------------------------------------------------------------------------------------------------


def _half_ellipse(chest_wall: str, shape=(400, 300), extent=0.6) -> np.ndarray:
    """A bright half-ellipse "breast" whose flat side lies on the given image edge, on a black background."""
    height, width = shape
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    depth = cols if chest_wall == "L" else (width - 1 - cols)
    inside = (depth / (extent * width)) ** 2 + ((rows - height / 2) / (0.45 * height)) ** 2 < 1
    return np.where(inside, 0.4 + 0.4 * (1 - depth / width), 0.0).astype(np.float32)


def _centred_ellipse(shape=(400, 300)) -> np.ndarray:
    """A symmetric blob: the image says nothing about the side, so a given laterality decides."""
    height, width = shape
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    inside = ((cols - (width - 1) / 2) / (0.3 * width)) ** 2 + ((rows - height / 2) / (0.4 * height)) ** 2 < 1
    return np.where(inside, 0.7, 0.0).astype(np.float32)


@pytest.mark.parametrize(
    ("chest_wall", "laterality", "flipped", "source"),
    [
        ("L", None, False, "image"),
        ("R", None, True, "image"),
        ("L", "L", False, "tag"),
        ("R", "R", True, "tag"),
        ("R", "right", True, "tag"),
        ("L", "R", False, "tag_overridden_by_image"),
        ("R", "L", True, "tag_overridden_by_image"),
        ("L", "B", False, "image"),  # "both" is no laterality
    ],
)
def test_orient_half_ellipse(chest_wall, laterality, flipped, source):
    img = _half_ellipse(chest_wall)
    out, did_flip, how = imaging.orient(img, laterality)
    assert (did_flip, how) == (flipped, source)
    assert imaging.breast_side(out) == "L"
    assert imaging.breast_side(img) == chest_wall


def test_orient_flips_exactly_one_of_a_left_and_right_pair():
    flips = [imaging.orient(_half_ellipse(side), None)[1] for side in ("L", "R")]
    assert flips == [False, True]


@pytest.mark.parametrize("laterality", ["L", "R"])
def test_ambiguous_image_follows_the_given_laterality(laterality):
    _, flipped, source = imaging.orient(_centred_ellipse(), laterality)
    assert (flipped, source) == (laterality == "R", "tag")


def _ds_with(image_laterality=None, laterality=None) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    if image_laterality is not None:
        ds.ImageLaterality = image_laterality
    if laterality is not None:
        ds.Laterality = laterality
    return ds


@pytest.mark.parametrize(
    ("argument", "image_laterality", "laterality", "flipped", "source"),
    [
        ("R", "L", "L", True, "argument"),
        (None, "R", "L", True, "tag"),  # ImageLaterality before Laterality
        (None, None, "R", True, "tag"),
        (None, "", "R", True, "tag"),
        (None, "B", "L", False, "tag"),
        (None, None, None, None, "image"),
    ],
)
def test_laterality_precedence(argument, image_laterality, laterality, flipped, source):
    pixels = (_centred_ellipse() * 4000).astype(np.uint16)
    _, prov = imaging.preprocess_array(pixels, _ds_with(image_laterality, laterality), SIZE, laterality=argument)
    assert prov.laterality_source == source
    if flipped is not None:
        assert prov.flipped is flipped


@pytest.mark.parametrize("chest_wall", ["L", "R"])
def test_crop_to_synthetic_breast(chest_wall):
    img = np.zeros((600, 500), dtype=np.float32)
    img[100:500, 50:350] = _half_ellipse(chest_wall, shape=(400, 300), extent=1.0)
    crop, box, found = imaging.crop_to_breast(img, margin=0.0)
    assert found
    y0, x0, y1, x1 = box
    assert crop.shape == (y1 - y0, x1 - x0)
    assert abs(y0 - 110) <= 10 and abs(y1 - 490) <= 10 and abs(x0 - 50) <= 5 and abs(x1 - 350) <= 5
    _, (my0, mx0, my1, mx1), _ = imaging.crop_to_breast(img, margin=0.02)
    assert (my0, mx0, my1, mx1) == (y0 - 12, x0 - 10, y1 + 12, x1 + 10)


@pytest.mark.parametrize("fat_level", [0.1, 0.15, 0.25])
def test_crop_keeps_faint_fat_around_dense_tissue(fat_level):
    """Digital mammogram look: black surround, faint fatty periphery, small bright dense core, pixel noise."""
    height, width = 400, 300
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    breast = (cols / (0.8 * width)) ** 2 + ((rows - height / 2) / (0.45 * height)) ** 2 < 1
    dense = (cols / (0.35 * width)) ** 2 + ((rows - height / 2) / (0.3 * height)) ** 2 < 1
    img = np.where(breast, fat_level, 0.0).astype(np.float32)
    img[dense] = 0.8
    img += np.random.default_rng(0).normal(0, 0.02, img.shape).astype(np.float32)
    _, (y0, x0, y1, x1), found = imaging.crop_to_breast(img, margin=0.0)
    assert found
    assert x0 == 0 and abs(x1 - 0.8 * width) <= 6  # the whole fatty breast, not just the dense core
    assert abs(y0 - 0.05 * height) <= 6 and abs(y1 - 0.95 * height) <= 6


def test_small_bright_marker_does_not_win_over_the_breast():
    img = _half_ellipse("L", shape=(400, 300))
    img[20:40, 250:280] = 1.0  # a burnt-in marker on the far side
    _, (_, _, _, x1), found = imaging.crop_to_breast(img, margin=0.0)
    assert found and x1 < 250


# ----------------------------------------------------------------------------------------------------------------
# Degenerate inputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pixels",
    [
        np.array([[5]], dtype=np.uint16),
        np.zeros((1, 1), dtype=np.uint8),
        np.zeros((100, 80), dtype=np.uint16),
        np.full((100, 80), 1234, dtype=np.uint16),
        np.arange(1000, dtype=np.uint16).reshape(1, 1000),
        np.full((50, 40), np.nan, dtype=np.float32),
        np.pad(np.array([[4000]], dtype=np.uint16), 20),
    ],
    ids=["1-pixel", "1-pixel-8bit", "all-zero", "constant", "1-row", "all-nan", "single-bright-pixel"],
)
def test_degenerate_arrays_do_not_crash(pixels):
    out, prov = imaging.preprocess_array(pixels, None, SIZE)
    assert out.shape == SIZE and out.dtype == np.uint16
    assert not prov.breast_found
    assert prov.crop_box == (0, 0, *pixels.shape)
    assert prov.laterality_source == "image"


def test_all_zero_image_stays_black_and_is_not_cropped():
    img = np.zeros((100, 80), dtype=np.float32)
    crop, box, found = imaging.crop_to_breast(img)
    assert (crop.shape, box, found) == ((100, 80), (0, 0, 100, 80), False)
    assert not imaging.breast_mask(img).any()
    out, _ = imaging.preprocess_array(img, None, SIZE)
    assert not out.any()


def test_empty_array_is_rejected():
    with pytest.raises(ValueError):
        imaging.preprocess_array(np.zeros((0, 10), dtype=np.uint16), None, SIZE)


# ----------------------------------------------------------------------------------------------------------------
# PNG input
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "mode", "photometric", "voi"),
    # An 8-bit PNG skips the VOI step (taken as already windowed), and the provenance says so.
    [(np.uint8, "L", "PNG8", "png8_identity"), (np.uint16, "I;16", "PNG16", "percentile_fallback")],
)
def test_png_roundtrip_and_preprocess(tmp_path, dtype, mode, photometric, voi):
    top = np.iinfo(dtype).max
    img = (_half_ellipse("R") * top).astype(dtype)
    path = tmp_path / f"{photometric}.png"
    image = Image.fromarray(img)
    assert image.mode == mode
    image.save(path)
    pixels = imaging.read_png(path)
    assert pixels.dtype == dtype
    np.testing.assert_array_equal(pixels, img)
    out, prov = imaging.preprocess_file(path, SIZE, laterality="R")
    assert out.shape == SIZE and out.dtype == np.uint16
    assert (prov.source_format, prov.photometric, prov.modality_lut, prov.voi) == ("png", photometric, "none", voi)
    assert (prov.flipped, prov.laterality_source, prov.breast_found) == (True, "argument", True)


def test_rgb_png_is_read_as_gray(tmp_path):
    gray = (_half_ellipse("L") * 255).astype(np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(np.dstack([gray] * 3)).save(path)
    np.testing.assert_array_equal(imaging.read_png(path), gray)


# ----------------------------------------------------------------------------------------------------------------
# Files that must fail with ImageReadError
# ----------------------------------------------------------------------------------------------------------------


def _truncated(source: Path, fraction: float, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


@pytest.mark.parametrize(
    ("make", "reason_part"),
    [
        (lambda d, t: _truncated(d / "MG1_J2KI.dcm", 0.5, t / "half_j2k.dcm"), "truncated"),
        (lambda d, t: _truncated(d / "RG3_J2KR.dcm", 0.999, t / "tail_cut.dcm"), "truncated"),
        (lambda d, t: _truncated(d / "mlut_18.dcm", 0.5, t / "half_native.dcm"), "decode"),
        (lambda d, t: _truncated(d / "mlut_18.dcm", 0.05, t / "header_only.dcm"), ""),
        (lambda d, t: _truncated(d / "MG1_J2KI.dcm", 0.0, t / "empty.dcm"), "empty"),
        (lambda d, t: (t / "notes.txt").write_text("not an image\n" * 50) and t / "notes.txt", "neither"),
        (lambda d, t: (t / "fake.png").write_bytes(b"\x00" * 300) and t / "fake.png", "PNG"),
        (lambda d, t: t / "missing.dcm", "cannot open"),
    ],
    ids=[
        "truncated-j2k",
        "truncated-j2k-tail",
        "truncated-native",
        "header-only",
        "empty",
        "text",
        "fake-png",
        "missing",
    ],
)
def test_unusable_files_raise_image_read_error(testdata, tmp_path, make, reason_part):
    path = make(testdata, tmp_path)
    with pytest.raises(ImageReadError) as info:
        imaging.preprocess_file(path, SIZE)
    assert info.value.path == str(path)
    assert path.name in str(info.value) and reason_part in info.value.reason


def test_truncated_png_raises_image_read_error(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray((_half_ellipse("L") * 65535).astype(np.uint16)).save(good)
    path = _truncated(good, 0.5, tmp_path / "cut.png")
    with pytest.raises(ImageReadError, match="cut.png"):
        imaging.decode(path)


def test_multiframe_dicom_is_rejected(testdata, tmp_path):
    ds = pydicom.dcmread(testdata / "vlut_04.dcm")
    ds.NumberOfFrames = 2
    path = tmp_path / "two_frames.dcm"
    ds.save_as(path)
    with pytest.raises(ImageReadError, match="multi-frame"):
        imaging.decode(path)


def test_dicom_without_preamble_or_meta_header_decodes(tmp_path):
    ds = Dataset()
    ds.Rows, ds.Columns = 40, 30
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 12, 11, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    stored = (np.arange(1200).reshape(40, 30) % 4096).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)  # bare implicit-VR data set, as old ACR-NEMA style exports look
    path = tmp_path / "IM0001"
    path.write_bytes(buffer.getvalue())
    pixels, read = imaging.decode(path)
    np.testing.assert_array_equal(pixels, stored)
    assert read is not None


def test_image_read_error_survives_pickling():
    error = pickle.loads(pickle.dumps(ImageReadError("/data/x.dcm", "line one\nline two")))
    assert (error.path, error.reason, str(error)) == (
        "/data/x.dcm",
        "line one line two",
        "/data/x.dcm: line one line two",
    )


# ----------------------------------------------------------------------------------------------------------------
# Resize, output and provenance
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "size", "content"),
    [
        ((200, 100), (64, 32), (64, 32)),  # same aspect: fills the frame
        ((100, 200), (64, 32), (16, 32)),  # wide input: letterboxed, centred vertically
        ((300, 50), (64, 32), (64, 11)),  # tall input: padded on the right
        ((1, 1), (64, 32), (32, 32)),
        ((4096, 3328), (1024, 512), (630, 512)),
        ((10, 5), (1000, 500), (1000, 500)),  # enlarged
    ],
)
def test_resize_pad_keeps_aspect_and_anchors_left(shape, size, content):
    out = imaging.resize_pad(np.ones(shape, dtype=np.float32), size)
    assert out.shape == size and out.dtype == np.float32
    rows = np.flatnonzero(out.any(axis=1))
    cols = np.flatnonzero(out.any(axis=0))
    assert (rows.size, cols.size) == content
    assert cols[0] == 0  # flush with the chest-wall edge
    assert abs(rows[0] - (size[0] - content[0]) // 2) <= 1
    np.testing.assert_allclose(out[rows[0] : rows[-1] + 1, : cols[-1] + 1], 1.0, atol=1e-6)


@pytest.mark.parametrize("size", [(0, 10), (10, -1)])
def test_resize_pad_rejects_bad_size(size):
    with pytest.raises(ValueError):
        imaging.resize_pad(np.ones((4, 4), dtype=np.float32), size)


def test_to_uint16():
    values = np.array([0.0, 0.5, 1.0, -1.0, 2.0, np.nan, 1 / 65535], dtype=np.float32)
    np.testing.assert_array_equal(imaging.to_uint16(values), [0, 32768, 65535, 0, 65535, 0, 1])
    assert imaging.to_uint16(values).dtype == np.uint16


def test_pixel_hash():
    img = np.arange(12, dtype=np.uint16).reshape(3, 4)
    other = img.copy()
    other[0, 0] = 1
    digest = imaging.pixel_hash(img)
    assert len(digest) == 40 and digest == imaging.pixel_hash(img.copy())
    assert digest == imaging.pixel_hash(np.asfortranarray(img))  # memory layout does not matter
    assert digest != imaging.pixel_hash(other)
    with pytest.raises(TypeError):
        imaging.pixel_hash(img.astype(np.float32))


def test_provenance_columns_are_flat_plain_values():
    prov = Provenance("dicom", "MONOCHROME1", "rescale", "window", True, 10, 8, (1, 2, 9, 8), True, False, "tag")
    columns = prov.as_columns()
    assert all(key.startswith("prep_") for key in columns)
    assert (columns["prep_crop_y0"], columns["prep_crop_x0"], columns["prep_crop_y1"], columns["prep_crop_x1"]) == (
        1,
        2,
        9,
        8,
    )
    assert "prep_crop_box" not in columns
    assert columns["prep_laterality_source"] == "tag" and columns["prep_inverted"] is True
    assert (columns["prep_padding_pixels"], columns["prep_presentation_intent"]) == (0, "")
    assert all(isinstance(value, str | int | bool) for value in columns.values())


def test_preprocess_is_deterministic(testdata):
    first, _ = imaging.preprocess_file(testdata / "RG3_J2KR.dcm", SIZE)
    second, _ = imaging.preprocess_file(testdata / "RG3_J2KR.dcm", SIZE)
    assert imaging.pixel_hash(first) == imaging.pixel_hash(second)


# ----------------------------------------------------------------------------------------------------------------
# JPEG 2000 decoded at reduced resolution
# ----------------------------------------------------------------------------------------------------------------

FULL_FIELD = (4096, 3328)  # rows, columns of a full-field digital mammogram


@pytest.fixture(scope="module")
def full_field_j2k(tmp_path_factory) -> dict[str, Path]:
    """A synthetic full-field mammogram (synth at 1024×832, cubic ×4, as benchmarks/preprocess.py makes them; a
    MONOCHROME1 image with a burned-in label), stored as JPEG 2000 lossless with its window ("full_field") and
    without ("full_field_no_window", for the percentile fallback): about 8 s to make."""
    import cv2
    from pydicom.uid import JPEG2000Lossless

    from mammo_ray import synth

    root = tmp_path_factory.mktemp("full-field")
    info = synth.generate(root / "synth", patients=1, prevalence=0.0, size=(1024, 832), seed=11, progress=False)
    first = sorted((root / "synth").rglob("*.dcm"))[0]
    assert info["n_images"] >= 1
    paths = {}
    for name in ("full_field", "full_field_no_window"):
        ds = pydicom.dcmread(first)
        assert "WindowCenter" in ds
        if name == "full_field_no_window":
            del ds.WindowCenter, ds.WindowWidth
        top = (1 << int(ds.BitsStored)) - 1
        big = cv2.resize(ds.pixel_array.astype(np.float32), FULL_FIELD[::-1], interpolation=cv2.INTER_CUBIC)
        ds.Rows, ds.Columns = FULL_FIELD
        ds.PixelData = np.clip(big + 0.5, 0, top).astype(np.uint16).tobytes()
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        paths[name] = root / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    return paths


def _block_means(img: np.ndarray, block: int = 8) -> np.ndarray:
    height, width = (side // block * block for side in img.shape)
    blocks = img[:height, :width].astype(np.float64).reshape(height // block, block, width // block, block)
    return blocks.mean(axis=(1, 3)) / 65535.0


@pytest.mark.parametrize(
    ("source", "size", "level"),
    [
        ("mg1", (1024, 512), 1),  # real film, JPEG 2000 lossy (9/7 wavelet)
        ("mg1", (512, 256), 2),
        ("full_field", (1024, 512), 1),  # the benchmark's case: JPEG 2000 lossless (5/3 wavelet)
        ("full_field", (512, 256), 2),
        # The fallback: its bright end is a breast statistic. Before, the 0.5th percentile of these MONOCHROME1
        # values (the bright end before inversion) fell among the label's edge pixels, which the wavelet low-pass
        # blurs: 1.9 % apart per pixel.
        ("full_field_no_window", (1024, 512), 1),
    ],
)
def test_reduced_decode_agrees_with_full_decode(testdata, full_field_j2k, source, size, level):
    """Modality LUT, VOI and crop on the reduced pixels give the full-resolution result, up to the difference
    between two anti-aliasing filters (the wavelet low-pass against INTER_AREA's box) and a crop box that moves by
    a few stored pixels. Tolerances, in units of the output's full scale: the mean absolute difference per pixel
    ≤ 2 %, and on 8×8-block means (which a sub-pixel shift of the crop barely moves) the mean ≤ 1 % and the 99th
    percentile ≤ 5 %. Measured: per pixel 0.1–1.5 %, blocks 0.05–0.6 % (mean) and 0.6–3.9 % (99th percentile).
    Any real error (a wrong bit shift, a missed inversion, a window on the wrong scale) moves whole regions by
    tens of per cent."""
    path = testdata / "MG1_J2KI.dcm" if source == "mg1" else full_field_j2k[source]
    full, full_prov = imaging.preprocess_file(path, size, reduced_decode=False)
    reduced, prov = imaging.preprocess_file(path, size)
    assert (full_prov.decode_reduction, prov.decode_reduction) == (0, level)
    decisions = ("photometric", "modality_lut", "voi", "inverted", "breast_found", "flipped", "laterality_source")
    assert [getattr(prov, k) for k in decisions] == [getattr(full_prov, k) for k in decisions]
    assert (prov.original_height, prov.original_width) == (full_prov.original_height, full_prov.original_width)
    # The crop box is reported in stored pixels; it may move by a mask pixel (1/512 of the long side) or so.
    step = 1 << level
    for (reduced_edge, full_edge), side in zip(
        zip(prov.crop_box, full_prov.crop_box, strict=True),
        (prov.original_height, prov.original_width) * 2,
        strict=True,
    ):
        assert abs(reduced_edge - full_edge) <= 0.01 * side + step, (prov.crop_box, full_prov.crop_box)
    # The level keeps enough pixels: the crop at 1/2^r still has MIN_OVERSAMPLING pixels per output pixel.
    y0, x0, y1, x1 = prov.crop_box
    assert max((y1 - y0) / step / size[0], (x1 - x0) / step / size[1]) >= imaging.MIN_OVERSAMPLING
    per_pixel = np.abs(full.astype(np.float64) - reduced).mean() / 65535.0
    blocks = np.abs(_block_means(full) - _block_means(reduced))
    assert per_pixel <= 0.02 and blocks.mean() <= 0.01 and np.percentile(blocks, 99) <= 0.05, (
        per_pixel,
        blocks.mean(),
        np.percentile(blocks, 99),
    )


def test_full_resolution_decode_is_decode_plus_preprocess_array(testdata):
    path = testdata / "RG3_J2KR.dcm"
    pixels, ds = imaging.decode(path)
    expected, expected_prov = imaging.preprocess_array(pixels, ds, SIZE)
    out, prov = imaging.preprocess_file(path, SIZE, reduced_decode=False)
    np.testing.assert_array_equal(out, expected)
    assert prov == expected_prov and prov.decode_reduction == 0


@pytest.mark.parametrize(
    ("name", "size", "reduced"),
    [
        ("RG3_J2KR.dcm", SIZE, True),  # JPEG 2000 lossless, MONOCHROME1
        ("RG1_J2KI.dcm", SIZE, True),  # JPEG 2000 lossy, MONOCHROME1, odd size 1955×1841
        ("RG3_J2KR.dcm", (1500, 1500), False),  # the output needs every pixel
        ("mlut_18.dcm", SIZE, False),  # uncompressed: nothing to reduce
        ("JPEG-LL.dcm", SIZE, False),  # JPEG Lossless has no resolution levels
    ],
)
def test_reduction_is_used_only_where_it_fits(testdata, name, size, reduced):
    out, prov = imaging.preprocess_file(testdata / name, size)
    assert out.shape == size
    assert (prov.decode_reduction > 0) is reduced
    if reduced:
        step = 1 << prov.decode_reduction
        y0, x0, y1, x1 = prov.crop_box
        assert max((y1 - y0) / step / size[0], (x1 - x0) / step / size[1]) >= imaging.MIN_OVERSAMPLING
        assert (prov.original_height, prov.original_width) == pydicom.dcmread(testdata / name).pixel_array.shape
        assert 0 <= y0 < y1 <= prov.original_height and 0 <= x0 < x1 <= prov.original_width


def test_a_too_coarse_first_level_is_refined(testdata, monkeypatch):
    """If the crop on the decoded pixels is smaller than the preview's, the image is decoded again at a level that
    keeps MIN_OVERSAMPLING: the reduction never makes the final resize enlarge."""
    path = testdata / "MG1_J2KI.dcm"
    expected, expected_prov = imaging.preprocess_file(path, (1024, 512))
    assert expected_prov.decode_reduction == 1

    def too_coarse(self, ds, size):
        return self.decode(4), 4  # 292×192 pixels for a 1024×512 output

    monkeypatch.setattr(imaging._J2KSource, "first_decode", too_coarse)
    out, prov = imaging.preprocess_file(path, (1024, 512))
    assert prov.decode_reduction == 1
    np.testing.assert_array_equal(out, expected)


def test_a_failure_on_the_reduced_pixels_falls_back_to_the_full_decode(testdata, monkeypatch):
    """Preprocessing that fails on the reduced pixels is a problem of the shortcut: the file is decoded in full."""
    path = testdata / "RG3_J2KR.dcm"
    expected, expected_prov = imaging.preprocess_file(path, SIZE, reduced_decode=False)
    original = imaging.preprocess_array

    def fails_when_reduced(*args, decode_reduction=0, **kwargs):
        if decode_reduction:
            raise ValueError("simulated failure on reduced pixels")
        return original(*args, **kwargs)

    monkeypatch.setattr(imaging, "preprocess_array", fails_when_reduced)
    out, prov = imaging.preprocess_file(path, SIZE)
    assert prov == expected_prov and prov.decode_reduction == 0
    np.testing.assert_array_equal(out, expected)


def test_samples_not_widened_as_expected_are_not_used(testdata):
    """The reduced decode undoes Pillow's left shift; samples whose low bits are set were not shifted (another
    Pillow, a wrong precision), so the reduced decode declines and the full decode decides."""
    import dataclasses

    source = imaging._j2k_source(pydicom.dcmread(testdata / "MG1_J2KI.dcm"))
    assert source is not None and source.decode(4) is not None
    wrong = dataclasses.replace(source, layout=dataclasses.replace(source.layout, precision=4))
    assert wrong.decode(4) is None


def test_j2k_main_header_of_the_real_mammogram(testdata):
    ds = pydicom.dcmread(testdata / "MG1_J2KI.dcm")
    source = imaging._j2k_source(ds)
    assert source is not None
    layout = source.layout
    assert (layout.rows, layout.columns, layout.precision, layout.signed, layout.components) == (
        4664,
        3064,
        12,
        False,
        1,
    )
    assert layout.levels == 5 and source.usable == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(source.decode(0), imaging.decode(testdata / "MG1_J2KI.dcm")[0])
    assert source.decode(2).shape == (1166, 766)
    assert imaging._j2k_layout(b"\xff\x4f\xff\x51" + b"\x00" * 10) is None  # cut inside SIZ
    assert imaging._j2k_layout(b"not a codestream") is None


@pytest.mark.parametrize(
    ("rows", "columns", "levels", "origin_at_zero", "usable"),
    [
        (4096, 3328, 5, True, [1, 2, 3, 4, 5]),
        (4664, 3064, 5, True, [1, 2, 3, 4, 5]),  # remainders of at least half a step round as OpenJPEG does
        (1025, 833, 5, True, [1]),  # 1025 / 4 → OpenJPEG 257 rows, Pillow's buffer 256: not usable
        (4096, 3328, 0, True, []),  # no wavelet levels: nothing to discard
        (4096, 3328, 5, False, []),  # image offset: the reduced grid would not start at 0
    ],
)
def test_usable_reductions(rows, columns, levels, origin_at_zero, usable):
    layout = imaging._J2KLayout(rows, columns, 12, False, 1, levels, origin_at_zero)
    assert layout.usable_reductions() == usable


def test_reduced_decode_of_an_odd_sized_codestream(testdata):
    """1025×833 pixels: level 1 decodes to ceil(size / 2) pixels; level 2 (257 against 256 rows) is never tried."""
    from pydicom.uid import JPEG2000Lossless

    stored = (np.add.outer(np.arange(1025), np.arange(833)) % 4096).astype(np.uint16)
    ds = pydicom.dcmread(testdata / "MG_synthetic_pixelspacing_testobject.dcm")
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.tobytes()
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    source = imaging._j2k_source(ds)
    assert source is not None and source.usable == [1]
    half = source.decode(1)
    assert half.shape == (513, 417) and half.dtype == np.uint16
    # The reversible 5/3 low-pass of a ramp samples it at even positions: 2y + 2x (far from the wrap at 4096).
    np.testing.assert_array_equal(half[:100, :100], np.add.outer(np.arange(100), np.arange(100)) * 2)


def test_damaged_codestream_fails_with_either_decode(testdata, tmp_path):
    """A cut codestream in a well-formed file: the reduced decode does not hide the damage."""
    from pydicom.encaps import encapsulate, get_frame

    ds = pydicom.dcmread(testdata / "MG1_J2KI.dcm")
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    path = tmp_path / "cut_codestream.dcm"
    ds.save_as(path)
    for reduced_decode in (True, False):
        with pytest.raises(ImageReadError, match="could not be decoded"):
            imaging.preprocess_file(path, (512, 256), reduced_decode=reduced_decode)


def test_fill_holes_matches_scipy():
    from scipy import ndimage

    rng = np.random.default_rng(5)
    for _ in range(200):
        mask = rng.random(tuple(rng.integers(1, 40, 2))) < rng.random()
        np.testing.assert_array_equal(imaging._fill_holes(mask), ndimage.binary_fill_holes(mask))


def test_public_lut_steps_leave_their_input_alone():
    """preprocess_array windows its own float32 copy in place; the public step functions still copy."""
    values = np.linspace(0, 200, 60, dtype=np.float32).reshape(6, 10)
    before = values.copy()
    for ds in (_window_ds(100, 51), _window_ds(100, 51, "SIGMOID"), None):
        imaging.apply_voi(values, ds)
        np.testing.assert_array_equal(values, before)
    unit = values / 200
    imaging.invert_if_monochrome1(unit, "MONOCHROME1")
    np.testing.assert_array_equal(unit, before / 200)


# ----------------------------------------------------------------------------------------------------------------
# Pixel padding, Presentation LUT Shape and presentation intent
# ----------------------------------------------------------------------------------------------------------------

PHANTOM_SHAPE = (400, 320)
# A detector corner outside the breast yet inside its crop box (the breast is at most 146 columns wide above row
# 100 and the crop reaches about column 182), so padding shows up in the output when it is not handled.
PADDED = np.zeros(PHANTOM_SHAPE, dtype=bool)
PADDED[:100, 150:] = True


def _phantom() -> np.ndarray:
    """Stored values in the MONOCHROME2 sense: a 12-bit half-ellipse breast against the left edge, brightest at the
    chest wall, on a background of 50."""
    rows, cols = np.mgrid[0 : PHANTOM_SHAPE[0], 0 : PHANTOM_SHAPE[1]].astype(np.float64)
    breast = (cols / 176) ** 2 + ((rows - 200) / 180) ** 2 < 1
    return np.rint(np.where(breast, 800 + 2200 * (1 - cols / 176), 50.0))


def _gray_ds(photometric="MONOCHROME2", signed=False, **tags) -> Dataset:
    ds = Dataset()
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, int(signed)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def _save(ds: Dataset, stored: np.ndarray, path: Path) -> Path:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.1.2")  # MG for presentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = stored.astype("<i2" if ds.PixelRepresentation else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _padded_region_in_output(box, size, inset=2):
    """Rows and columns of the output that show stored pixels of ``PADDED`` (no flip), minus an interpolation
    inset."""
    y0, x0, y1, x1 = box
    scale = min(size[0] / (y1 - y0), size[1] / (x1 - x0))
    top = (size[0] - min(size[0], round((y1 - y0) * scale))) // 2
    rows = slice(top + inset, top + math.floor((100 - y0) * scale) - inset)
    cols = slice(math.ceil((150 - x0) * scale) + inset, math.floor((x1 - x0) * scale) - inset)
    return rows, cols


def _stored(clean: np.ndarray, photometric: str, signed: bool) -> np.ndarray:
    """The phantom as stored in 12 bits: inverted for MONOCHROME1, shifted by 2048 when signed."""
    values = 4095 - clean if photometric == "MONOCHROME1" else clean
    return (values - 2048 if signed else values).astype(np.int16 if signed else np.uint16)


WINDOW = {"WindowCenter": 2048, "WindowWidth": 4096}
SIGNED_WINDOW = {"WindowCenter": 0, "WindowWidth": 4096}
RESCALED_WINDOW = {"RescaleSlope": 2, "RescaleIntercept": -100, "WindowCenter": 3996, "WindowWidth": 8192}
PADDED_RANGE = np.random.default_rng(3).integers(0, 41, PHANTOM_SHAPE)  # 0..40, every value of a padded range


@pytest.mark.parametrize(
    ("photometric", "signed", "padded_values", "padding_tags", "lut_tags"),
    [
        # Padding stored as 0 in MONOCHROME1 is displayed white: it must not become the breast.
        pytest.param("MONOCHROME1", False, 0, {"PixelPaddingValue": 0}, WINDOW, id="mono1"),
        # Without a window the percentile fallback must not count padding either.
        pytest.param("MONOCHROME1", False, 0, {"PixelPaddingValue": 0}, {}, id="mono1-fallback"),
        pytest.param("MONOCHROME2", False, 4095, {"PixelPaddingValue": 4095}, WINDOW, id="mono2"),
        pytest.param("MONOCHROME2", False, 4095, {"PixelPaddingValue": 4095}, {}, id="mono2-fallback"),
        # A range is inclusive, and the limit may lie below the value.
        pytest.param(
            "MONOCHROME2",
            False,
            4095 - PADDED_RANGE,
            {"PixelPaddingValue": 4095, "PixelPaddingRangeLimit": 4055},
            WINDOW,
            id="mono2-range",
        ),
        pytest.param(
            "MONOCHROME1",
            False,
            PADDED_RANGE,
            {"PixelPaddingValue": 0, "PixelPaddingRangeLimit": 40},
            {},
            id="mono1-range",
        ),
        # Signed stored values: -2048, the lowest 12-bit value, is white in MONOCHROME1.
        pytest.param("MONOCHROME1", True, -2048, {"PixelPaddingValue": -2048}, SIGNED_WINDOW, id="signed"),
        # The same value as pydicom hands it back when it took the tag for US: 0xF800.
        pytest.param("MONOCHROME1", True, -2048, {"PixelPaddingValue": 0xF800}, SIGNED_WINDOW, id="signed-as-us"),
        pytest.param("MONOCHROME2", True, 2047, {"PixelPaddingValue": 2047}, {}, id="signed-mono2-fallback"),
        # Padding is found on the stored values, before the rescale.
        pytest.param("MONOCHROME1", False, 0, {"PixelPaddingValue": 0}, RESCALED_WINDOW, id="rescaled"),
    ],
)
def test_pixel_padding_is_black_and_not_breast(photometric, signed, padded_values, padding_tags, lut_tags):
    """Padding (PS3.3 C.7.5.1.1.2) is black in the output and changes neither the window fallback nor the crop:
    the result matches the same image with the padded area left as background."""
    clean = _stored(_phantom(), photometric, signed)
    stored = np.where(PADDED, padded_values, clean).astype(clean.dtype)
    out, prov = imaging.preprocess_array(stored, _gray_ds(photometric, signed, **padding_tags, **lut_tags), SIZE)
    expected_out, expected = imaging.preprocess_array(clean, _gray_ds(photometric, signed, **lut_tags), SIZE)
    assert prov.padding_pixels == PADDED.sum() and expected.padding_pixels == 0
    assert (prov.voi, prov.breast_found, prov.flipped) == (expected.voi, True, False)
    assert max(abs(a - b) for a, b in zip(prov.crop_box, expected.crop_box, strict=True)) <= 4, prov.crop_box
    rows, cols = _padded_region_in_output(prov.crop_box, SIZE)
    assert out[rows, cols].size > 200
    assert not out[rows, cols].any()  # black, whatever the stored value and the photometric interpretation
    # The breast keeps its levels (the fallback's percentiles ignore the padded pixels).
    middle = slice(SIZE[0] // 2 - 20, SIZE[0] // 2 + 20)
    assert np.abs(out[middle, :60].astype(float) - expected_out[middle, :60]).mean() <= 0.01 * 65535


@pytest.mark.parametrize(
    ("photometric", "padded_value", "lut_tags"),
    [("MONOCHROME1", 0, WINDOW), ("MONOCHROME1", 0, {}), ("MONOCHROME2", 4095, WINDOW), ("MONOCHROME2", 4095, {})],
)
def test_padded_area_larger_than_the_breast_does_not_move_the_crop(photometric, padded_value, lut_tags):
    """A non-rectangular detector field padded over a third of the image: as tissue (white) it would be the
    largest region and the crop would keep it and cut the breast away."""
    clean = _stored(_phantom(), photometric, signed=False)
    stored = clean.copy()
    stored[:, 200:] = padded_value
    _, prov = imaging.preprocess_array(stored, _gray_ds(photometric, PixelPaddingValue=padded_value, **lut_tags), SIZE)
    _, expected = imaging.preprocess_array(clean, _gray_ds(photometric, **lut_tags), SIZE)
    assert prov.breast_found and prov.padding_pixels == stored[:, 200:].size
    assert max(abs(a - b) for a, b in zip(prov.crop_box, expected.crop_box, strict=True)) <= 4, prov.crop_box


def test_signed_padding_value_survives_a_file_round_trip(tmp_path):
    """Written as SS and read back through the decoder: the stored values and the padding tag are both signed."""
    stored = np.where(PADDED, -2048, 2047 - _phantom()).astype(np.int16)
    ds = _gray_ds("MONOCHROME1", signed=True, PixelPaddingValue=-2048, WindowCenter=0, WindowWidth=4096)
    path = _save(ds, stored, tmp_path / "signed_padding.dcm")
    pixels, read = imaging.decode(path)
    assert pixels.min() == -2048 and read.PixelPaddingValue == -2048
    out, prov = imaging.preprocess_file(path, SIZE)
    assert prov.padding_pixels == PADDED.sum() and prov.breast_found
    rows, cols = _padded_region_in_output(prov.crop_box, SIZE)
    assert out[rows, cols].size > 200 and not out[rows, cols].any()


@pytest.mark.parametrize(
    "tags",
    [{}, {"PixelPaddingValue": 4000}, {"PixelPaddingValue": 4000, "PixelPaddingRangeLimit": 4090}],
    ids=["no-tag", "value-not-present", "range-not-present"],
)
def test_padding_declared_but_unused_changes_nothing(tags):
    stored = _phantom().astype(np.uint16)
    expected, expected_prov = imaging.preprocess_array(stored, _gray_ds(), SIZE)
    out, prov = imaging.preprocess_array(stored, _gray_ds(**tags), SIZE)
    np.testing.assert_array_equal(out, expected)
    assert prov == expected_prov and prov.padding_pixels == 0


def test_percentile_fallback_leaves_padding_out():
    values = np.arange(1000, dtype=np.float32).reshape(20, 50)
    padding = np.zeros(values.shape, dtype=bool)
    padding[:, :10] = True  # the lowest fifth of the values, as a padded strip on the left would be
    out, voi = imaging.apply_voi(values, None, padding=padding)
    low, high = _stretch_levels(values, out)
    assert voi == "percentile_fallback"
    assert low == pytest.approx(np.percentile(values[~padding], imaging.PERCENTILE_FALLBACK[0]), abs=1e-3)
    np.testing.assert_allclose(out, np.clip((values - low) / (high - low), 0, 1), atol=1e-6)


def test_padded_jpeg2000_is_decoded_in_full(testdata):
    """The wavelet low-pass blends padding with its neighbours, so a padded file never takes the reduced decode."""
    ds = pydicom.dcmread(testdata / "RG3_J2KR.dcm")
    assert imaging._j2k_source(ds) is not None
    ds.PixelPaddingValue = 0
    assert imaging._j2k_source(ds) is None


@pytest.mark.parametrize(
    ("photometric", "shape", "stored_inverted", "inverted"),
    [
        ("MONOCHROME2", None, False, False),
        ("MONOCHROME2", "IDENTITY", False, False),
        ("MONOCHROME2", "INVERSE", True, True),  # PS3.3 C.11.6.1.2: the minimum value is displayed white
        pytest.param("MONOCHROME2", " inverse ", True, True, marks=pytest.mark.filterwarnings("ignore:Invalid value")),
        ("MONOCHROME1", "INVERSE", True, True),  # what the DX and MG modules require: one inversion, not two
        ("MONOCHROME1", None, True, True),
        ("MONOCHROME1", "IDENTITY", True, True),  # not allowed with MONOCHROME1; the photometric interpretation wins
    ],
)
def test_presentation_lut_shape(photometric, shape, stored_inverted, inverted):
    clean = _phantom()
    stored = (4095 - clean if stored_inverted else clean).astype(np.uint16)
    tags = dict(WINDOW)
    if shape is not None:
        tags["PresentationLUTShape"] = shape
    out, prov = imaging.preprocess_array(stored, _gray_ds(photometric, **tags), SIZE)
    expected, _ = imaging.preprocess_array(clean.astype(np.uint16), _gray_ds(**WINDOW), SIZE)
    assert prov.inverted is inverted
    assert np.abs(out.astype(np.int64) - expected).max() <= 1  # breast bright, background black


@pytest.mark.parametrize(
    "tags",
    [
        {"PresentationIntentType": "FOR PROCESSING"},
        pytest.param({"PresentationIntentType": "for processing "}, marks=pytest.mark.filterwarnings("ignore:Invalid")),
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.2.1"},  # Digital Mammography X-Ray Image Storage - For Processing
    ],
    ids=["intent", "intent-spelling", "sop-class"],
)
def test_for_processing_images_are_refused_per_file(tmp_path, tags):
    """A per-file ImageReadError naming the file, as prepare reports it in prepare_report.csv and goes on."""
    raw = np.exp(-_phantom() / 800) * 16000  # linear in dose: breast dark, background bright
    path = _save(_gray_ds(**tags), raw.astype(np.uint16), tmp_path / "raw.dcm")
    with pytest.raises(ImageReadError) as info:
        imaging.preprocess_file(path, SIZE)
    assert info.value.path == str(path) and "raw.dcm" in str(info.value)
    assert "for processing" in info.value.reason and "for presentation" in info.value.reason
    with pytest.raises(ValueError, match="for processing"):
        imaging.preprocess_array(*imaging.decode(path), SIZE)


@pytest.mark.parametrize(
    ("name", "intent"), [("MG_synthetic_pixelspacing_testobject.dcm", "FOR PRESENTATION"), ("RG3_J2KR.dcm", "")]
)
def test_presentation_intent_is_recorded(testdata, name, intent):
    _, prov = imaging.preprocess_file(testdata / name, SIZE)
    assert prov.presentation_intent == intent


@pytest.mark.parametrize(("given", "source"), [("L", "argument"), (None, "tag")])
def test_the_files_own_laterality_is_recorded_beside_a_given_one(testdata, given, source) -> None:
    # The MG test object says R; a table that says L wins (unless the image contradicts it clearly), and the tag is
    # kept so that prepare can count the disagreement.
    _, prov = imaging.preprocess_file(testdata / "MG_synthetic_pixelspacing_testobject.dcm", (64, 48), laterality=given)
    assert prov.tag_laterality == "R"
    assert prov.laterality_source in (source, "tag_overridden_by_image")
    assert imaging.preprocess_array(np.full((64, 48), 100, np.uint16), None, (32, 32))[1].tag_laterality == ""
