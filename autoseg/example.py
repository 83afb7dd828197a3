"""An example dataset that ships with the code: procedural brain-like T1 phantoms with 4-class labels.

It exists so that the whole pipeline (fingerprint, plan, preprocess, train, predict) can be run and
tested without downloading anything, on data that exercises the same decisions real pediatric brain MRI
does: heads of different sizes, grey/white contrast that flips in infancy, an unlabelled skull and scalp
around the brain (so crop-to-nonzero and normalising inside a mask matter), bias fields, noise, motion
ghosts and some thick-slice scans with anisotropic spacing.

``make_phantom`` builds one case in memory (pure, no I/O); ``make_example_dataset`` writes a dataset
folder in the nnU-Net v2 raw layout. Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from autoseg import atomic
from autoseg.errors import AutosegError
from autoseg.io import Geometry, write_image, write_segmentation

# --- dataset layout (nnU-Net v2 raw format) ---
DATASET_NAME = "Dataset001_BrainPhantom"
CASE_PREFIX = "phantom"
FILE_ENDING = ".nii.gz"
CHANNEL_NAMES = {"0": "T1"}
LABELS = {"background": 0, "csf": 1, "grey_matter": 2, "white_matter": 3}

# --- grid and spacing ---
MIN_SIZE = 16  # below this the cortical ribbon is thinner than a voxel and classes vanish
MAX_SIZE = 96  # keeps the default dataset a few seconds to generate and small enough to train on a laptop
SHAPE_JITTER_FRACTION = 0.1  # ±8 voxels per axis on the default 80 grid, so case shapes differ
IN_PLANE_SPACING_MM = 2.0  # coarse on purpose: a 80^3 grid then covers a 16 cm field of view like a head
THICK_SLICE_FRACTION = 0.25  # share of cases acquired as thick-slice 2D stacks, common in clinical pediatrics
THICK_SLICE_STEPS = (2, 3)  # keep every k-th slice: 4 or 6 mm slices, typical of clinical axial T1/T2
ORIGIN_JITTER_MM = 20.0  # scanners put the origin anywhere; the pipeline must not rely on it

# --- anatomy; lengths below are fractions of the brain's semi-axes unless they say otherwise ---
BRAIN_AXIS_RATIOS = (0.78, 1.0, 0.82)  # (z, y, x) semi-axes: brains are longest front to back
HEAD_FILL_RANGE = (0.6, 0.92)  # scalp semi-axis / half field of view, infant to adolescent head size
HEAD_CENTRE_JITTER = 0.04  # of the half field of view; heads are never perfectly centred
SKULL_THICKNESS = 0.12  # skull + scalp shell outside the brain
SKULL_INNER_SHARE = 0.5  # inner part of the shell is dark bone, the outer part bright scalp fat on T1
SHAPE_PERTURBATION = 0.05  # low-frequency wobble of the brain radius, so no two brains are ellipsoids
SHAPE_NOISE_GRID = 5  # control points per axis of the shape noise: only a few bumps per brain
CSF_THICKNESS_RANGE = (0.025, 0.05)  # subarachnoid CSF between brain surface and cortex; wider in infants
CORTEX_THICKNESS_RANGE = (0.08, 0.12)  # thicker than life (2.5 mm) so the ribbon survives 2 mm voxels
SULCUS_DEPTH_RANGE = (0.12, 0.22)  # how far sulci reach into the brain
SULCUS_WIDTH = 0.3  # in units of the folding field (std about 0.7): sulci about 1-2 voxels wide at size 80
FOLD_WAVES = 8  # random plane waves summed into the folding field; their zero sets are the sulci
FOLD_FREQUENCY_RANGE = (2.0, 3.2)  # cycles per brain semi-axis: a dozen or so gyri across an axial slice
FISSURE_HALF_WIDTH = 0.015  # interhemispheric fissure along the midline (x = 0)
FISSURE_DEPTH = 0.4  # the fissure stops at the corpus callosum
VENTRICLE_CENTRE = (0.08, 0.0, 0.1)  # (z, y, |x|) of each lateral ventricle's centre
VENTRICLE_RADII = (0.1, 0.32, 0.07)  # (z, y, x) semi-axes of each lateral ventricle
VENTRICLE_SPLAY = 0.1  # ventricles diverge towards the back, the "butterfly" seen on axial slices
VENTRICLE_SCALE_RANGE = (0.8, 1.4)  # ventricle size varies a lot between children
DEEP_GREY_CENTRE = (-0.05, 0.05, 0.25)  # (z, y, |x|) of each thalamus / basal ganglia block, labelled grey
DEEP_GREY_RADII = (0.14, 0.2, 0.09)

# --- contrast; intensities are relative to the brightest tissue before gain ---
INVERTED_CONTRAST_FRACTION = 1 / 3  # infants before ~6 months show inverted grey/white T1 contrast
ISOINTENSE_FRACTION = 1 / 4  # ~6-12 months grey and white matter are nearly isointense on T1
# (air, csf, grey matter, white matter, skull, scalp) per contrast regime
TISSUE_INTENSITIES = {
    "adult": (0.0, 0.2, 0.5, 0.8, 0.1, 0.9),
    "isointense": (0.0, 0.2, 0.55, 0.62, 0.1, 0.85),
    "inverted": (0.0, 0.15, 0.62, 0.4, 0.1, 0.8),
}
TISSUE_INTENSITY_JITTER = 0.03  # per-case change of each tissue mean, like scanner and sequence variation
PARTIAL_VOLUME_SIGMA_VOXELS = 0.6  # blur of the tissue map: voxel edges mix tissues as in a real scan
BIAS_MAX_AMPLITUDE = 0.3  # multiplicative bias field up to ±30%, typical of 3 T head coils
BIAS_NOISE_GRID = 3  # control points per axis: bias fields vary over the whole head, not locally
NOISE_SIGMA_RANGE = (0.01, 0.05)  # Rician noise sigma relative to the brightest tissue
GHOSTING_FRACTION = 0.2  # share of cases with motion ghosts (children move)
GHOST_LINE_PERIOD_RANGE = (4, 8)  # every n-th k-space line comes from a moved head -> ghosts at FOV / n
GHOST_SHIFT_RANGE_VOXELS = (2.0, 6.0)  # how far the head moved during those lines
SCANNER_GAIN_RANGE = (300.0, 1500.0)  # MRI intensities have no unit; each scan gets an arbitrary scale

# tissue codes used inside the generator; the label map keeps only the first four
AIR, CSF, GREY, WHITE, SKULL, SCALP = range(6)


@dataclass(frozen=True)
class PhantomParams:
    """Everything random about one phantom except the noise fields; ``sample_phantom_params`` draws it."""

    head_fill: float
    contrast: str  # a key of TISSUE_INTENSITIES
    intensities: tuple[float, ...]  # per tissue code
    csf_thickness: float
    cortex_thickness: float
    sulcus_depth: float
    ventricle_scale: float
    bias_amplitude: float
    noise_sigma: float
    ghost_period: int  # 0: no ghosting
    ghost_shift_voxels: float
    gain: float


# The age band of each contrast regime, for datasets of one regime only (``contrast=``).
CONTRAST_AGE_BANDS = {
    "inverted": (0.0, INVERTED_CONTRAST_FRACTION),
    "isointense": (INVERTED_CONTRAST_FRACTION, INVERTED_CONTRAST_FRACTION + ISOINTENSE_FRACTION),
    "adult": (INVERTED_CONTRAST_FRACTION + ISOINTENSE_FRACTION, 1.0),
}


def sample_phantom_params(rng: np.random.Generator, contrast: str | None = None) -> PhantomParams:
    """Draw one phantom's parameters. An age in [0, 1) drives both head size and contrast regime;
    ``contrast`` (a key of TISSUE_INTENSITIES) confines the age to that regime's band."""
    age = float(rng.uniform())
    if contrast is not None:
        if contrast not in CONTRAST_AGE_BANDS:
            raise AutosegError(f"contrast {contrast!r} is not one of {', '.join(CONTRAST_AGE_BANDS)}")
        low_age, high_age = CONTRAST_AGE_BANDS[contrast]
        age = low_age + (high_age - low_age) * age
    if age < INVERTED_CONTRAST_FRACTION:
        contrast = "inverted"
    elif age < INVERTED_CONTRAST_FRACTION + ISOINTENSE_FRACTION:
        contrast = "isointense"
    else:
        contrast = "adult"
    base = np.asarray(TISSUE_INTENSITIES[contrast])
    jitter = rng.uniform(-TISSUE_INTENSITY_JITTER, TISSUE_INTENSITY_JITTER, size=base.shape)
    intensities = tuple(float(v) for v in np.where(base > 0, base + jitter, 0.0))
    low, high = HEAD_FILL_RANGE
    head_fill = float(np.clip(low + (high - low) * age + rng.normal(0, 0.03), low, high))
    ghosted = rng.uniform() < GHOSTING_FRACTION
    return PhantomParams(
        head_fill=head_fill,
        contrast=contrast,
        intensities=intensities,
        csf_thickness=float(rng.uniform(*CSF_THICKNESS_RANGE)),
        cortex_thickness=float(rng.uniform(*CORTEX_THICKNESS_RANGE)),
        sulcus_depth=float(rng.uniform(*SULCUS_DEPTH_RANGE)),
        ventricle_scale=float(rng.uniform(*VENTRICLE_SCALE_RANGE)),
        bias_amplitude=float(rng.uniform(0, BIAS_MAX_AMPLITUDE)),
        noise_sigma=float(rng.uniform(*NOISE_SIGMA_RANGE)),
        ghost_period=int(rng.integers(GHOST_LINE_PERIOD_RANGE[0], GHOST_LINE_PERIOD_RANGE[1] + 1)) if ghosted else 0,
        ghost_shift_voxels=float(rng.uniform(*GHOST_SHIFT_RANGE_VOXELS)),
        gain=float(rng.uniform(*SCANNER_GAIN_RANGE)),
    )


