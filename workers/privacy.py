"""A tenant's PII redaction, applied to a generation before it is embedded and stored."""

from __future__ import annotations

from service.db.tables import Generation
from service.redact import redact, redact_value


def redact_generation(generation: Generation) -> None:
    """Redact the generation's request, prompt text and output in place.

    The request was redacted when it was submitted, if the tenant redacted then; doing it
    again is a no-op (redaction is idempotent) and covers a setting turned on meanwhile.
    """
    generation.input, _ = redact_value(generation.input)
    generation.prompt = redact(generation.prompt).text
    generation.output = redact(generation.output).text
