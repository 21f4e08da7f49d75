"""A local stand-in for the Hugging Face Hub, enough for `huggingface_hub.snapshot_download` over `HF_ENDPOINT`.

It serves folders registered as repos: the revision info, the recursive tree and `resolve` downloads, with the
headers the client reads (X-Repo-Commit, ETag, Content-Length). A private repo answers 401 unless the request carries
its token; unknown repos answer 404. It runs uvicorn in a thread on a free loopback port and records every request.
Faults on demand: a repo that answers every request with an error status (`fail`), or whose file downloads stop
half-way until released (`stall`).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from server_process import free_port


@dataclass
class Repo:
    folder: Path
    token: str | None = None  # None = public
    sha: str = field(default="")
    failure: tuple[int, str] | None = None  # (status, message) answered to every request
    stalled: threading.Event | None = None  # set: downloads go on

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def add_repo(self, repo_id: str, folder: Path, token: str | None = None) -> None:
        digest = hashlib.sha1(repo_id.encode() + b"".join(p.read_bytes() for p in sorted(folder.rglob("*"))
                                                          if p.is_file())).hexdigest()
        self.repos[repo_id] = Repo(folder, token, digest)

    def fail(self, repo_id: str, status: int, message: str) -> None:
        """Every request for `repo_id` answers `status` with `{"error": message}` and no X-Error-Code."""
        self.repos[repo_id].failure = (status, message)

    def stall(self, repo_id: str) -> threading.Event:
        """Downloads of `repo_id`'s files send half of each file, then nothing until the returned event is set."""
        released = self.repos[repo_id].stalled = threading.Event()
        return released

    def __enter__(self) -> HubServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("the Hub stand-in did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def _authorized(self, request: Request, repo_id: str) -> Repo | Response:
        repo = self.repos.get(repo_id)
        if repo is None:
            return JSONResponse({"error": "Repository not found"}, 404, headers={"X-Error-Code": "RepoNotFound"})
        if repo.failure is not None:
            return JSONResponse({"error": repo.failure[1]}, repo.failure[0])
        if repo.token is not None and request.headers.get("authorization") != f"Bearer {repo.token}":
            return JSONResponse({"error": "Invalid credentials"}, 401, headers={"X-Error-Code": "RepoNotFound"})
        return repo

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def record(request: Request, call_next):  # noqa: ANN001, ANN202 - starlette middleware signature
            self.requests.append((request.method, request.url.path, request.headers.get("authorization")))
            return await call_next(request)

        @app.get("/api/models/{repo_id:path}/revision/{revision}")
        async def revision(repo_id: str, revision: str, request: Request) -> Response:
            repo = self._authorized(request, repo_id)
            if isinstance(repo, Response):
                return repo
            siblings = [{"rfilename": str(p.relative_to(repo.folder))} for p in repo.files()]
            return JSONResponse({"id": repo_id, "modelId": repo_id, "sha": repo.sha, "siblings": siblings,
                                 "private": repo.token is not None})

        @app.get("/api/models/{repo_id:path}/tree/{revision}")
        async def tree(repo_id: str, revision: str, request: Request) -> Response:
            repo = self._authorized(request, repo_id)
            if isinstance(repo, Response):
                return repo
            entries = [
                {"type": "file", "oid": hashlib.sha1(p.read_bytes()).hexdigest(), "size": p.stat().st_size,
                 "path": str(p.relative_to(repo.folder))}
                for p in repo.files()
            ]
            return JSONResponse(entries)

        @app.api_route("/{repo_id:path}/resolve/{revision}/{filename:path}", methods=["GET", "HEAD"])
        async def resolve(repo_id: str, revision: str, filename: str, request: Request) -> Response:
            repo = self._authorized(request, repo_id)
            if isinstance(repo, Response):
                return repo
            path = repo.folder / filename
            if not path.is_file():
                return JSONResponse({"error": "Entry not found"}, 404, headers={"X-Error-Code": "EntryNotFound"})
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha1(path.read_bytes()).hexdigest()}"'}
            if request.method == "HEAD":
                return Response(headers={**headers, "Content-Length": str(path.stat().st_size)})
            if repo.stalled is not None:
                return StreamingResponse(_halves(path.read_bytes(), repo.stalled),
                                         headers={**headers, "Content-Length": str(path.stat().st_size)})
            return FileResponse(path, headers=headers)

        return app


async def _halves(content: bytes, released: threading.Event):  # noqa: ANN202 - an async generator of bytes
    yield content[: len(content) // 2]
    while not released.is_set():
        await asyncio.sleep(0.05)
    yield content[len(content) // 2 :]
