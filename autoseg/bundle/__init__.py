"""Model bundles: one zip that holds everything ``autoseg predict`` needs, and nothing that can run code.

Layout (one top folder, so that extracting a bundle gives ``<results>/<dataset>``)::

    <dataset>/manifest.json                  format, versions, SHA-256 and size of every other file
    <dataset>/best.json                      find-best's choice; ``folds`` lists the folds in the bundle
    <dataset>/report.md, report/*.png        find-best's report, when there is one
    <dataset>/<trainer>__<planner>__<configuration>/plan.json, dataset.json
    <dataset>/<trainer>__<planner>__<configuration>/fold_<k>/run.json, model.safetensors

Importing trusts nothing in the file. Before anything is written: every name is a plain relative path under
the one top folder (no absolute paths, ``..``, backslashes, drive letters, links or duplicates), every file
is listed in the manifest and has a data type (JSON, safetensors, Markdown, PNG, text: a pickle or a torch
checkpoint is refused whatever its name), the JSON files are checked against the manifest and their
schemas, and every trainer and network the models name is installed. The weights are then streamed into a
hidden sibling folder, checked against the manifest while they are read (the manifest's size caps each
file, so a zip bomb cannot fill the disk) and opened as safetensors; only then is the folder renamed into
place, so a refused bundle leaves nothing behind.
"""

from autoseg.bundle.export import export_bundle
from autoseg.bundle.format import FORMAT, MANIFEST_FILE, BundleFile, Manifest
from autoseg.bundle.load import extract_bundle, import_bundle, is_bundle, opened_bundle

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "BundleFile",
    "Manifest",
    "export_bundle",
    "extract_bundle",
    "import_bundle",
    "is_bundle",
    "opened_bundle",
]
