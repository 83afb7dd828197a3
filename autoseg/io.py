"""Reading and writing images through SimpleITK, keeping spacing, origin and direction.

Arrays are in SimpleITK's numpy order: (z, y, x) for a 3D image, (channel, z, y, x) for a case.
``Geometry.spacing_mm`` follows that order; ``origin`` and ``direction`` stay in ITK's (x, y, z) order
because they only ever go back to SimpleITK. A 2D image file is read as one slice (1, y, x) whose
slice spacing is set to ``FAKE_SLICE_SPACING_MM``, so that 2D data runs through the 3D code unchanged.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg import atomic
from autoseg.errors import AutosegError

SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
# nnU-Net's convention for 2D images: a slice distance far above any in-plane spacing, so the planner
# never pools or resamples across it.
FAKE_SLICE_SPACING_MM = 999.0


@dataclass(frozen=True)
class Geometry:
    spacing_mm: tuple[float, ...]  # (z, y, x)
    origin: tuple[float, ...]  # ITK order (x, y, z)
    direction: tuple[float, ...]  # ITK row-major direction matrix
    is_2d: bool = False

    def matches(self, other: Geometry, tolerance: float = 1e-3) -> list[str]:
        """Names of the geometry fields that differ from ``other`` by more than ``tolerance`` (relative)."""
        bad = []
        for name in ("spacing_mm", "origin", "direction"):
            a = np.asarray(getattr(self, name), dtype=float)
            b = np.asarray(getattr(other, name), dtype=float)
            scale = max(1.0, float(np.abs(a).max(initial=0)), float(np.abs(b).max(initial=0)))
            if a.shape != b.shape or np.abs(a - b).max(initial=0) > tolerance * scale:
                bad.append(name)
        return bad


def file_ending(path: str | Path) -> str:
    """The supported ending of ``path`` (``.nii.gz`` counts as one ending), or '' if none."""
    name = str(path).lower()
    return next((e for e in SUPPORTED_ENDINGS if name.endswith(e)), "")


def nifti_truncation(path: str | Path) -> str | None:
    """Why a NIfTI file is incomplete, or None. SimpleITK fills a truncated NIfTI with zeros silently
    (it does refuse truncated .nrrd / .mha files), so this is checked before trusting one."""
    path = Path(path)
    ending = file_ending(path)
    if ending not in (".nii", ".nii.gz"):
        return None
    opener = gzip.open if ending == ".nii.gz" else open
    try:
        with opener(path, "rb") as f:
            header = f.read(NIFTI2_HEADER_BYTES)
    except (OSError, EOFError) as exc:
        return f"unreadable ({exc})"
    expected = _nifti_expected_bytes(header)
    if expected is None:
        return "not a NIfTI file (bad header)"
    actual = path.stat().st_size if ending == ".nii" else _gzip_length(path, expected)
    if actual < expected:
        return f"truncated: {actual} of {expected} bytes present"
    return None


NIFTI1_HEADER_BYTES = 348
NIFTI2_HEADER_BYTES = 540


def _nifti_expected_bytes(header: bytes) -> int | None:
    for order in ("<", ">"):
        if len(header) >= NIFTI1_HEADER_BYTES and struct.unpack(order + "i", header[:4])[0] == NIFTI1_HEADER_BYTES:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= NIFTI2_HEADER_BYTES and struct.unpack(order + "i", header[:4])[0] == NIFTI2_HEADER_BYTES:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    if not 0 < dims[0] <= 7:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64))
    return max(offset, NIFTI1_HEADER_BYTES) + voxels * bitpix // 8


def _gzip_length(path: Path, expected: int) -> int:
    """Uncompressed length. The gzip trailer stores it (mod 2**32) for the common single-member file;
    only when that disagrees is the file decompressed to count (multi-member files, or truncation)."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if struct.unpack("<I", f.read(4))[0] == expected % 2**32:
            return expected
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        pass
    return total


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read one file. 3D images come back as (z, y, x), 4D ones as (t, z, y, x), 2D as (1, y, x)."""
    path = Path(path)
    problem = nifti_truncation(path)
    if problem:
        raise AutosegError(f"{path}: cannot be read as an image ({problem})")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise AutosegError(f"{path}: cannot be read as an image ({first_line})") from None
    array = sitk.GetArrayFromImage(image)
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    origin = tuple(float(o) for o in image.GetOrigin())
    direction = tuple(float(d) for d in image.GetDirection())
    if image.GetDimension() == 2:
        return array[None], Geometry((FAKE_SLICE_SPACING_MM, *spacing), origin, direction, is_2d=True)
    if image.GetDimension() == 4:
        # (t, z, y, x): the geometry is that of the spatial part
        return array, Geometry(spacing[1:], origin[:3], _spatial_direction(direction), is_2d=False)
    return array, Geometry(spacing, origin, direction)


def _spatial_direction(direction4: tuple[float, ...]) -> tuple[float, ...]:
    m = np.asarray(direction4).reshape(4, 4)[:3, :3]
    return tuple(float(v) for v in m.ravel())


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    if geometry.is_2d:
        image = sitk.GetImageFromArray(array[0])
        image.SetSpacing(tuple(reversed(geometry.spacing_mm[1:])))
    else:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(reversed(geometry.spacing_mm)))
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path, compress: bool = True) -> None:
    """Write a (z, y, x) array with ``geometry`` to ``path`` atomically; the ending picks the format."""
    ending = file_ending(path)
    if not ending:
        raise AutosegError(f"{path}: unsupported file ending; use one of {', '.join(SUPPORTED_ENDINGS)}")
    image = to_sitk(array, geometry)
    if ending == ".mhd":
        _write_mhd(image, Path(path), compress)
        return
    atomic.write_with(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=compress), suffix=ending)


def _write_mhd(image: sitk.Image, path: Path, compress: bool) -> None:
    """A .mhd header names its data file, so both are written under their final names in a temporary
    folder beside the target and moved over: the data file first, the header (which readers open) last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp_dir:
        sitk.WriteImage(image, str(Path(tmp_dir) / path.name), useCompression=compress)
        for produced in sorted(Path(tmp_dir).iterdir(), key=lambda p: p.suffix == ".mhd"):
            os.replace(produced, path.parent / produced.name)


def write_segmentation(seg: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write a label map as 8-bit (or 16-bit when needed) integers."""
    dtype = np.uint8 if seg.max(initial=0) < 256 and seg.min(initial=0) >= 0 else np.int16
    write_image(seg.astype(dtype, copy=False), geometry, path)
