"""Typed accessors for what the lifespan put on ``app.state``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.backends.registry import BackendRegistry
from gateway.pipeline import Pipeline


async def get_pipeline(request: Request) -> Pipeline:
    # async: FastAPI runs sync dependencies in a thread pool, a costly hop per request
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


async def get_registry(request: Request) -> BackendRegistry:
    registry: BackendRegistry = request.app.state.registry
    return registry


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
RegistryDep = Annotated[BackendRegistry, Depends(get_registry)]
