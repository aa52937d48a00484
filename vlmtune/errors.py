"""Errors a user can act on; the CLI prints them without a traceback."""

from __future__ import annotations

from dataclasses import dataclass


class VlmtuneError(Exception):
    """Base class: a message that names what is wrong and how to fix it."""


class PreflightError(VlmtuneError):
    """Everything wrong with a run, found before any training: recipe fields, model, data rows."""

    def __init__(self, problems: list[str], limit: int = 30):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        n = len(problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} found before training:\n{shown}{more}")


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message
