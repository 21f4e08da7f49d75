"""Engine-level exceptions. They carry no HTTP knowledge; the server maps them to status codes."""


class LoraserveError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequest(LoraserveError, ValueError):
    """The request itself is wrong (bad parameter, empty prompt); the caller can fix it."""


class ContextTooLong(InvalidRequest):
    """Prompt plus requested tokens do not fit the model or the configured limits."""


class Overloaded(LoraserveError):
    """The server has no room for another request right now; retrying later may succeed."""


class ModelLoadError(LoraserveError):
    """The base model could not be found or read."""


class UnsupportedModel(ModelLoadError):
    """The checkpoint names an architecture loraserve does not implement."""


class EngineDead(LoraserveError):
    """The step loop stopped after an unexpected error; no further request can be served."""


class AdapterNotFound(LoraserveError):
    """The named adapter does not exist at its source (or the token given cannot see it)."""


class AdapterLoadError(LoraserveError):
    """The adapter exists but cannot serve this base model: corrupt files, unsupported features or mismatched shapes."""


class ClientGone(LoraserveError):
    """The client disconnected; its request was aborted and no reply can reach it."""


class AdapterInUse(LoraserveError):
    """An adapter cannot be unloaded while requests in flight read it."""


class DeadlineExceeded(LoraserveError):
    """The request did not finish within its deadline; it was aborted and its KV blocks and adapter freed."""
