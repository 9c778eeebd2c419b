import sys

from fluxc.runtime.serve.main import main

sys.exit(main())
