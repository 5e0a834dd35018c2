"""The project's error hierarchy."""


class FbhookError(Exception):
    """Base class for every error this project raises on purpose."""


class ConfigError(FbhookError):
    """A setting in the environment is missing or invalid; the message names the variable."""


class BadRequest(FbhookError):
    """A webhook body that is not a webhook envelope (not JSON, or no `entry` list)."""


class QueueUnavailable(FbhookError):
    """Redis did not take the events in time; the request must get a non-2xx answer."""


class BodyRefused(FbhookError):
    """A request body the ingest would not read, or did not get whole: too large, too slow, too
    many others being read, or the client went away. Carries the answer's status and the reason
    it is counted and logged under."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
