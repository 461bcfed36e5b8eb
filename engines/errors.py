"""Errors of the runtimes: each message says what is wrong and what to do."""


class EngineError(RuntimeError):
    """A runtime cannot be built or run as asked."""


class ArtifactError(EngineError):
    """An export folder is missing, incomplete or corrupted."""


def check_counts(options, names) -> None:
    """EngineError naming the first of the command-line options ``names`` (attributes of ``options``) that is below 1;
    None means not set."""
    for name in names:
        value = getattr(options, name)
        if value is not None and value < 1:
            raise EngineError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
