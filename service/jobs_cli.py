"""``toonserve jobs``: hand a folder (or a clip) to a running service as one job, follow it, fetch
the ZIP (or the cartoon clip).

    toonserve jobs submit DIR|CLIP [--server URL] [--output FILE] [--style … --format … …]
    toonserve jobs status ID [--server URL]

The client side of ``/jobs``: it uploads every photo of the folder in one request, follows the job's
events stream (a progress bar on a terminal, one line per photo otherwise) and downloads the ZIP of
the results. Given a file instead of a folder, it sends it as a video job's clip (the server decides
by content whether it is one), counts its frames as they are written and downloads the MP4.
``--api-key`` (or ``TOONSERVE_API_KEY``) is sent when the server wants one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.folders import photos_in
from service.option_flags import add_option_flags, options_from
from service.progress import Progress

_DEFAULT_SERVER = "http://localhost:8000"


def _client(args: argparse.Namespace) -> Any:
    import httpx

    key = args.api_key or os.environ.get("TOONSERVE_API_KEY")
    headers = {"X-API-Key": key} if key else {}
    return httpx.Client(
        base_url=args.server.rstrip("/"), headers=headers, timeout=httpx.Timeout(60, read=None)
    )


def _events(response: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a Server-Sent Events response."""
    event, data = "message", list[str]()
    for line in response.iter_lines():
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", list[str]()
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def _fail(response: Any) -> int:
    try:
        error = response.json()["error"]
        print(f"error: {response.status_code} {error['code']}: {error['message']}", file=sys.stderr)
    except (ValueError, KeyError, TypeError):
        print(f"error: {response.status_code} {response.text[:300]}", file=sys.stderr)
    return 2


def _cmd_submit(args: argparse.Namespace) -> int:
    import httpx

    source = Path(args.folder)
    video = source.is_file()
    photos = [source] if video else photos_in(source)
    # Checked here first (a value out of range is said at once, before any upload), then sent as the
    # form fields the service reads into the same options.
    fields: dict[str, Any] = {
        **options_from(args).model_dump(exclude_none=True, exclude_unset=True),
        "webhook": args.webhook,
    }
    data = {k: str(v) for k, v in fields.items() if v is not None}
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    try:
        with _client(args) as client, contextlib.ExitStack() as stack:
            part = "video" if video else "images"
            files = [(part, (p.name, stack.enter_context(p.open("rb")))) for p in photos]
            response = client.post("/jobs", files=files, data=data, headers=headers)
            if response.status_code not in (200, 202):
                return _fail(response)
            job = response.json()
            unit = "frames of a clip" if video else "photos"
            print(f"job {job['id']}: {job['total']} {unit}", file=sys.stderr)
            job = _follow(client, job)
            if video and (job["status"] != "succeeded" or job["failed"]):
                return _video_failed(job)
            output = Path(args.output or f"toonserve-{job['id']}.{'mp4' if video else 'zip'}")
            with client.stream("GET", f"/jobs/{job['id']}/result") as zipped:
                if zipped.status_code != 200:
                    zipped.read()
                    return _fail(zipped)
                with output.open("wb") as out:
                    for chunk in zipped.iter_bytes():
                        out.write(chunk)
    except httpx.HTTPError as exc:
        print(f"error: {args.server}: {exc}", file=sys.stderr)
        return 2
    if video:
        print(f"{job['status']}: {job['total']} frames cartoonized; the clip is {output}")
        return 0
    ok = job["total"] - job["failed"] - sum(i["status"] == "cancelled" for i in job["items"])
    print(f"{job['status']}: {ok} of {job['total']} photos cartoonized; results in {output}")
    for item in job["items"]:
        if item["status"] == "error":
            print(f"  {item['filename']}: {item['error']['message']}", file=sys.stderr)
    return 0 if job["status"] == "succeeded" and job["failed"] == 0 else 1


def _video_failed(job: dict[str, Any]) -> int:
    # The items are chunks of the clip: the first that did not end ok says why.
    item = next((i for i in job["items"] if i["status"] != "ok"), job["items"][0])
    why = item["error"]["message"] if item["error"] else job["error"] or item["status"]
    print(f"{job['status']}: the clip was not cartoonized: {why}", file=sys.stderr)
    return 1


def _follow(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Follow the job's events to its end; the final job object."""
    progress = Progress(job["total"], "frames" if job.get("kind") == "video" else "img")
    with client.stream("GET", f"/jobs/{job['id']}/events") as events:
        for event, data in _events(events):
            if event in ("job", "progress"):
                progress.update(data["done"], "")
            elif event == "item" and job.get("kind") == "video":
                if not progress.tty:
                    print(f"{data['filename']}: {data['status']}", file=sys.stderr)
            elif event == "item":
                progress.step(data["filename"])
                if not progress.tty:
                    print(f"{data['filename']}: {data['status']}", file=sys.stderr)
            elif event == "end":
                job = data
    progress.close()
    if "items" not in job:  # deleted while we watched
        raise SystemExit(f"error: job {job['id']} was deleted")
    return job


def _cmd_status(args: argparse.Namespace) -> int:
    import httpx

    try:
        with _client(args) as client:
            response = client.get(f"/jobs/{args.id}")
    except httpx.HTTPError as exc:
        print(f"error: {args.server}: {exc}", file=sys.stderr)
        return 2
    if response.status_code != 200:
        return _fail(response)
    job = response.json()
    print(f"{job['id']} {job['status']}: {job['done']} of {job['total']} done, {job['failed']} failed")
    for item in job["items"]:
        error = f" ({item['error']['message']})" if item["error"] else ""
        print(f"  {item['index']:4d} {item['status']:9} {item['filename']}{error}")
    return 0


def add_parser(sub: Any) -> None:
    """``toonserve jobs submit|status``."""
    jobs = sub.add_parser("jobs", help="submit a folder to a running service as one job, or check a job")
    cmds = jobs.add_subparsers(dest="jobs_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--server", default=_DEFAULT_SERVER, help=f"the service's URL (default {_DEFAULT_SERVER})"
        )
        p.add_argument("--api-key", help="the service's API key (default: $TOONSERVE_API_KEY)")

    submit = cmds.add_parser(
        "submit", help="upload a folder (or a clip) as one job, follow it, download the ZIP (or the MP4)"
    )
    submit.add_argument(
        "folder",
        help="folder of photos (jpg, png, webp, bmp, tiff, gif), or one clip (mp4, mov, webm, mkv, avi, "
        "animated gif) for a video job",
    )
    common(submit)
    submit.add_argument(
        "--output", help="where to save the ZIP or the clip (default toonserve-<job id>.zip or .mp4)"
    )
    add_option_flags(submit)
    submit.add_argument("--webhook", help="URL the server POSTs the job to when it ends")
    submit.add_argument("--idempotency-key", help="submitting again with the same key returns the same job")
    submit.set_defaults(func=_cmd_submit)

    status = cmds.add_parser("status", help="a job's status and its items")
    status.add_argument("id", help="the job's id")
    common(status)
    status.set_defaults(func=_cmd_status)
