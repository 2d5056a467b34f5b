"""The FastAPI application: routes, bearer auth, body-size limit and one-line JSON errors.

Status codes: 401 no or unknown token, 403 another user's token, 404 unknown job (or another user's), 409 conflicting
state (no adapter to update, a job already pending), 413 body or item count over the limit, 422
malformed JSON, wrong types, unknown task or text over a length limit, 429 job queue full, 500 only
for a stored adapter that fails its integrity check (fail closed) or a bug.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from prisp import __version__
from prisp.errors import PrispError
from prisp.models import LoadedModel
from prisp.serve.config import ServeConfig
from prisp.serve.jobs import JobBusyError, JobQueueFullError
from prisp.serve.keys import SealError, StoreKey
from prisp.serve.limits import BodyLimitMiddleware
from prisp.serve.schemas import (
    Deleted,
    ErrorBody,
    Generated,
    GenerateRequest,
    Health,
    JobAccepted,
    JobState,
    Me,
    PersonalizeRequest,
    UserCreated,
    UserList,
)
from prisp.serve.service import PrispService, ServeError
from prisp.serve.store import UnknownUserError, VersionConflictError

logger = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="The token returned by POST /v1/users.")
_ERRORS = {code: {"model": ErrorBody} for code in (401, 403, 404, 409, 413, 422, 429)}
router = APIRouter()


def _service(request: Request) -> PrispService:
    return request.app.state.service


def _token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str | None:
    return credentials.credentials if credentials else None


Service = Annotated[PrispService, Depends(_service)]
Token = Annotated[str | None, Depends(_token)]
UserId = Annotated[str, Path(min_length=1, max_length=64, description="The id returned by POST /v1/users.")]
JobId = Annotated[str, Path(min_length=1, max_length=64, description="The id of a queued job.")]


@router.get("/healthz", response_model=Health, tags=["meta"])
def healthz(service: Service) -> Health:
    """Liveness: the base model and the tasks with an anchor."""
    return Health(status="ok", model=service.model_name, tasks=sorted(service.anchors))


@router.post("/v1/users", response_model=UserCreated, status_code=201, responses=_ERRORS, tags=["users"])
def create_user(token: Token, service: Service) -> UserCreated:
    """Create a user (admin token, unless the server runs with open registration); returns their bearer token
    once (only its hash is kept)."""
    issued = service.create_user(token)
    return UserCreated(user_id=issued.user_id, token=issued.token)


@router.get("/v1/me", response_model=Me, responses=_ERRORS, tags=["users"])
def whoami(token: Token, service: Service) -> Me:
    """Who the bearer token belongs to: a user (their id) or the admin."""
    user_id, admin = service.whoami(token)
    return Me(user_id=user_id, admin=admin)


@router.get("/v1/users", response_model=UserList, responses=_ERRORS, tags=["users"])
def list_users(token: Token, service: Service) -> UserList:
    """Every user with their adapters' tasks, versions and sizes (admin token only; no tokens, no user data)."""
    return UserList(users=service.list_users(token))


@router.post("/v1/users/{user_id}/personalize", response_model=JobAccepted, status_code=202,
             responses=_ERRORS, tags=["adapters"])
def personalize(body: PersonalizeRequest, user_id: UserId, token: Token, service: Service) -> JobAccepted:
    """Stage 2 from the task anchor on the given history items, as a background job."""
    job = service.start_job(user_id, token, body.task, body.items, update=False)
    return JobAccepted(job_id=job.job_id, status=job.status)


@router.post("/v1/users/{user_id}/update", response_model=JobAccepted, status_code=202, responses=_ERRORS,
             tags=["adapters"])
def update(body: PersonalizeRequest, user_id: UserId, token: Token, service: Service) -> JobAccepted:
    """Continual personalization: refine the user's current adapter on new items (a new version)."""
    job = service.start_job(user_id, token, body.task, body.items, update=True)
    return JobAccepted(job_id=job.job_id, status=job.status)


@router.get("/v1/jobs/{job_id}", response_model=JobState, responses=_ERRORS, tags=["adapters"])
def job_state(job_id: JobId, token: Token, service: Service) -> JobState:
    """A job's status; ``adapter_version`` once it succeeded."""
    job = service.job(job_id, token)
    return JobState(job_id=job.job_id, kind=job.kind, task=job.task, status=job.status,
                    adapter_version=job.adapter_version, error=job.error, created_at=job.created_at,
                    finished_at=job.finished_at)


