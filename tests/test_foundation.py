"""Serialization, the registry, atomic writes, paths and image I/O."""

from __future__ import annotations

import gzip
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import IDENTITY

from autoseg import atomic, serialization
from autoseg.errors import AutosegError, SchemaError
from autoseg.io import Geometry, read_image, write_image, write_segmentation
from autoseg.paths import Paths
from autoseg.registry import Registry, load_plugin_file


@dataclass(frozen=True)
class Inner:
    size: tuple[int, ...]
    scale: float


@dataclass(frozen=True)
class Outer:
    SCHEMA_VERSION = 2

    schema_version: int
    name: str
    inner: Inner
    table: dict[str, Inner]
    note: str | None = None


def sample() -> Outer:
    return Outer(2, "x", Inner((1, 2), 0.5), {"a": Inner((3,), 1.0)})


def test_round_trip(tmp_path):
    serialization.save(sample(), tmp_path / "o.json")
    assert serialization.load(Outer, tmp_path / "o.json") == sample()


def test_ints_are_accepted_as_floats():
    data = serialization.to_jsonable(sample())
    data["inner"]["scale"] = 1
    assert serialization.from_jsonable(Outer, data).inner.scale == 1.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(extra=1), "unknown field(s) extra"),
        (lambda d: d.pop("name"), "missing field 'name'"),
        (lambda d: d["inner"].update(size=[1, "2"]), "inner.size[1]: expected an integer"),
        (lambda d: d["table"]["a"].update(scale="big"), "table.a.scale: expected a number"),
        (lambda d: d.update(schema_version=1), "schema_version 1 is not the supported version 2"),
        (lambda d: d["inner"].update(size=[True]), "expected an integer, got bool"),
    ],
)
def test_strict_errors_name_the_field(tmp_path, edit, message):
    data = serialization.to_jsonable(sample())
    edit(data)
    atomic.write_json(tmp_path / "bad.json", data)
    with pytest.raises(SchemaError) as info:
        serialization.load(Outer, tmp_path / "bad.json")
    assert message in str(info.value) and "bad.json" in str(info.value)


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(SchemaError, match=r"x.json: not valid JSON"):
        serialization.load(Outer, tmp_path / "x.json")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.npy"

    def explode(path):
        path.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic.write_with(target, explode)
    assert list(tmp_path.iterdir()) == []
    atomic.save_npy(target, np.arange(3))
    assert np.load(target).tolist() == [0, 1, 2] and len(list(tmp_path.iterdir())) == 1


def test_registry_suggests_close_names():
    things: Registry[int] = Registry("widget")
    things.register("plain_unet")(1)
    things.register("resenc_unet")(2)
    assert things.get("plain_unet") == 1
    with pytest.raises(AutosegError, match=r"unknown widget 'plain_unt'. Did you mean 'plain_unet'"):
        things.get("plain_unt")
    with pytest.raises(AutosegError, match="two widgets"):
        things.register("plain_unet")(3)


def test_plugin_file_registers_a_planner(tmp_path):
    from autoseg.planning import PLANNERS

    plugin = tmp_path / "my_planner.py"
    plugin.write_text(
        "from autoseg.planning import Planner, register_planner\n\n"
        "@register_planner('tiny_test_planner')\n"
        "class TinyPlanner(Planner):\n"
        "    '''Plans for 4 GB.'''\n"
    )
    load_plugin_file(plugin)
    assert "tiny_test_planner" in PLANNERS.names() and "default" in PLANNERS.names()
    with pytest.raises(AutosegError, match="does not exist"):
        load_plugin_file(tmp_path / "missing.py")


def test_paths_flag_then_environment_then_error(tmp_path, monkeypatch):
    monkeypatch.delenv("AUTOSEG_PREPROCESSED", raising=False)
    with pytest.raises(AutosegError, match="--preprocessed DIR or set the environment variable AUTOSEG_PREPROCESSED"):
        Paths.resolve(None)
    monkeypatch.setenv("AUTOSEG_PREPROCESSED", str(tmp_path / "env"))
    assert Paths.resolve(None).preprocessed == tmp_path / "env"
    assert Paths.resolve(tmp_path / "flag").preprocessed == tmp_path / "flag"


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_io_keeps_geometry(tmp_path, ending):
    geometry = Geometry((3.0, 0.8, 0.7), (10.0, -5.0, 2.5), (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    seg = np.random.default_rng(0).integers(0, 4, (5, 6, 7)).astype(np.uint8)
    write_segmentation(seg, geometry, tmp_path / f"s{ending}")
    back, g = read_image(tmp_path / f"s{ending}")
    assert np.array_equal(back, seg) and g.matches(geometry, tolerance=1e-6) == []


def test_truncated_nifti_is_refused(tmp_path):
    path = tmp_path / "x.nii.gz"
    write_image(np.random.rand(8, 9, 10).astype(np.float32), Geometry((1.0, 1.0, 1.0), (0, 0, 0), IDENTITY), path)
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) // 2]))
    with pytest.raises(AutosegError, match="truncated"):
        read_image(path)
