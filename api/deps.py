"""Request dependencies, each named once as an Annotated alias so routes read plainly."""

from dataclasses import dataclass
from typing import Annotated

import asyncpg
from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)

from api.errors import Forbidden, InvalidCredentials
from api.keys import KeyVerifier, Principal
from api.publisher import ScorePublisher
from shared.contract import EntityName, ProjectName
from shared.settings import Settings


class _Basic(HTTPBasic):
    """HTTP Basic whose undecodable credentials are our 401, like every other bad key."""

    async def __call__(self, request: Request) -> HTTPBasicCredentials | None:  # type: ignore[override]
        try:
            return await super().__call__(request)
        except HTTPException:
            raise InvalidCredentials("malformed HTTP Basic credentials") from None


_basic = _Basic(
    scheme_name="HTTPBasic",
    auto_error=False,
    description="Any username (W&B clients send `api`); the password is the API key.",
)
_bearer = HTTPBearer(auto_error=False, description="The API key as a bearer token.")


# Dependencies are async even where they need not be: FastAPI runs plain functions in a
# thread pool, a thread hop per dependency per request.
async def get_settings(request: Request) -> Settings:
    """The settings the app was made with."""
    settings: Settings = request.app.state.settings
    return settings


async def get_pool(request: Request) -> asyncpg.Pool:
    """The app's PostgreSQL pool, made in the lifespan."""
    pool: asyncpg.Pool = request.app.state.pool
    return pool


async def get_publisher(request: Request) -> ScorePublisher:
    """The app's publisher, made in the lifespan."""
    publisher: ScorePublisher = request.app.state.publisher
    return publisher


async def get_verifier(request: Request) -> KeyVerifier:
    """The app's key verifier, made in the lifespan."""
    verifier: KeyVerifier = request.app.state.verifier
    return verifier


SettingsDep = Annotated[Settings, Depends(get_settings)]
PoolDep = Annotated[asyncpg.Pool, Depends(get_pool)]
PublisherDep = Annotated[ScorePublisher, Depends(get_publisher)]
VerifierDep = Annotated[KeyVerifier, Depends(get_verifier)]
EntityPath = Annotated[EntityName, Path(description="W&B entity (team or user) name")]
ProjectPath = Annotated[ProjectName, Path(description="Project name within the entity")]


async def authenticate(
    verifier: VerifierDep,
    basic: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The principal behind the request's API key, from HTTP Basic or Bearer."""
    if basic is not None:
        return await verifier.verify(basic.password)
    if bearer is not None:
        return await verifier.verify(bearer.credentials)
    raise InvalidCredentials("missing API key: use HTTP Basic (password) or Bearer")


@dataclass(frozen=True)
class ProjectScope:
    """An entity/project from the URL that the request's key may act on."""

    entity: str
    project: str
    principal: Principal


async def authorize_project(
    entity: EntityPath,
    project: ProjectPath,
    principal: Annotated[Principal, Depends(authenticate)],
) -> ProjectScope:
    """Check that the key is scoped to the URL's entity and project."""
    if not principal.may_access(entity, project):
        raise Forbidden(f"this API key is not scoped to {entity}/{project}")
    return ProjectScope(entity, project, principal)


ProjectScopeDep = Annotated[ProjectScope, Depends(authorize_project)]
