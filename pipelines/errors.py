"""Errors a user can act on. Each carries a plain message and an HTTP-like status.

The studio shows `str(err)` in the UI; the REST API answers `{"error": str(err)}` with `err.status`.
Anything that is not a MacTunerError is a bug and is reported as such (still without a traceback in the UI).
"""


class MacTunerError(Exception):
    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadInput(MacTunerError):
    status = 400


class Unauthorized(MacTunerError):
    status = 401


class NotFound(MacTunerError):
    status = 404


class Conflict(MacTunerError):
    status = 409


class Unavailable(MacTunerError):
    status = 503
