"""``POST /evaluate`` (AUROC & co. of uploaded OOD candidates) and ``GET /reference-sets``.

Metrics come from :func:`model.metrics.ood_metrics`, the code ``vaebm evaluate`` uses, with
OOD as the positive class and higher score = more OOD.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from model.metrics import METRIC_DESCRIPTIONS, ood_metrics
from service.cancellation import unless_stopped
from service.deps import ReferencesDep, RuntimeDep, SettingsDep
from service.errors import ProblemError
from service.references import ReferenceScores
from service.routes.common import PROBLEM_RESPONSES
from service.runtime import ModelRuntime
from service.schemas import (
    EvaluateResponse,
    ModelRef,
    ReferenceInfo,
    ReferenceSet,
    ReferenceSetsResponse,
    ScoreMetrics,
)
from service.settings import CALIBRATION_REFERENCE, Settings
from service.uploads import check_file_count, decode_uploads, multipart_form

router = APIRouter(tags=["evaluate"])

CONVENTIONS = {
    "positive_class": "OOD (label 1); in-distribution is label 0",
    "score_direction": "higher score = more out-of-distribution, for every score",
    "decision_rule": "flag OOD when score > threshold",
    **METRIC_DESCRIPTIONS,
}


async def score_uploads(
    uploads: list[UploadFile],
    field: str,
    request: Request,
    settings: Settings,
    runtime: ModelRuntime,
) -> dict[str, np.ndarray]:
    """All scores of uploaded images; the first bad image fails the request (its problem)."""
    decoded = await decode_uploads(uploads, settings, runtime)
    images = []
    for i, (upload, outcome) in enumerate(zip(uploads, decoded, strict=True)):
        if isinstance(outcome, ProblemError):
            outcome.detail = f"{field}[{i}] ({upload.filename}): {outcome.detail}"
            raise outcome
        images.append(outcome[0])
    results = await unless_stopped(request, runtime.batcher.submit_many(images))
    return {name: np.array([r[name] for r in results]) for name in runtime.calibration.score_names}


def score_metrics(
    reference: ReferenceScores, ood: dict[str, np.ndarray], runtime: ModelRuntime
) -> tuple[dict[str, ScoreMetrics], dict[str, str]]:
    """``ood_metrics`` per score; scores the reference lacks are listed with the reason."""
    metrics: dict[str, ScoreMetrics] = {}
    unavailable: dict[str, str] = {}
    calibrated = runtime.calibration.scores
    for name in runtime.calibration.score_names:
        if name not in reference.scores:
            unavailable[name] = (
                f"reference set {reference.name!r} has no {name} scores (it has: "
                f"{', '.join(sorted(reference.scores))}); upload in_files or name a "
                "registered reference set for every score"
            )
            continue
        threshold = calibrated[name].threshold if name in calibrated else None
        try:
            values = ood_metrics(reference.scores[name], ood[name], threshold=threshold)
        except ValueError as exc:  # non-finite scores
            unavailable[name] = str(exc)
            continue
        metrics[name] = ScoreMetrics(
            **values,
            threshold=threshold,
            n_in=len(reference.scores[name]),
            n_out=len(ood[name]),
        )
    return metrics, unavailable


@router.post(
    "/evaluate",
    response_model=EvaluateResponse,
    responses=PROBLEM_RESPONSES,
    summary="AUROC evaluation of uploaded OOD candidates",
    dependencies=[Depends(multipart_form("reference"))],
)
async def evaluate(
    files: Annotated[list[UploadFile], File(description="OOD candidate images")],
    request: Request,
    runtime: RuntimeDep,
    settings: SettingsDep,
    references: ReferencesDep,
    in_files: Annotated[
        list[UploadFile] | None,
        File(description="in-distribution images (instead of a reference set)"),
    ] = None,
    reference: Annotated[
        str | None,
        Form(description=f"registered reference set; default {CALIBRATION_REFERENCE!r}"),
    ] = None,
) -> EvaluateResponse:
    """Metrics of each score with OOD candidates against an in-distribution reference."""
    check_file_count(len(files), settings, "files")
    if in_files and reference is not None:
        raise ProblemError(
            422,
            "conflicting-reference",
            "give either in_files (an uploaded in-distribution set) or reference (a "
            "registered set), not both",
        )
    if in_files:
        check_file_count(len(in_files), settings, "in_files")
    else:
        ref = await references.get(reference or CALIBRATION_REFERENCE)  # 422 if unknown
    ood = await score_uploads(files, "files", request, settings, runtime)
    if in_files:
        in_scores = await score_uploads(in_files, "in_files", request, settings, runtime)
        ref = ReferenceScores("upload", "upload", in_scores, len(in_files))
    metrics, unavailable = score_metrics(ref, ood, runtime)
    return EvaluateResponse(
        reference=ReferenceInfo(name=ref.name, kind=ref.kind, n_images=ref.n_images),
        n_ood=len(files),
        metrics=metrics,
        unavailable_scores=unavailable,
        conventions=CONVENTIONS,
        model=ModelRef(**runtime.model_ref),
    )


@router.get(
    "/reference-sets",
    response_model=ReferenceSetsResponse,
    responses=PROBLEM_RESPONSES,
    summary="Reference sets /evaluate can compare against",
)
async def reference_sets(runtime: RuntimeDep, references: ReferencesDep) -> ReferenceSetsResponse:
    """The calibration set and every registered set, with whether each is scored yet."""
    sets = []
    for name in references.names:
        cached = references.cached(name)
        is_cal = name == CALIBRATION_REFERENCE
        sets.append(
            ReferenceSet(
                name=name,
                kind="calibration" if is_cal else "registered",
                source="calibration.json" if is_cal else references.specs[name],
                loaded=cached is not None,
                n_images=cached.n_images if cached else None,
                scores=sorted(cached.scores) if cached else None,
            )
        )
    return ReferenceSetsResponse(
        default=CALIBRATION_REFERENCE, reference_sets=sets, model=ModelRef(**runtime.model_ref)
    )
