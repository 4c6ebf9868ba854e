"""The web UI: static files from `ui_dir`, the page at / and its assets under /ui/. They talk to the
service through the public REST API only; nothing here reads the job store."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from deployments.service.errors import ServiceError

NO_CACHE = {"Cache-Control": "no-cache"}  # assets are small; a new release must not need a hard reload


def mount_ui(app: FastAPI, ui_dir: str | None) -> None:
    folder = Path(ui_dir) if ui_dir else None
    if folder is None or not (folder / "index.html").is_file():

        @app.get("/", include_in_schema=False)
        async def no_ui():
            raise ServiceError("NOT_FOUND", f"the web UI is not installed (no index.html in {folder})",
                               recovery="set MUSICGEN_UI_DIR to the ui/ folder of the repository")  # fmt: skip

        return

    index = folder / "index.html"

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(index, media_type="text/html", headers=NO_CACHE)

    app.mount("/ui", StaticFiles(directory=folder, follow_symlink=False), name="ui")
