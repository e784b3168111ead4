"""The package's error class: raised for runtime and file failures, its message names the file and
the problem (the CLI prints it as one line and exits 1)."""


class RuntimeError_(RuntimeError):
    """Raised for runtime failures; the message names the file and the problem."""
