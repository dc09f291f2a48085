"""FastAPI dependencies: the app's context and the authenticated caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.api.auth import Principal, require_admin
from services.api.context import ApiContext
from services.api.visibility import HostMask

# Declared for the OpenAPI document (the security scheme); checking is ours (problem+json).
_bearer = HTTPBearer(auto_error=False, description="a token from the config or POST /v1/tokens")


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


def principal(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller; its `HostMask` is kept on `request.state.host_mask` for every body the
    request answers with, problem documents included."""
    ctx = context(request)
    caller = ctx.principal(request)
    request.state.host_mask = ctx.host_mask(caller)
    return caller


def host_mask(request: Request, _caller: Annotated[Principal, Depends(principal)]) -> HostMask:
    mask: HostMask = request.state.host_mask
    return mask


def admin(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    require_admin(caller)
    return caller


Ctx = Annotated[ApiContext, Depends(context)]
Caller = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
Mask = Annotated[HostMask, Depends(host_mask)]