def make_phantom(
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    rng: np.random.Generator,
    params: PhantomParams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One T1-like head image (float32, zero in the air) and its label map (uint8, ``LABELS``), both
    ``shape`` (z, y, x). The head is laid out in millimetres, so anisotropic ``spacing_mm`` works."""
    if len(shape) != 3 or min(shape) < 8:
        raise AutosegError(f"make_phantom: shape {shape} must be three axes of at least 8 voxels")
    params = params or sample_phantom_params(rng)
    tissue = _tissue_map(shape, spacing_mm, rng, params)
    image = _render(tissue, rng, params)
    label = np.where(tissue <= WHITE, tissue, AIR).astype(np.uint8)
    return image, label


def _smooth_noise(shape: tuple[int, int, int], grid: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a few random control points upsampled with a cubic spline,
    far cheaper than smoothing full-resolution noise."""
    coarse = rng.standard_normal((grid, grid, grid))
    # Spline upsampling is separable: one small (n, grid) weight matrix per axis, applied as a matrix
    # product, gives what a 3D ndimage.zoom gives about 20 times faster.
    weights = [ndimage.zoom(np.eye(grid), (n / grid, 1), order=3, mode="nearest") for n in shape]
    field = np.einsum("ai,bj,ck,ijk->abc", *weights, coarse, optimize=True)
    return field / max(float(np.abs(field).max()), 1e-6)


def _normalised_coords(
    shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], rng: np.random.Generator, fill: float
) -> list[np.ndarray]:
    """Open-grid coordinates (z, y, x) in units of the brain's semi-axes, centred on the head."""
    half_fov_mm = min(n * s for n, s in zip(shape, spacing_mm, strict=True)) / 2
    brain_mm = fill * half_fov_mm / (1 + SKULL_THICKNESS) / (1 + SHAPE_PERTURBATION)
    coords = []
    for axis, (n, s, ratio) in enumerate(zip(shape, spacing_mm, BRAIN_AXIS_RATIOS, strict=True)):
        centre_mm = (n - 1) * s / 2 + rng.uniform(-1, 1) * HEAD_CENTRE_JITTER * half_fov_mm
        view = [1, 1, 1]
        view[axis] = n
        coords.append(((np.arange(n) * s - centre_mm) / (brain_mm * ratio)).reshape(view))
    return coords


