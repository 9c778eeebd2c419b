"""A fluxc server whose engine raises a RuntimeError for prompts containing "fault": the 500 path of the app, run
as a real server process (python tests/serve_fault.py ENGINE PORT)."""

import sys

import uvicorn

from fluxc.runtime import Engine
from fluxc.runtime.serve import ServeSettings, create_app


class FaultyEngine(Engine):
    def generate(self, prompt, **kwargs):
        if any("fault" in p for p in ([prompt] if isinstance(prompt, str) else prompt)):
            raise RuntimeError("injected fault")
        return super().generate(prompt, **kwargs)


if __name__ == "__main__":
    app = create_app(lambda: FaultyEngine.load(sys.argv[1]), ServeSettings(batch_window_ms=0))
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
