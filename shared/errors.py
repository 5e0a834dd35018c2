"""The project's error hierarchy."""


class FbhookError(Exception):
    """Base class for every error this project raises on purpose."""


class ConfigError(FbhookError):
    """A setting in the environment is missing or invalid; the message names the variable."""


class BadRequest(FbhookError):
    """A webhook body that is not a webhook envelope (not JSON, or no `entry` list)."""


class QueueUnavailable(FbhookError):
    """Redis did not take the events in time; the request must get a non-2xx answer."""
