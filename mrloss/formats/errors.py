"""FormatError: the one error type for bad multi-region data."""

from __future__ import annotations


class FormatError(ValueError):
    """A sample that cannot be turned into weighted text.

    Attributes: ``sample_id`` (e.g. ``"train.jsonl:17"``; None when unknown), ``field`` (e.g.
    ``"learning_regions[1].weigth"``), ``position`` (character index into the field's text, or None) and
    ``reason`` (the problem alone). ``str(error)`` names all of them.
    """

    def __init__(self, reason: str, *, sample_id=None, field: str | None = None, position: int | None = None):
        self.reason = reason
        self.sample_id = sample_id
        self.field = field
        self.position = position
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.sample_id is not None:
            where.append(f"sample {self.sample_id}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        if self.position is not None:
            where.append(f"character {self.position}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason

    def with_sample_id(self, sample_id) -> FormatError:
        """The same error, naming ``sample_id``.

        Args:
            sample_id: the sample's id (kept if the error names one already).

        Returns:
            This error if it has a sample id or ``sample_id`` is None, else a copy naming ``sample_id``.
        """
        if self.sample_id is not None or sample_id is None:
            return self
        return FormatError(self.reason, sample_id=sample_id, field=self.field, position=self.position)

    def __reduce__(self):  # picklable across DataLoader workers
        return (_rebuild, (self.reason, self.sample_id, self.field, self.position))


def _rebuild(reason, sample_id, field, position):
    return FormatError(reason, sample_id=sample_id, field=field, position=position)
