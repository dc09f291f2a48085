"""/v1/tokens and /v1/projects: tokens and quotas (admin), a project's usage."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import ValidationError

from protos.images import GetImageUsage, ImageUsage
from services.api.auth import digest, new_token
from services.api.config import Quota
from services.api.models import ProjectView, TokenCreate, TokenCreated, TokenList, TokenView
from services.api.problems import Problem, not_found, responses
from services.api.routes.deps import Admin, Caller, Ctx
from services.api.routes.volumes import call_storage

router = APIRouter(tags=["admin"])


@router.post(
    "/v1/tokens", status_code=201, response_model=TokenCreated, responses=responses(401, 403, 422)
)
def create_token(body: TokenCreate, ctx: Ctx, _admin: Admin) -> TokenCreated:
    """A new bearer token for `project` with `role`; the secret is in this answer only."""
    secret = new_token()
    record = ctx.registry.access.add_token(
        digest(secret), body.project, body.role, body.description
    )
    return TokenCreated(
        id=record.id,
        project=record.project,
        role=record.role,
        description=record.description,
        created_at=record.created_at,
        token=secret,
    )


@router.get("/v1/tokens", response_model=TokenList, responses=responses(401, 403))
def list_tokens(ctx: Ctx, _admin: Admin) -> TokenList:
    """Tokens created through the API (those in the config file are not listed)."""
    return TokenList(
        tokens=[
            TokenView(
                id=t.id,
                project=t.project,
                role=t.role,
                description=t.description,
                created_at=t.created_at,
            )
            for t in ctx.registry.access.list_tokens()
        ]
    )


@router.delete("/v1/tokens/{token_id}", status_code=204, responses=responses(401, 403, 404))
def delete_token(token_id: str, ctx: Ctx, _admin: Admin) -> Response:
    if not ctx.registry.access.delete_token(token_id):
        raise not_found(f"token {token_id}")
    return Response(status_code=204)


def _image_usage(ctx: Ctx, project: str) -> dict[str, int]:
    """The project's images (`images`, `image_gib`) as the storage service counts them;
    nothing while it does not answer, so the registry's part is still shown."""
    try:
        command = GetImageUsage(project=project)
    except ValidationError:  # no project of that name can hold an image
        return {"images": 0, "image_gib": 0}
    try:
        reply = call_storage(ctx, command)
    except Problem as problem:
        if problem.status in (503, 504):
            return {}
        raise
    assert isinstance(reply, ImageUsage)
    return {"images": reply.images, "image_gib": reply.image_gib}


def _project_view(ctx: Ctx, project: str) -> ProjectView:
    quota = ctx.registry.access.get_quota(project) or ctx.config.quota_for(project)
    usage = {
        **ctx.registry.domains.usage(project),
        "snapshot_bytes": ctx.registry.states.usage(project),
        **_image_usage(ctx, project),
    }
    return ProjectView(project=project, quota=quota, usage=usage)


@router.get("/v1/projects/{project}", response_model=ProjectView, responses=responses(401, 404))
def get_project(project: str, ctx: Ctx, caller: Caller) -> ProjectView:
    """A project's quota and what its domains, saved states and images hold (members: their
    own project only; `images`, `image_gib` only while the storage service answers)."""
    if not caller.sees(project):
        raise not_found(f"project {project}")
    return _project_view(ctx, project)


@router.put(
    "/v1/projects/{project}/quota",
    response_model=ProjectView,
    responses=responses(401, 403, 422),
)
def set_quota(project: str, body: Quota, ctx: Ctx, _admin: Admin) -> ProjectView:
    """Set the project's quota (overrides the config file's)."""
    ctx.registry.access.set_quota(project, body)
    return _project_view(ctx, project)
