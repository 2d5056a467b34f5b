"""Request and response bodies of the HTTP API (they define ``/openapi.json``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

# A LaMP profile item: "id" plus the task's fields (e.g. LaMP-4: text, title), optional "date".
ItemValue = StrictStr | StrictInt | StrictFloat | None


class _Request(BaseModel):
    # Unknown fields are refused: a misspelt "itmes" must not silently personalize on nothing.
    model_config = ConfigDict(extra="forbid")


class PersonalizeRequest(_Request):
    """Stage 2 for one task: from the task anchor (``/personalize``) or the current adapter (``/update``)."""

    task: StrictStr = Field(min_length=1, max_length=32, description="LaMP task, e.g. LaMP-4.",
                            examples=["LaMP-4"])
    items: list[dict[str, ItemValue]] = Field(
        min_length=1, description="LaMP profile items: 'id' and the task's fields (LaMP-4: text, title).",
        examples=[[{"id": "1", "text": "The council approved the budget.", "title": "Budget passes"}]],
    )


class GenerateRequest(_Request):
    """One query for a user's adapter."""

    task: StrictStr = Field(min_length=1, max_length=32, description="LaMP task, e.g. LaMP-4.",
                            examples=["LaMP-4"])
    input: StrictStr = Field(min_length=1, description="The LaMP input text (or any question).",
                             examples=["Generate a headline for the following article: The council met."])
    decode: Literal["auto", "labels", "free"] = Field(
        "auto", description="labels: the task's most likely label (always a valid label); free: greedy "
        "generation; auto: labels on classification and rating tasks (LaMP-1/2/2N/3), free otherwise.")
    personal: bool = Field(True, description="false: answer with the task anchor alone, as if the user had no "
                           "adapter (to compare; the console shows both side by side).")


class UserCreated(BaseModel):
    """A new user; the token is shown once and stored only as a hash."""

    user_id: str
    token: str


class JobAccepted(BaseModel):
    """A queued personalization job."""

    job_id: str
    status: str


class JobState(BaseModel):
    """A job's progress; ``adapter_version`` is set once it succeeded, ``error`` once it failed."""

    job_id: str
    kind: str
    task: str
    status: str = Field(description="queued | running | succeeded | failed")
    adapter_version: int | None = None
    error: str | None = None
    created_at: float
    finished_at: float | None = None


class Generated(BaseModel):
    """An answer and the adapter version that produced it (null: the task anchor alone)."""

    output: str
    adapter_version: int | None


class AdapterInfo(BaseModel):
    """One of a user's adapters, as the admin listing shows it (no user data)."""

    task: str
    version: int
    size_bytes: int
    updated_at: float


class UserInfo(BaseModel):
    """A user in the admin listing: id, creation time and adapters; never the token."""

    user_id: str
    created_at: float
    adapters: list[AdapterInfo]


class UserList(BaseModel):
    """Every user of the store (admin only)."""

    users: list[UserInfo]


class Deleted(BaseModel):
    """What a deletion removed."""

    user_id: str
    deleted: bool
    adapters_removed: int


class Me(BaseModel):
    """Who a bearer token belongs to."""

    user_id: str | None
    admin: bool


class Health(BaseModel):
    """Liveness and what this server serves."""

    status: str
    model: str
    tasks: list[str]


class ErrorBody(BaseModel):
    """Every error: one line in ``detail`` (validation errors add their locations)."""

    detail: str
    errors: list[dict] | None = None