@router.post("/v1/users/{user_id}/generate", response_model=Generated, responses=_ERRORS, tags=["generation"])
def generate(body: GenerateRequest, user_id: UserId, token: Token, service: Service) -> Generated:
    """Answer with the user's adapter for the task, or the task anchor alone (``adapter_version`` null)."""
    output, version = service.generate(user_id, token, body.task, body.input, body.decode, body.personal)
    return Generated(output=output, adapter_version=version)


@router.delete("/v1/users/{user_id}", response_model=Deleted, responses=_ERRORS, tags=["users"])
def delete_user(user_id: UserId, token: Token, service: Service) -> Deleted:
    """Erase the user: adapters, metadata, cache entries, pending jobs and the account (token revoked). The
    user's own token or the admin token."""
    removed = service.delete_user(user_id, token)
    return Deleted(user_id=user_id, deleted=True, adapters_removed=removed)


@router.delete("/v1/users/{user_id}/adapters", response_model=Deleted, responses=_ERRORS, tags=["users"])
def delete_adapters(user_id: UserId, token: Token, service: Service) -> Deleted:
    """Erase the user's adapters but keep the account; they are then served by the anchors alone."""
    removed = service.delete_adapters(user_id, token)
    return Deleted(user_id=user_id, deleted=False, adapters_removed=removed)


CONSOLE_DIR = FilePath(__file__).resolve().parent / "console"
_CONSOLE_FILES = {"console.js": "text/javascript", "console.css": "text/css"}
# The console runs only its own script and style, from this server: nothing inline, nothing from elsewhere.
_CONSOLE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                    "img-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


@router.get("/ui", include_in_schema=False)
def console_page() -> Response:
    """The web console (plain HTML + one script, served from the package; the same API underneath)."""
    return Response((CONSOLE_DIR / "index.html").read_bytes(), media_type="text/html", headers=_CONSOLE_HEADERS)


@router.get("/ui/static/{name}", include_in_schema=False)
def console_asset(name: str) -> Response:
    if name not in _CONSOLE_FILES:  # a fixed list: no path ever reaches the filesystem from a request
        raise StarletteHTTPException(404, "not found")
    return Response((CONSOLE_DIR / name).read_bytes(), media_type=_CONSOLE_FILES[name], headers=_CONSOLE_HEADERS)


def create_app(config: ServeConfig, key: StoreKey, loaded: LoadedModel | None = None) -> FastAPI:
    """Build the app: opens the store (taking its lock), loads the base model and the anchors.

    Args:
        config: Serving options.
        key: The store key.
        loaded: An already loaded base model and tokenizer (tests; embedding); loaded from
            ``config.model`` otherwise.

    Raises:
        PrispError: One line for a wrong key, a store in use, or an unloadable model or anchor.
    """
    service = PrispService(config, key, loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="prisp serve", version=__version__, lifespan=lifespan,
                  description="Per-user personalized LoRA adapters, encrypted at rest, one user per token.")
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.limits.max_body_bytes)
    _install_error_handlers(app)
    app.include_router(router)
    return app


def _status_of(exc: PrispError) -> int:
    if isinstance(exc, ServeError):
        return exc.status
    if isinstance(exc, SealError):
        return 500  # a stored adapter failed its integrity check: fail closed, never fall back
    if isinstance(exc, (JobBusyError, VersionConflictError)):
        return 409
    if isinstance(exc, JobQueueFullError):
        return 429
    if isinstance(exc, UnknownUserError):
        return 404
    return 422  # DataError (bad items, unknown task) and other one-line input problems


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PrispError)
    async def prisp_error(request: Request, exc: PrispError) -> JSONResponse:
        status = _status_of(exc)
        if status >= 500:
            logger.error("%s %s: %s", request.method, request.url.path, exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            headers = {"Retry-After": str(retry_after)}
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_public_error(e) for e in exc.errors()]
        return JSONResponse({"detail": _one_line(errors), "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)


def _public_error(error: dict) -> dict:
    """A validation error without its ``input`` (which may be user text) or pydantic's URL."""
    return {"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", "")),
            "type": str(error.get("type", ""))}


def _one_line(errors: list[dict]) -> str:
    if not errors:
        return "invalid request"
    first = errors[0]
    if first["type"] == "json_invalid":
        return "request body is not valid JSON"
    where = ".".join(part for part in first["loc"] if part != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"