def _tissue_map(
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    rng: np.random.Generator,
    p: PhantomParams,
) -> np.ndarray:
    z, y, x = _normalised_coords(shape, spacing_mm, rng, p.head_fill)
    wobble = SHAPE_PERTURBATION * _smooth_noise(shape, SHAPE_NOISE_GRID, rng)
    radius = np.sqrt(z**2 + y**2 + x**2) / (1 + wobble)
    depth = 1 - radius  # > 0 inside the brain, about 1 at its centre

    # Cortical depth: distance-like to the nearest pial surface, the outer one or the medial one
    # along the interhemispheric fissure, so that the fissure is lined with cortex too.
    medial = np.abs(x) - FISSURE_HALF_WIDTH
    cortical_depth = np.where(depth < FISSURE_DEPTH, np.minimum(depth, medial), depth)
    csf_bound = p.csf_thickness + p.sulcus_depth * _sulci(z, y, x, rng)
    grey_bound = csf_bound + p.cortex_thickness

    tissue = np.full(shape, WHITE, dtype=np.uint8)
    tissue[cortical_depth < grey_bound] = GREY
    tissue[cortical_depth < csf_bound] = CSF
    tissue[_ellipsoid_pair(z, y, x, DEEP_GREY_CENTRE, DEEP_GREY_RADII, 0.0, 1.0)] = GREY
    ventricles = _ellipsoid_pair(z, y, x, VENTRICLE_CENTRE, VENTRICLE_RADII, VENTRICLE_SPLAY, p.ventricle_scale)
    tissue[ventricles] = CSF
    tissue[depth <= 0] = SCALP
    tissue[(depth <= 0) & (depth > -SKULL_THICKNESS * SKULL_INNER_SHARE)] = SKULL
    tissue[depth <= -SKULL_THICKNESS] = AIR
    return tissue


