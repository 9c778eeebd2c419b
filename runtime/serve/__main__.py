"""`python -m fluxc.runtime.serve ENGINE [--port 8000] ...`: fluxc serve without the CLI (see main.py)."""

import sys

from fluxc.runtime.serve.main import main

if __name__ == "__main__":
    sys.exit(main())
