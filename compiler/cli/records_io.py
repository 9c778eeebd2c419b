"""Writing a record atomically (the commands check the output with check_writable before their work)."""

import json

from fluxc.runtime.core.bundle import save_atomically


def write_record(path: str, record: dict) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)

    save_atomically(path, dump)
