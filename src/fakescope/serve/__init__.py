"""``fakescope serve``: an HTTP API and a web page over trained runs (FastAPI + uvicorn)."""

from fakescope.serve.app import ServeOptions, create_app

__all__ = ["ServeOptions", "create_app"]
