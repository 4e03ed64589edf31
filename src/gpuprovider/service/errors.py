"""Errors the service layer raises; the API and CLI map them to status codes."""


class ServiceError(Exception):
    status = 400
    headers: dict[str, str] = {}


class Rejected(ServiceError):
    """The request is well formed but cannot be accepted as it is."""

    status = 422


class Unauthenticated(ServiceError):
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Unavailable(ServiceError):
    status = 503
