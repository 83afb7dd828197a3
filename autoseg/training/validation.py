"""Whole-case validation at the end of a fold: predict the held-out cases, write them, score them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from autoseg.training.loop import Run


def predict_and_evaluate(run: Run, case_ids: list[str]) -> Path | None:
    """Writes ``validation/CASE<ending>`` per case (and probabilities if asked) and ``validation/summary.json``."""
    from tqdm import tqdm

    from autoseg.data.cases import PreprocessedCases
    from autoseg.evaluation.evaluate import evaluate_folder
    from autoseg.inference.export import export_prediction, export_prediction_torch
    from autoseg.inference.predict import predict_preprocessed_case

    setup, options = run.setup, run.options
    if not case_ids:
        return None
    out_dir = setup.output_dir / "validation"
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = PreprocessedCases(setup.data_dir, case_ids)
    network = run.network
    network.eval()
    deep_supervision = getattr(network, "deep_supervision", None)
    if deep_supervision is not None:
        network.deep_supervision = False  # type: ignore[assignment]
    try:
        for case_id in tqdm(case_ids, desc="validation", unit="case", disable=not options.show_progress):
            logits = predict_preprocessed_case(
                network,
                cases.image(case_id),
                setup.configuration,
                run.spatial.mirror_axes,
                device=run.device,
                use_mirroring=options.validation_mirroring,
                num_classes=run.trainer.num_classes,
                use_amp=run.autocast_dtype is not None,
                # Half-precision accumulation halves the memory of large volumes; the running weighted mean
                # keeps it within 2e-2 of float32 (tests/test_inference.py), far below what moves an argmax.
                accumulate_dtype=torch.float16 if run.device.type == "cuda" else None,
            )
            # on a GPU the resampling back and the argmax stay there (the predictor's path); elsewhere the CPU's
            export = export_prediction if run.device.type == "cpu" else export_prediction_torch
            export(
                logits if run.device.type != "cpu" else logits.float().cpu(),
                cases.properties(case_id),
                setup.plan,
                setup.configuration,
                out_dir / f"{case_id}{setup.file_ending}",
                save_probabilities=options.save_probabilities,
            )
    finally:
        if deep_supervision is not None:
            network.deep_supervision = deep_supervision
    summary = out_dir / "summary.json"
    evaluate_folder(
        out_dir,
        setup.ground_truth_dir,
        labels=setup.plan.labels,
        file_ending=setup.file_ending,
        output_file=summary,
        case_ids=case_ids,
        show_progress=options.show_progress,
    )
    return summary
