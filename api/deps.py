"""Request dependencies, each named once as an Annotated alias so routes read plainly."""

from dataclasses import dataclass
from typing import Annotated

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
from api.repository import BoundedPool
from api.stored_events import StoredEvents
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


@dataclass(frozen=True)
class Services:
    """What the app made in its lifespan, for the routes to use.

    Three budgets of database connections, so that no kind of request can starve another:
    `key_pool` for key lookups (the verifier's), `pool` for writes (deletes and
    Idempotency-Keys) and `read_pool` for reads and lists. `stored_events` wakes the
    requests that wait for scores to be stored.
    """

    settings: Settings
    pool: BoundedPool
    read_pool: BoundedPool
    key_pool: BoundedPool
    publisher: ScorePublisher
    verifier: KeyVerifier
    stored_events: StoredEvents


# Dependencies are async even where they need not be: FastAPI runs plain functions in a
# thread pool, a thread hop per dependency per request. They are few, too: each costs
# FastAPI's dependency machinery tens of microseconds per request (BENCHMARKS.md).
async def get_services(request: Request) -> Services:
    """The app's services, made in the lifespan."""
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
EntityPath = Annotated[EntityName, Path(description="W&B entity (team or user) name")]
ProjectPath = Annotated[ProjectName, Path(description="Project name within the entity")]


@dataclass(frozen=True)
class ProjectScope:
    """An entity/project from the URL that the request's key may act on, and the services
    to act with."""

    entity: str
    project: str
    principal: Principal
    services: Services


async def authorize_project(
    request: Request,
    entity: EntityPath,
    project: ProjectPath,
    basic: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ProjectScope:
    """Authenticate the API key (HTTP Basic password or Bearer token) and check that it is
    scoped to the URL's entity and project."""
    if basic is not None:
        key = basic.password
    elif bearer is not None:
        key = bearer.credentials
    else:
        raise InvalidCredentials("missing API key: use HTTP Basic (password) or Bearer")
    return await project_scope(request.app.state.services, entity, project, key)


async def project_scope(services: Services, entity: str, project: str, key: str) -> ProjectScope:
    """The scope of a valid key on entity/project; raises InvalidCredentials, Forbidden or
    AuthBackendUnavailable."""
    principal = await services.verifier.verify(key)
    if not principal.may_access(entity, project):
        raise Forbidden(f"this API key is not scoped to {entity}/{project}")
    return ProjectScope(entity, project, principal, services)


ProjectScopeDep = Annotated[ProjectScope, Depends(authorize_project)]
