"""The option fields every photo-taking route shares (``/cartoonize``, its batch, ``/jobs``).

They are :class:`~serving.options.RequestOptions` itself, read from the form (a FastAPI form model):
declared, bounded and described once, there. The dependency checks them once and returns them with
the service's defaults filled in (:class:`~serving.options.ResolvedOptions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Final

from fastapi import Depends, Form, Request, UploadFile

from api.errors import MAX_FILENAME_LENGTH, APIError
from api.state import ServiceState, get_state
from serving.options import OPTION_NAMES, RequestOptions, ResolvedOptions

#: The form fields of the photo routes that are not images; an empty value is refused rather than
#: taken as left out.
_FIELDS: Final = (*OPTION_NAMES, "response", "webhook")


async def request_params(
    request: Request,
    state: Annotated[ServiceState, Depends(get_state)],
    options: Annotated[RequestOptions, Form()],
) -> ResolvedOptions:
    """The shared option fields, with the service's defaults. An unknown, unconfigured, loading or
    failed style is refused here, before any upload is looked at. A field sent empty is refused (422):
    the form parser would otherwise take it as left out, and the request would silently get a
    default."""
    form = await request.form()  # already parsed for the parameters: this reads the cache
    empty = [name for name in _FIELDS if any(value == "" for value in form.getlist(name))]
    if empty:
        raise APIError("invalid_request", "; ".join(f"{name}: must not be empty" for name in empty))
    return state.flow.options(options)


RequestParams = Annotated[ResolvedOptions, Depends(request_params)]


def check_filenames(uploads: Sequence[UploadFile]) -> None:
    """422 ``filename_too_long`` for an uploaded file name over :data:`MAX_FILENAME_LENGTH`: it is
    echoed in reports and used in ZIP entry names."""
    for upload in uploads:
        name = upload.filename or ""
        if len(name) > MAX_FILENAME_LENGTH:
            raise APIError(
                "filename_too_long",
                f"a file name of {len(name)} characters ({name[:40]!r}…); at most {MAX_FILENAME_LENGTH}",
            )
