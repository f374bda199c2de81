"""Operations endpoints: Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..serving.state import ServerState
from .deps import get_state

router = APIRouter(tags=["operations"])


@router.get("/metrics", summary="Prometheus metrics (names per docs/design.md, \"Metrics\")",
            response_class=PlainTextResponse, responses={200: {
                "description": "Prometheus text exposition format", "content": {"text/plain": {
                    "schema": {"type": "string"}}}}})
async def metrics(state: ServerState = Depends(get_state)):
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
