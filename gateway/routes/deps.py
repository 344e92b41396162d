"""Typed accessors for what the lifespan put on ``app.state``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.backends.registry import BackendRegistry
from gateway.pipeline import Pipeline


def get_pipeline(request: Request) -> Pipeline:
    return request.app.state.pipeline  # type: ignore[no-any-return]


def get_registry(request: Request) -> BackendRegistry:
    return request.app.state.registry  # type: ignore[no-any-return]


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
RegistryDep = Annotated[BackendRegistry, Depends(get_registry)]
