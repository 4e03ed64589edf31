"""Errors the service layer raises; the API and CLI map them to status codes."""


class ServiceError(Exception):
    status = 400


class Rejected(ServiceError):
    """The request is well formed but cannot be accepted as it is."""

    status = 422


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409
