"""Response bodies of the v1 API as pydantic models: the contract, and accurate OpenAPI documentation."""

from __future__ import annotations

from pydantic import BaseModel, Field


class TopClass(BaseModel):
    label: str
    class_id: int
    probability: float = Field(description="softmax of the logits at the exit stage")


class Prediction(BaseModel):
    filename: str | None = Field(None, description="the multipart part's filename, when it had one")
    label: str
    class_id: int
    confidence: float = Field(description="the model's exit measure (max_prob, margin or entropy) at the exit stage")
    top_k: list[TopClass]
    exit_stage: int = Field(description="the stage that answered (0 = the student)")
    exit_reason: str = Field(description="why it left there: confident, final (the last stage), max_stage, load (the "
                                         "server ran the request at a cheaper operating point under load) or "
                                         "deadline (the request's timeout passed while it waited for a later stage)")
    stages_run: int = Field(description="exit_stage + 1")
    flops: int = Field(description="FLOPs this image used: the sum of the stages it ran (2 x MACs)")
    flops_saved_vs_teacher: int = Field(description="teacher FLOPs - flops (negative if the cascade cost more)")
    flops_saved_vs_cascade: int = Field(description="full-cascade FLOPs - flops")


class OperatingPointUsed(BaseModel):
    id: str = Field(description="the operating point the request ran at (custom: its own threshold or max_stage)")
    accuracy: float | None = Field(description="that point's accuracy on the validation split (null: not measured)")


class ClassifyResponse(BaseModel):
    model: str
    version: int
    operating_point: OperatingPointUsed
    predictions: list[Prediction]


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong and how to fix it")


ERROR_RESPONSES = {code: {"model": ErrorBody, "description": text} for code, text in {
    400: "malformed request", 401: "missing or wrong bearer token (when auth is on)",
    404: "unknown model or version", 408: "the request's body did not arrive in time (the connection closes)",
    413: "body, image count or image pixels over the limit",
    415: "unsupported media type or undecodable image", 422: "well-formed but invalid parameters or values",
    503: "overloaded or not ready; retry after Retry-After seconds",
    504: "the request's deadline (timeout) passed before some of its images ran any stage"}.items()}
