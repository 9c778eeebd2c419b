"""The one user-facing error type.

`FluxcError` is for mistakes a user can fix (a wrong path, a corrupt engine, a GPU mismatch). The CLI
prints it as one paragraph with its remedy and exits 1 without a traceback. Anything else is a bug and
keeps its traceback. It lives in the runtime so that production code can catch it without importing the
compiler.
"""


class FluxcError(Exception):
    def __init__(self, message: str, remedy: str = ""):
        super().__init__(message)
        self.message = message
        self.remedy = remedy

    def __str__(self) -> str:
        return f"{self.message} Remedy: {self.remedy}" if self.remedy else self.message
