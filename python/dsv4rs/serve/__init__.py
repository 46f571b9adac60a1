"""``dsv4rs serve``: an OpenAI-compatible HTTP server for a :class:`dsv4rs.LLM` (FastAPI on
uvicorn).

- :mod:`.app`: :func:`create_app`, the routes and their errors.
- :mod:`.protocol`: the request bodies (pydantic); :mod:`.format`: the response objects.
- :mod:`.worker`: the engine thread, the bounded request queue, cancellation and shutdown.
- :mod:`.parallel`: serving over several processes (rank 0 serves, the others follow it).
"""

from __future__ import annotations

from typing import Any


def create_app(llm, **kwargs: Any):
    """See :func:`dsv4rs.serve.app.create_app`."""
    from dsv4rs.serve.app import create_app as _create

    return _create(llm, **kwargs)


def serve(llm, host: str = "127.0.0.1", port: int = 8000, shutdown_grace: float = 30.0, **kwargs: Any) -> None:
    """Serves ``llm`` until interrupted (SIGINT/SIGTERM: running requests get ``shutdown_grace``
    seconds to finish, then are aborted)."""
    import uvicorn

    app = create_app(llm, shutdown_grace=shutdown_grace, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=max(shutdown_grace, 1.0))
