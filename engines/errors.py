"""Errors of the runtimes: each message says what is wrong and what to do."""


class EngineError(RuntimeError):
    """A runtime cannot be built or run as asked."""


class ArtifactError(EngineError):
    """An export folder is missing, incomplete or corrupted."""
