"""Model bundles: export, import, and the refusal of every bundle that could write outside its folder or run code."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import write_dataset

from autoseg import pipeline, serialization
from autoseg.bundle import export_bundle, extract_bundle, import_bundle, is_bundle, opened_bundle
from autoseg.bundle.format import PNG_SIGNATURE
from autoseg.errors import AutosegError
from autoseg.evaluation.best import BestChoice, CandidateScore, ModelRef, Postprocessing, load_best, save_best
from autoseg.inference.weights import load_fold_weights, load_safetensors, save_safetensors
from autoseg.networks import build_network
from autoseg.paths import Paths
from autoseg.plan import Plan
from autoseg.training.checkpoint import load_checkpoint, save_checkpoint

DATASET = "Dataset009_Tiny"
FOLDS = (0, 1)
MEMBERS = (ModelRef("default", "default", "2d"), ModelRef("default", "default", "3d_fullres"))
LABELS = {"background": 0, "outer": 1, "inner": 2}


def _write_results(root: Path) -> Path:
    """A results folder as training and find-best leave it: an ensemble of two models with two folds each."""
    raw = write_dataset(root / "raw" / DATASET)
    paths = Paths(root / "preprocessed")
    pipeline.fingerprint(raw, paths, num_workers=1, show_progress=False)
    plan = serialization.load(Plan, pipeline.plan(raw, paths))
    results = root / "results" / DATASET
    torch.manual_seed(0)
    for member in MEMBERS:
        model_dir = results / member.folder
        model_dir.mkdir(parents=True)
        serialization.save(plan, model_dir / "plan.json")
        shutil.copy(raw / "dataset.json", model_dir / "dataset.json")
        configuration = plan.configuration(member.configuration)
        for fold in FOLDS:
            network = build_network(configuration.network, 1, len(LABELS))
            optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99)
            metadata = {  # as autoseg.training.resume.checkpoint_metadata writes it
                "trainer": member.trainer, "dataset": DATASET, "planner": member.planner,
                "configuration": member.configuration, "fold": fold, "num_input_channels": 1, "labels": LABELS,
                "network": serialization.to_jsonable(configuration.network), "mirror_axes": [0, 1],
                "epochs": 2, "position": {"epoch": 2}, "log": [{"epoch": 0, "train_loss": 0.5}],
            }  # fmt: skip
            state = {
                "network": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
            }
            save_checkpoint(model_dir / f"fold_{fold}" / "checkpoint_final.pt", state, metadata)
            run = {"status": "finished", "trainer": member.trainer, "fold": fold, "epochs": 2}
            (model_dir / f"fold_{fold}" / "run.json").write_text(json.dumps(run))
    score = CandidateScore("+".join(m.folder for m in MEMBERS), MEMBERS, 0.8, {"1": 0.85, "2": 0.75})
    best = BestChoice(BestChoice.SCHEMA_VERSION, DATASET, MEMBERS, FOLDS, "checkpoint_final.pt",
                      Postprocessing(True, (2,)), ".nii.gz", LABELS, ("T1",), 0.8, 0.81, 3, 3, (score,))  # fmt: skip
    save_best(best, results)
    (results / "report.md").write_text("# find-best report\n")
    (results / "report").mkdir()
    (results / "report" / "dice.png").write_bytes(PNG_SIGNATURE + bytes(range(64)))
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_results(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def bundle(results: Path) -> Path:
    return export_bundle(results, results.parent.parent / "model.zip")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_round_trip_keeps_every_tensor_bit_for_bit_and_every_file(results: Path, bundle: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(bundle) as archive:
        names = archive.namelist()
        manifest = json.loads(archive.read(f"{DATASET}/manifest.json"))
        for relative, entry in manifest["files"].items():
            data = archive.read(f"{DATASET}/{relative}")
            assert (_sha256(data), len(data)) == (entry["sha256"], entry["bytes"])
    assert all(name.startswith(f"{DATASET}/") for name in names)
    assert not [name for name in names if name.endswith(".pt")]  # weights travel as safetensors only
    assert manifest["format"] == "autoseg-bundle" and manifest["schema_version"] == 1
    assert (manifest["trainers"], manifest["networks"]) == (["default"], ["plain_unet"])
    per_model = 2 + 2 * len(FOLDS)  # plan.json, dataset.json; per fold run.json, model.safetensors
    assert len(manifest["files"]) == 3 + len(MEMBERS) * per_model  # and best.json, report.md, report/dice.png

    folder = import_bundle(bundle, tmp_path / "results")
    assert folder == tmp_path / "results" / DATASET
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [DATASET]  # no staging folder left
    assert load_best(folder) == load_best(results)
    for relative in manifest["files"]:
        if not relative.endswith(".safetensors"):
            assert (folder / relative).read_bytes() == (results / relative).read_bytes(), relative
    for member in MEMBERS:
        for fold in FOLDS:
            original, _ = load_checkpoint(results / member.folder / f"fold_{fold}" / "checkpoint_final.pt")
            tensors, metadata = load_fold_weights(folder / member.folder / f"fold_{fold}")
            assert tensors.keys() == original["network"].keys()
            for key, tensor in original["network"].items():
                assert tensors[key].dtype == tensor.dtype and torch.equal(tensors[key], tensor), key
            assert (metadata["fold"], metadata["configuration"], metadata["labels"]) == (
                fold, member.configuration, LABELS,
            )  # fmt: skip
            assert "log" not in metadata and "position" not in metadata  # training state stays behind
    # an imported model exports again (from its safetensors), with the same tensors
    again = export_bundle(folder, tmp_path / "again.zip")
    with opened_bundle(again) as reopened:
        tensors, _ = load_fold_weights(reopened / MEMBERS[1].folder / "fold_1")
        original, _ = load_checkpoint(results / MEMBERS[1].folder / "fold_1" / "checkpoint_final.pt")
        assert all(torch.equal(tensors[k], t) for k, t in original["network"].items())
    assert not reopened.exists()
    assert is_bundle(bundle) and not is_bundle(folder)


def test_import_refuses_an_existing_folder_unless_told_to_replace_it(bundle: Path, tmp_path: Path) -> None:
    folder = import_bundle(bundle, tmp_path)
    (folder / "mine.txt").write_text("a model of my own")
    with pytest.raises(AutosegError, match="already exists.*--overwrite"):
        import_bundle(bundle, tmp_path)
    assert (folder / "mine.txt").is_file()
    assert import_bundle(bundle, tmp_path, overwrite=True) == folder
    assert not (folder / "mine.txt").exists() and (folder / "best.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATASET]


def test_export_of_fewer_folds_rewrites_best_json(results: Path, tmp_path: Path) -> None:
    with opened_bundle(export_bundle(results, tmp_path / "fold1.zip", folds=[1])) as folder:
        assert load_best(folder).folds == (1,)
        assert not (folder / MEMBERS[0].folder / "fold_0").exists()
        assert (folder / MEMBERS[0].folder / "fold_1" / "model.safetensors").is_file()
    with pytest.raises(AutosegError, match="fold.s. 7 are not among"):
        export_bundle(results, tmp_path / "x.zip", folds=[7])


def test_export_refuses_missing_best_json_or_weights(results: Path, tmp_path: Path) -> None:
    with pytest.raises(AutosegError, match="find-best"):
        export_bundle(tmp_path, tmp_path / "x.zip")
    copy = tmp_path / DATASET
    shutil.copytree(results, copy)
    (copy / MEMBERS[1].folder / "fold_1" / "checkpoint_final.pt").unlink()
    with pytest.raises(AutosegError, match=r"fold_1: no checkpoint_final.pt.*--folds"):
        export_bundle(copy, tmp_path / "x.zip")
    with pytest.raises(AutosegError, match="no checkpoint_best.pt"):
        export_bundle(copy, tmp_path / "x.zip", folds=[0], checkpoint="checkpoint_best.pt")
    assert not (tmp_path / "x.zip").exists()


# --- refused bundles --------------------------------------------------------------------------------------------

Files = dict[str, bytes | tuple[int, bytes]]  # zip name -> content, or (unix mode, content)
TOP = f"{DATASET}/"
FOLD_WEIGHTS = f"{TOP}{MEMBERS[1].folder}/fold_0/model.safetensors"


def _repack(bundle: Path, out: Path, edit: Callable[[Files], None], fix_manifest: bool) -> Path:
    """Rewrite ``bundle`` with ``edit`` applied; ``fix_manifest`` makes the manifest match the new files."""
    with zipfile.ZipFile(bundle) as archive:
        files: Files = {info.filename: archive.read(info) for info in archive.infolist()}
    edit(files)
    manifest_name = f"{TOP}manifest.json"
    if fix_manifest and manifest_name in files:
        manifest = json.loads(files[manifest_name])  # type: ignore[arg-type]
        contents = {name: data if isinstance(data, bytes) else data[1] for name, data in files.items()}
        manifest["files"] = {name.split("/", 1)[-1]: {"sha256": _sha256(data), "bytes": len(data)}
                             for name, data in contents.items() if name != manifest_name}  # fmt: skip
        files[manifest_name] = json.dumps(manifest).encode()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            if isinstance(data, tuple):
                info.external_attr, data = data[0] << 16, data[1]
            archive.writestr(info, data)
    return out


def _pickle_payload(marker: Path) -> bytes:
    class Payload:  # unpickling this would create ``marker``
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.mkdir, (str(marker),)

    return pickle.dumps(Payload())


def _torch_file() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.ones(2)}, buffer)
    return buffer.getvalue()


def _edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Files], None]:
    def edit(files: Files) -> None:
        data = json.loads(files[name])  # type: ignore[arg-type]
        change(data)
        files[name] = json.dumps(data).encode()

    return edit


def _rename_trainer(files: Files) -> None:
    """The same models, as if trained with a plug-in trainer ``lab_trainer`` that is not installed here."""
    for name in list(files):
        data = files.pop(name)
        assert isinstance(data, bytes)
        if name.endswith(".json"):
            data = data.replace(b'"default__', b'"lab_trainer__')
            data = data.replace(b'"trainer": "default"', b'"trainer": "lab_trainer"')
        if name.endswith(".safetensors"):
            tensors, metadata = safetensors_from_bytes(data)
            data = safetensors_bytes(tensors, {**metadata, "trainer": "lab_trainer"})
        files[name.replace("default__default", "lab_trainer__default")] = data
    best = json.loads(files[f"{TOP}best.json"])  # type: ignore[arg-type]
    for member in best["members"]:
        member["trainer"] = "lab_trainer"
    files[f"{TOP}best.json"] = json.dumps(best).encode()


def safetensors_from_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "w.safetensors").write_bytes(data)
        return load_safetensors(Path(tmp) / "w.safetensors")


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_safetensors(Path(tmp) / "w.safetensors", tensors, metadata)
        return (Path(tmp) / "w.safetensors").read_bytes()


def _replace(name: str, old: bytes, new: bytes) -> Callable[[Files], None]:
    def edit(files: Files) -> None:
        assert isinstance(files[name], bytes) and old in files[name]  # type: ignore[operator]
        files[name] = files[name].replace(old, new)  # type: ignore[union-attr]

    return edit


def _set_architecture(plan: dict) -> None:
    plan["configurations"]["3d_fullres"]["network"]["architecture"] = "lab_net"


def _flip_a_byte(name: str) -> Callable[[Files], None]:
    def edit(files: Files) -> None:
        data = bytearray(files[name])  # type: ignore[arg-type]
        data[len(data) // 2] ^= 0xFF
        files[name] = bytes(data)

    return edit


def _swap_folds(files: Files) -> None:
    other = FOLD_WEIGHTS.replace("fold_0", "fold_1")
    files[FOLD_WEIGHTS], files[other] = files[other], files[FOLD_WEIGHTS]


MARKER = "unpickled-marker"
REFUSALS: dict[str, tuple[Callable[[Files], None], bool, str]] = {  # edit, fix the manifest, error pattern
    "parent folder": (lambda f: f.update({"../evil.json": b"{}"}), True, "'../evil.json' is refused"),
    "inside then up": (lambda f: f.update({f"{TOP}a/../../evil.json": b"{}"}), True, "not a plain relative"),
    "absolute path": (lambda f: f.update({"/tmp/evil.json": b"{}"}), True, "absolute path"),
    "backslash": (lambda f: f.update({f"{TOP}..\\..\\evil.json": b"{}"}), True, "backslash"),
    "drive letter": (lambda f: f.update({"C:/evil.json": b"{}"}), True, "drive letter"),
    "symlink": (lambda f: f.update({f"{TOP}link.json": (stat.S_IFLNK | 0o777, b"/etc/passwd")}), True, "symbolic link"),
    "case duplicate": (lambda f: f.update({f"{TOP}BEST.json": b"{}"}), True, "duplicate name"),
    "second top folder": (lambda f: f.update({"Other/evil.json": b"{}"}), True, "one top folder"),
    "pkl file": (lambda f: f.update({f"{TOP}evil.pkl": _pickle_payload(Path(MARKER))}), True, "evil.pkl is a pickle"),
    "torch file": (lambda f: f.update({f"{TOP}weights.pt": _torch_file()}), True, "weights.pt is a pickle or torch"),
    "png that is not one": (lambda f: f.update({f"{TOP}report/dice.png": b"GIF89a"}), True, "not a PNG image"),
    "other type": (lambda f: f.update({f"{TOP}run.sh": b"rm -rf ~"}), True, "not one of the file types"),
    "pickle as json": (lambda f: f.update({f"{TOP}best.json": _pickle_payload(Path(MARKER))}), True, "a pickle under"),
    "torch as safetensors": (lambda f: f.update({FOLD_WEIGHTS: _torch_file()}), True, "not an autoseg model file"),
    "tampered json": (_replace(f"{TOP}best.json", b"0.81", b"0.99"), False, "best.json: its SHA-256 does not match"),
    "tampered weights": (_flip_a_byte(FOLD_WEIGHTS), False, "model.safetensors: its SHA-256 does not match"),
    "not in manifest": (lambda f: f.update({f"{TOP}notes.txt": b"hi"}), False, "notes.txt not listed in the manifest"),
    "missing file": (lambda f: f.pop(f"{TOP}{MEMBERS[0].folder}/plan.json"), False, "plan.json listed in the manifest"),
    "wrong size": (
        _edit_json(f"{TOP}manifest.json", lambda m: m["files"]["report.md"].update(bytes=3)),
        False,
        "the manifest says 3",
    ),
    "no manifest": (lambda f: f.pop(f"{TOP}manifest.json"), False, "no Dataset009_Tiny/manifest.json"),
    "other format": (_edit_json(f"{TOP}manifest.json", lambda m: m.update(format="zip")), False, "format is not"),
    "newer manifest": (
        _edit_json(f"{TOP}manifest.json", lambda m: m.update(schema_version=2)),
        False,
        "schema_version",
    ),
    "unknown trainer": (
        _rename_trainer,
        True,
        r"trainer 'lab_trainer' \(used by lab_trainer__default__2d\) is not installed.*--plugins FILE.py",
    ),
    "unknown network": (
        _edit_json(f"{TOP}{MEMBERS[1].folder}/plan.json", _set_architecture),
        True,
        "network 'lab_net' .used by default__default__3d_fullres. is not installed",
    ),
    "weights of another fold": (_swap_folds, True, "belong to fold 1, not 0"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_dangerous_or_damaged_bundle_is_refused_and_nothing_is_written(
    case: str, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where the pickle payload would create its marker
    edit, fix_manifest, pattern = REFUSALS[case]
    bad = _repack(bundle, tmp_path / "bad.zip", edit, fix_manifest)
    target = tmp_path / "results"
    with pytest.raises(AutosegError, match=pattern):
        import_bundle(bad, target)
    assert not target.exists()
    assert not (tmp_path / MARKER).exists()


def test_an_existing_target_folder_is_left_as_it_was_on_refusal(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "other.txt").write_text("keep")
    bad = _repack(bundle, tmp_path / "bad.zip", _flip_a_byte(FOLD_WEIGHTS), fix_manifest=False)
    with pytest.raises(AutosegError, match="SHA-256"):
        extract_bundle(bad, tmp_path / "results")
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["other.txt"]


def test_exact_duplicate_names_and_non_zip_files_are_refused(bundle: Path, tmp_path: Path) -> None:
    duplicated = tmp_path / "duplicated.zip"
    shutil.copy(bundle, duplicated)
    with warnings.catch_warnings(), zipfile.ZipFile(duplicated, "a") as archive:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is told to write
        archive.writestr(f"{TOP}best.json", b"{}")
    with pytest.raises(AutosegError, match="duplicate name"):
        import_bundle(duplicated, tmp_path / "results")
    (tmp_path / "model.zip").write_bytes(b"not a zip")
    with pytest.raises(AutosegError, match="not a zip file"):
        import_bundle(tmp_path / "model.zip", tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_a_bundle_of_a_plug_in_trainer_imports_once_the_plug_in_is_installed(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autoseg.training.trainer import TRAINERS, Trainer

    lab = _repack(bundle, tmp_path / "lab.zip", _rename_trainer, fix_manifest=True)
    with pytest.raises(AutosegError, match="lab_trainer"):
        import_bundle(lab, tmp_path / "results")
    monkeypatch.setitem(TRAINERS._items, "lab_trainer", Trainer)  # what `--plugins lab.py` would register
    folder = import_bundle(lab, tmp_path / "results")
    assert load_best(folder).members[0].trainer == "lab_trainer"
    assert (folder / "lab_trainer__default__2d" / "fold_1" / "model.safetensors").is_file()
