"""The one exception type for errors a user can cause and fix."""


class UserInputError(Exception):
    """Bad input, named precisely: the file, column or option, and what to do.

    The CLI turns it into a one-line message and a non-zero exit status.
    """
