"""One router per resource: parse, authorise, call a service, answer."""

from fastapi.responses import JSONResponse

from gpuprovider.api.schemas import ErrorOut

# Every route can answer these, each with {"error": "..."}.
ERRORS = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 413, 422)}


def answer(content: object, status: int = 200) -> JSONResponse:
    """A view (already in its response model's shape) as JSON, without re-validating it."""
    return JSONResponse(content, status_code=status)
