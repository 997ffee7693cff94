"""The one error type for bad input rows: it names the dataset, the row and the field at fault."""

from __future__ import annotations

from dataclasses import dataclass

from surogate.errors import UserError


class DataError(UserError):
    """A dataset row the pipeline cannot use (missing field, wrong type, unknown role, nothing to train on).

    `reason` is a short stable key (e.g. "missing_field") used to count rows skipped with `on_bad_row="skip"`.
    """

    def __init__(self, dataset: str, row: int | None, field: str | None, problem: str, reason: str = "bad_row"):
        self.dataset, self.row, self.field, self.problem, self.reason = dataset, row, field, problem, reason
        where = f"dataset {dataset}"
        if row is not None:
            where += f", row {row}"
        if field:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        # Raised in worker processes: must pickle back to the parent with its attributes intact.
        return (DataError, (self.dataset, self.row, self.field, self.problem, self.reason))


@dataclass(frozen=True)
class BadRow:
    """Stands in for a row that could not even be read (invalid UTF-8 or JSON) when bad rows are skipped:
    the encoder turns it into a `DataError` with `problem` (file and line) and `reason`, counted as skipped."""

    problem: str
    reason: str
