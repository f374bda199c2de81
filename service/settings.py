"""Server settings: defaults, then RESKD_* environment variables, then `reskd serve` flags (flags win)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# The bundled repository: models/ at the project root (an editable or source install).
BUNDLED_REPO = Path(__file__).resolve().parent.parent / "models"


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RESKD_", extra="forbid")

    repo: Path = Field(BUNDLED_REPO, description="model repository; every model and version in it is served")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    default_model: str = Field("fashion-mnist", description="the model POST /v1/classify uses")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # Limits (DESIGN.md section 3). Anything smaller than an image's size limit is accepted and resized.
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0, description="request body limit (413 above)")
    max_images: int = Field(256, gt=0, description="images per request (v1 parts or v2 batch; 413 above)")
    max_pixels: int = Field(40_000_000, gt=0, description="decoded pixels per image (413 above: decompression bomb)")

    # Dynamic batching: a batch closes at max_batch_size images or max_queue_delay_ms after its first request.
    max_batch_size: int = Field(64, gt=0)
    max_queue_delay_ms: float = Field(2.0, ge=0)
    # Images waiting per model before admission refuses with 503 + Retry-After (bounded memory under overload).
    max_queue_images: int = Field(1024, gt=0)
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503")

    # CPU: threads of one inference call (stages run one at a time, so this is the whole budget).
    intra_op_threads: int = Field(0, ge=0, description="0: onnxruntime's default (one per core)")
    decode_workers: int = Field(2, gt=0, description="threads decoding and preprocessing images")
    warmup_batch_sizes: list[int] = Field([1, 8, 64], description="batch sizes run once per model before ready")

    # Bearer-token auth on inference and model endpoints; health, /metrics and docs stay open. Unset: off.
    auth_token: SecretStr | None = None
