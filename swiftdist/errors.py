class SwiftdistError(Exception):
    """A user mistake (bad flag, bad file, impossible combination).

    The CLI prints these as one line and exits with code 2; anything else is a bug and keeps
    its traceback.
    """