def _sulci(z: np.ndarray, y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sulcus strength in [0, 1]: 1 on the zero set of a sum of random plane waves (a net of folded
    lines on the brain surface), falling off within ``SULCUS_WIDTH``."""
    field = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape))
    for _ in range(FOLD_WAVES):
        direction = rng.standard_normal(3)
        direction *= 2 * np.pi * rng.uniform(*FOLD_FREQUENCY_RANGE) / np.linalg.norm(direction)
        field += np.sin(direction[0] * z + direction[1] * y + direction[2] * x + rng.uniform(0, 2 * np.pi))
    field /= np.sqrt(FOLD_WAVES)
    return np.exp(-((field / SULCUS_WIDTH) ** 2))


def _ellipsoid_pair(
    z: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
    splay: float,
    scale: float,
) -> np.ndarray:
    """Mask of two ellipsoids mirrored about x = 0; ``splay`` moves them apart towards the back (y > 0)."""
    cz, cy, cx = centre
    rz, ry, rx = (r * scale for r in radii)
    offset_x = cx + splay * np.clip(y - cy, 0, None)
    core = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2
    return np.asarray(core + ((np.abs(x) - offset_x) / rx) ** 2 < 1)


def _render(tissue: np.ndarray, rng: np.random.Generator, p: PhantomParams) -> np.ndarray:
    """Tissue map -> scanner-like image: partial volume, bias field, ghosts, Rician noise, gain."""
    head = tissue != AIR
    image = np.asarray(p.intensities, dtype=np.float32)[tissue]
    image = ndimage.gaussian_filter(image, PARTIAL_VOLUME_SIGMA_VOXELS)
    image *= 1 + p.bias_amplitude * _smooth_noise(tissue.shape, BIAS_NOISE_GRID, rng).astype(np.float32)
    if p.ghost_period:
        image = _ghost(image, rng, p.ghost_period, p.ghost_shift_voxels)
    scale = p.noise_sigma * max(p.intensities)
    real = image + rng.normal(0, scale, image.shape).astype(np.float32)
    imaginary = rng.normal(0, scale, image.shape).astype(np.float32)
    # magnitude of complex Gaussian noise: Rician, positive everywhere in the head
    image = np.sqrt(real**2 + imaginary**2)
    # Air is exactly zero, as after a scanner's background suppression, so crop-to-nonzero finds the head.
    return np.where(head, image * p.gain, 0).astype(np.float32)


def _ghost(image: np.ndarray, rng: np.random.Generator, period: int, shift_voxels: float) -> np.ndarray:
    """Motion ghosts: every ``period``-th phase-encoding line of k-space is taken from a head shifted by
    ``shift_voxels`` (a linear phase ramp), which puts attenuated copies at multiples of FOV / period."""
    axis = int(rng.integers(1, 3))  # phase encoding runs in-plane: y or x
    n = image.shape[axis]
    spectrum = np.fft.fft(image, axis=axis)
    ramp = np.exp(-2j * np.pi * np.fft.fftfreq(n) * shift_voxels)
    moved = np.arange(n) % period == int(rng.integers(0, period))
    factor = np.where(moved, ramp, 1.0)
    view = [1, 1, 1]
    view[axis] = n
    return np.abs(np.fft.ifft(spectrum * factor.reshape(view), axis=axis)).astype(np.float32)


@dataclass(frozen=True)
class CaseInfo:
    """What makes one case easy or hard: for reporting results by acquisition condition."""

    contrast: str  # adult, isointense or inverted grey/white contrast
    head_fill: float  # scalp semi-axis / half field of view: small values are infant heads
    ghosted: bool  # motion ghosts in k-space
    slice_step: int  # 1, or the factor of a thick-slice acquisition

    @property
    def clean(self) -> bool:
        """Adult contrast, no motion, thin slices: the cases every method gets right."""
        return self.contrast == "adult" and not self.ghosted and self.slice_step == 1


def make_case(
    index: int, seed: int = 0, size: int = 80, contrast: str | None = None
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Case ``index`` of the example dataset: image, label and geometry, from its own generator."""
    image, label, geometry, _ = make_case_with_info(index, seed, size, contrast)
    return image, label, geometry


def make_case_with_info(
    index: int, seed: int = 0, size: int = 80, contrast: str | None = None
) -> tuple[np.ndarray, np.ndarray, Geometry, CaseInfo]:
    """``make_case`` and the conditions the case was drawn with."""
    rng = np.random.default_rng([seed, index])
    jitter = round(size * SHAPE_JITTER_FRACTION)
    nz, ny, nx = (int(n) for n in size + rng.integers(-jitter, jitter + 1, size=3))
    spacing = (IN_PLANE_SPACING_MM, IN_PLANE_SPACING_MM, IN_PLANE_SPACING_MM)
    params = sample_phantom_params(rng, contrast)
    image, label = make_phantom((nz, ny, nx), spacing, rng, params)
    step = 1
    if rng.uniform() < THICK_SLICE_FRACTION:
        step = int(rng.choice(THICK_SLICE_STEPS))
        offset = int(rng.integers(0, step))
        # A thick slice averages the tissue across its slab; its label is a slice inside that slab.
        image = ndimage.uniform_filter1d(image, step, axis=0)[offset::step]
        label = label[offset::step]
        spacing = (IN_PLANE_SPACING_MM * step, IN_PLANE_SPACING_MM, IN_PLANE_SPACING_MM)
    extent_xyz = [n * s for n, s in zip(reversed(image.shape), reversed(spacing), strict=True)]
    origin = tuple(float(-e / 2 + rng.uniform(-ORIGIN_JITTER_MM, ORIGIN_JITTER_MM)) for e in extent_xyz)
    identity = tuple(float(v) for v in np.eye(3).ravel())
    info = CaseInfo(params.contrast, params.head_fill, params.ghost_period > 0, step)
    return image, label, Geometry(spacing, origin, identity), info


def case_ids(num_training: int, num_test: int) -> tuple[list[str], list[str]]:
    """Training and test case ids; test cases continue the numbering so every id is unique."""
    ids = [f"{CASE_PREFIX}_{i:03d}" for i in range(num_training + num_test)]
    return ids[:num_training], ids[num_training:]


def dataset_json(
    num_training: int, num_test: int, size: int, seed: int, contrast: str | None = None, name: str = DATASET_NAME
) -> dict[str, object]:
    regimes = (
        "heads from infant to adolescent size, adult, isointense and inverted grey/white contrast"
        if contrast is None
        else f"{contrast} grey/white contrast only, heads of that age band"
    )
    return {
        "name": name,
        "description": (
            f"Procedural pediatric brain T1 phantoms ({num_training} training, {num_test} test cases, "
            f"base grid {size}^3, seed {seed}): {regimes}, bias field, noise, motion ghosts, some"
            " thick-slice scans."
        ),
        "reference": "Synthetic; generated by autoseg.example.make_example_dataset",
        "licence": "CC0-1.0",
        "channel_names": dict(CHANNEL_NAMES),
        "labels": dict(LABELS),
        "numTraining": num_training,
        "file_ending": FILE_ENDING,
    }


def make_example_dataset(
    out_dir: str | Path,
    num_training: int = 24,
    num_test: int = 6,
    size: int = 80,
    seed: int = 0,
    show_progress: bool = True,
    overwrite: bool = False,
    contrast: str | None = None,
    dataset_name: str = DATASET_NAME,
) -> Path:
    """Write ``out_dir/Dataset001_BrainPhantom`` (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json)
    and return it. Everything is written into a hidden sibling folder that is renamed at the end, so an
    interrupted run leaves no half-written dataset behind. ``contrast`` ("adult", "isointense" or
    "inverted") makes every case of that contrast regime, under the folder name ``dataset_name``: a pair
    of such datasets is a transfer-learning experiment (train on adult contrast, fine-tune on infants)."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise AutosegError(f"make_example_dataset: size={size} (--size) must lie in [{MIN_SIZE}, {MAX_SIZE}]")
    if num_training < 1 or num_test < 0:
        raise AutosegError(f"make_example_dataset: num_training={num_training} must be >= 1, num_test={num_test} >= 0")
    out_dir = Path(out_dir)
    if contrast is not None and contrast not in CONTRAST_AGE_BANDS:
        known = ", ".join(CONTRAST_AGE_BANDS)
        raise AutosegError(f"make_example_dataset: contrast={contrast!r} must be one of {known}")
    target = out_dir / dataset_name
    training, test = case_ids(num_training, num_test)
    description = dataset_json(num_training, num_test, size, seed, contrast, dataset_name)
    if target.exists() and not overwrite:
        if _holds_exactly(target, description, training, test):
            return target  # the same example, complete: running the quickstart twice just reuses it
        raise _exists_error(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset_name}.partial-", dir=out_dir))
    try:
        cases = [("Tr", c) for c in training] + [("Ts", c) for c in test]
        for index, (split, case_id) in enumerate(tqdm(cases, desc=dataset_name, disable=not show_progress)):
            image, label, geometry = make_case(index, seed, size, contrast)
            write_image(image, geometry, staging / f"images{split}" / f"{case_id}_0000{FILE_ENDING}")
            write_segmentation(label, geometry, staging / f"labels{split}" / f"{case_id}{FILE_ENDING}")
        for split in ("Tr", "Ts"):  # present even when empty, as nnU-Net expects
            (staging / f"images{split}").mkdir(exist_ok=True)
            (staging / f"labels{split}").mkdir(exist_ok=True)
        atomic.write_json(staging / "dataset.json", description)
        _move_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _holds_exactly(target: Path, description: dict[str, object], training: list[str], test: list[str]) -> bool:
    """True when ``target`` is this very example (same settings, every file, nothing else)."""
    try:
        if json.loads((target / "dataset.json").read_text(encoding="utf-8")) != description:
            return False
    except (OSError, ValueError):
        return False
    expected = {"dataset.json"}
    for split, ids in (("Tr", training), ("Ts", test)):
        expected |= {f"images{split}/{c}_0000{FILE_ENDING}" for c in ids} | {f"images{split}", f"labels{split}"}
        expected |= {f"labels{split}/{c}{FILE_ENDING}" for c in ids}
    present = {p.relative_to(target).as_posix() for p in target.rglob("*")}
    return present == expected


def _exists_error(target: Path) -> AutosegError:
    missing = [
        name
        for name in ("dataset.json", "imagesTr", "labelsTr", "imagesTs", "labelsTs")
        if not (target / name).exists()
    ]
    state = f"is incomplete (missing {', '.join(missing)})" if missing else "holds a complete dataset"
    return AutosegError(
        f"{target} already exists and {state}, made with other settings or changed since; pass --overwrite"
        " (overwrite=True) to replace it, or choose another output folder"
    )


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``target``; an existing target (only with ``overwrite``) is moved aside first
    and deleted last, so at every moment one complete dataset exists under some name."""
    if not target.exists():
        os.replace(staging, target)
        return
    if not overwrite:  # appeared while we were generating
        raise _exists_error(target)
    retired = staging.with_name(staging.name.replace(".partial-", ".old-"))
    os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
