"""Error types shared by the library, the CLI and the Slicer module."""


class InputError(Exception):
    """Bad user input: a missing file, wrong geometry, an invalid label...

    The message names the file, case or field and what is wrong; the CLI prints it on one
    line and exits with status 2.
    """


class ModelError(InputError):
    """A model folder that is missing, corrupt, foreign or from an unknown version."""


class Cancelled(Exception):
    """Long work stopped because the user asked for it."""
