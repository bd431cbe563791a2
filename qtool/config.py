"""The base of every closed configuration (recipe, scheme, step options): unknown keys fail."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
