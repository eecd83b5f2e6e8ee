"""Request and response models, one family per resource."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# ---------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------


class ModelRef(BaseModel):
    """Which model answered: present in every JSON response."""

    name: str
    version: str
    weights_sha256: str


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str = Field(examples=["urn:vaebm-ood:problem:undecodable-image"])
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None


# ---------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------


class Decision(BaseModel):
    """The calibrated decision on one score: ``is_ood = score > threshold``."""

    score: str = Field(description="name of the score the decision uses")
    value: float = Field(description="the image's value of that score")
    threshold: float
    is_ood: bool
    p_value: float = Field(
        description="conformal p-value against the calibration scores; low = looks OOD"
    )
    target_fpr: float = Field(description="false-positive rate the threshold was set for")


class ImageReport(BaseModel):
    """What the upload was and what was done to it."""

    filename: str | None
    format: str
    original_width: int
    original_height: int
    original_mode: str
    converted: bool
    resized: bool
    exif_transposed: bool
    frames: int | None = Field(
        description="frames in the file (GIF, TIFF, APNG, WebP), the first is used; "
        "null when the frames after the first are unreadable"
    )
    conversion: str


class ScoreResult(BaseModel):
    scores: dict[str, float] = Field(
        description="every score of the scores table; higher = more out-of-distribution"
    )
    decision: Decision
    image: ImageReport


class ScoreResponse(ScoreResult):
    model: ModelRef


class BatchItem(BaseModel):
    """One image of a batch: a result, or a problem that did not fail the others."""

    index: int
    filename: str | None
    status: int
    result: ScoreResult | None = None
    problem: Problem | None = None


class BatchScoreResponse(BaseModel):
    count: int
    succeeded: int
    failed: int
    results: list[BatchItem]
    model: ModelRef


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


class ScoreMetrics(BaseModel):
    """``model.metrics.ood_metrics`` of one score (OOD = positive class)."""

    auroc: float
    aupr_in: float
    aupr_out: float
    fpr_at_95_tpr: float
    ood_accepted_at_95_in_kept: float
    threshold: float | None = Field(None, description="the calibrated threshold, if any")
    fpr_at_threshold: float | None = None
    fnr_at_threshold: float | None = None
    n_in: int
    n_out: int


ReferenceKind = Literal["calibration", "registered", "upload"]


class ReferenceInfo(BaseModel):
    name: str
    kind: ReferenceKind
    n_images: int


class EvaluateResponse(BaseModel):
    reference: ReferenceInfo
    n_ood: int
    metrics: dict[str, ScoreMetrics]
    unavailable_scores: dict[str, str] = Field(
        description="scores without metrics, with the reason (e.g. not in the calibration)"
    )
    conventions: dict[str, str]
    model: ModelRef


class ReferenceSet(BaseModel):
    name: str
    kind: Literal["calibration", "registered"]
    source: str = Field(description="'calibration.json' or the data spec")
    loaded: bool
    n_images: int | None
    scores: list[str] | None = Field(description="scores available (None until loaded)")


class ReferenceSetsResponse(BaseModel):
    default: str
    reference_sets: list[ReferenceSet]
    model: ModelRef


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


class SampleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a default

    n: int = Field(16, ge=1, description="number of samples (capped by VAEBM_SAMPLE_MAX_N)")
    steps: int = Field(
        16, ge=0, description="Langevin steps (capped by VAEBM_SAMPLE_MAX_STEPS); 0 = VAE only"
    )
    step_size: float | None = Field(
        None, gt=0, le=1.0, description="Langevin step size; omitted = the one training used"
    )
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="same seed -> same images; omitted = random"
    )
    format: Literal["png", "json"] = "png"


class SampleImage(BaseModel):
    index: int
    png_base64: str


class SampleResponse(BaseModel):
    n: int
    steps: int
    step_size: float
    seed: int
    width: int
    height: int
    channels: int
    images: list[SampleImage]
    model: ModelRef


# ---------------------------------------------------------------------------------------------
# health and model
# ---------------------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: Literal["ok"]
    ready: bool
    model: ModelRef | None


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    device: str
    warmup_seconds: float | None
    model: ModelRef


class ImageShapeInfo(BaseModel):
    channels: int
    height: int
    width: int


class ScoreInfo(BaseModel):
    name: str
    unit: str
    description: str
    direction: str
    calibrated: bool


class ScoreCalibrationInfo(BaseModel):
    threshold: float
    target_fpr: float
    n: int
    achieved_fpr: float
    fpr_ci_low: float
    fpr_ci_high: float


class CalibrationSummary(BaseModel):
    target_fpr: float
    default_score: str
    iwae_k: int
    seed: int
    data: dict[str, object]
    scores: dict[str, ScoreCalibrationInfo]


class Limits(BaseModel):
    max_upload_bytes: int
    max_image_pixels: int
    max_batch_files: int
    resize: str
    sample_max_n: int
    sample_max_steps: int


class ModelResponse(ModelRef):
    device: str
    image_shape: ImageShapeInfo
    iwae_k: int
    scores: list[ScoreInfo]
    calibration: CalibrationSummary
    limits: Limits
    model: ModelRef
