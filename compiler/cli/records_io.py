"""Writing a record: the output folder checked first, the file written atomically."""

import json
import os

from fluxc.runtime.bundle import save_atomically
from fluxc.runtime.errors import FluxcError


def write_record(path: str, record: dict) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FluxcError(f"Output folder '{parent}' does not exist.", "Create it, or choose another -o path.")

    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)

    save_atomically(path, dump)
