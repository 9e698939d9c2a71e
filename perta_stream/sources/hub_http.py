"""Talking to a Hugging Face Hub: `hf://` locations, retries, error messages, range reads.

Shared by the Hub checkpoint reader (sources/hub.py) and the Hub output (sinks/hub_output.py).
Everything goes through huggingface_hub: its endpoint (`HF_ENDPOINT`, read by huggingface_hub),
its token lookup (`HF_TOKEN`, the saved login) and its shared HTTP client, so a private Hub
deployment, a proxy configured with `set_client_factory` and offline mode all behave as they do
for every other huggingface_hub caller. The token is only ever placed in request headers by
`build_hf_headers`; no message or log line here contains a header.

Range reads go straight to the file's storage location: the first read of a file follows the
Hub's redirect (`/resolve/` -> CDN, where httpx drops the Authorization header because the origin
changes) and remembers the final URL, so later reads of that file cost one round trip, not two.
A signed location that has expired (401/403/404/410) is dropped and resolved again.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar
from urllib.parse import urlsplit

from perta_stream.errors import HubError, UsageError

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf://"
# Statuses worth another try: timeouts, rate limits and server-side hiccups.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Statuses a storage location answers once its signature has expired.
EXPIRED_LOCATION_STATUS = frozenset({401, 403, 404, 410})
_READ_TIMEOUT_S = 60.0
_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient failure is retried.

    Attributes:
        attempts: tries in total (1 = no retry).
        base_wait_s: wait before the second try; doubled after each failure.
        max_wait_s: cap of one wait.
    """

    attempts: int = 6
    base_wait_s: float = 1.0
    max_wait_s: float = 30.0

    def wait_s(self, failures: int) -> float:
        return min(self.max_wait_s, self.base_wait_s * 2 ** max(0, failures - 1))


# Read at call time, so a caller (or a test) may replace it for the whole process.
RETRY_POLICY = RetryPolicy()


@dataclass(frozen=True)
class HubLocation:
    """A parsed `hf://ORG/NAME[@REVISION][/FOLDER]`.

    Attributes:
        repo_id: `ORG/NAME`.
        revision: branch, tag or commit; None means the repo's default branch.
        path_in_repo: a folder inside the repo holding the checkpoint, "" for the root.
    """

    repo_id: str
    revision: str | None = None
    path_in_repo: str = ""

    def file_path(self, file_name: str) -> str:
        """The path in the repo of a checkpoint file."""
        return f"{self.path_in_repo}/{file_name}" if self.path_in_repo else file_name

    def pinned(self, commit: str) -> str:
        """This location at an exact commit, as written into run records."""
        folder = f"/{self.path_in_repo}" if self.path_in_repo else ""
        return f"{HUB_PREFIX}{self.repo_id}@{commit}{folder}"

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        folder = f"/{self.path_in_repo}" if self.path_in_repo else ""
        return f"{HUB_PREFIX}{self.repo_id}{revision}{folder}"


def parse_hub_location(location: str) -> HubLocation:
    """Parse `hf://ORG/NAME[@REVISION][/FOLDER]` (model repos only).

    Raises:
        UsageError: the text is not a valid model repo location.
    """
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    try:
        uri = parse_hf_uri(location)
    except HfUriError as exc:
        raise UsageError(f"{location} is not a Hub location ({_first_line(exc)}); write hf://ORG/NAME[@REVISION]") from None
    if uri.type != "model":
        raise UsageError(f"{location} names a {uri.type} repo; checkpoints live in model repos: write hf://ORG/NAME[@REVISION]")
    return HubLocation(uri.id, uri.revision, uri.path_in_repo.strip("/"))


def hub_location_problem(location: str, flag: str) -> str | None:
    """A one-line problem for a config's report, or None when `location` is fine or not on the Hub."""
    if not str(location).startswith(HUB_PREFIX):
        return None
    try:
        parse_hub_location(str(location))
    except UsageError as exc:
        return f"{flag} {exc}"
    return None


@functools.cache
def hub_http_library() -> ModuleType:
    """The HTTP library under huggingface_hub's client, whose exceptions its calls raise.

    huggingface_hub 2.x is built on httpx2 and 1.x on httpx (the two share one API); this is the
    only place that tells them apart. huggingface_hub exports its own as `huggingface_hub.utils.httpx`
    from 1.30 on; before that a 1.x client always uses httpx.
    """
    from huggingface_hub import utils

    library = getattr(utils, "httpx", None)
    if library is None:
        import httpx as library
    return library


def hub_endpoint() -> str:
    """The Hub huggingface_hub is configured for (`HF_ENDPOINT`, default https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def make_api():
    """An `HfApi` on the configured endpoint; the token comes from the usual huggingface_hub places."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint(), library_name="perta-stream")


def hub_error(exc: BaseException, *, action: str, location: str) -> HubError:
    """Turn a huggingface_hub / HTTP failure into a HubError that says what to do.

    The messages name the repo and revision, never a token or request header.
    """
    from huggingface_hub import errors as hf_errors

    endpoint = hub_endpoint()
    exc = _root_cause(exc)
    if isinstance(exc, HubError):
        return exc
    if isinstance(exc, _TransientStatus):
        return HubError(f"{action} {location}: the Hub answered HTTP {exc.status}; retry later")
    if isinstance(exc, _ShortBody):
        return HubError(f"{action} {location}: the connection kept ending early ({exc}); check the network and retry")
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return HubError(f"{action} {location}: HF_HUB_OFFLINE is set; unset it to read or write hf:// locations")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return HubError(f"{action} {location}: the revision does not exist on {endpoint}; check the branch, tag or commit")
    if isinstance(exc, hf_errors.GatedRepoError):
        return HubError(f"{action} {location}: the repo is gated; accept its conditions on the Hub and log in (`hf auth login`)")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return HubError(
            f"{action} {location}: the repo does not exist on {endpoint}, or it is private and the token cannot see it; "
            "check the name, or log in with `hf auth login` (or set HF_TOKEN); a local folder must be a path that exists"
        )
    if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        return HubError(f"{action} {location}: a file is missing from the repo; it changed during the run, rerun")
    if isinstance(exc, hf_errors.HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        detail = f" ({exc.server_message.strip()})" if exc.server_message else ""
        if status == 401:
            return HubError(
                f"{action} {location}: the Hub refused the token (HTTP 401){detail}; log in again with "
                "`hf auth login` or set HF_TOKEN to a valid token"
            )
        if status == 403:
            return HubError(
                f"{action} {location}: the token has no permission for this (HTTP 403){detail}; use a token with "
                "write access to the repo (or read access for inputs)"
            )
        return HubError(f"{action} {location}: the Hub answered HTTP {status}{detail}; retry later")
    if isinstance(exc, hub_http_library().TransportError):
        return HubError(f"{action} {location}: cannot reach {endpoint} ({type(exc).__name__}: {_first_line(exc)}); check the network")
    return HubError(f"{action} {location}: {type(exc).__name__}: {_first_line(exc)}")


def _root_cause(exc: BaseException) -> BaseException:
    """huggingface_hub wraps some failures (`RuntimeError("Error while uploading ...")` from an
    HTTP error); the HTTP error underneath says what went wrong."""
    seen = {id(exc)}
    while not _is_known(exc) and exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _is_known(exc: BaseException) -> bool:
    from huggingface_hub import errors as hf_errors

    return isinstance(exc, HubError | _TransientStatus | _ShortBody | hf_errors.HfHubHTTPError | hub_http_library().TransportError)


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: timeouts, dropped connections, 408/429/5xx."""
    from huggingface_hub import errors as hf_errors

    if _name_not_resolved(exc):
        return False  # no network or no such host: retrying for half a minute changes nothing
    if isinstance(exc, _TransientStatus | hub_http_library().TransportError):
        return True
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return False
    if isinstance(exc, hf_errors.HfHubHTTPError) and exc.response is not None:
        return exc.response.status_code in TRANSIENT_STATUS
    return False


def _name_not_resolved(exc: BaseException) -> bool:
    """Whether a failure (or one it wraps) is a DNS lookup that failed (offline, unknown host)."""
    import socket

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return True
        text = str(current)
        if "Name or service not known" in text or "Temporary failure in name resolution" in text or "nodename nor servname" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def with_retries(call: Callable[[], _T], *, action: str, location: str) -> _T:
    """Run `call`, retrying transient failures with exponential backoff (`RETRY_POLICY`).

    Raises:
        HubError: a permanent failure at once, a transient one once the tries are used up.
    """
    policy = RETRY_POLICY
    failures = 0
    while True:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001  (sorted into transient and permanent right here)
            failures += 1
            if not is_transient(exc):
                raise hub_error(exc, action=action, location=location) from None
            if failures >= policy.attempts:
                error = hub_error(exc, action=action, location=location)
                raise HubError(f"{error} (gave up after {failures} tries)") from None
            wait_s = policy.wait_s(failures)
            logger.warning("%s %s: %s; retrying in %.1f s (%d/%d)", action, location, _first_line(exc), wait_s, failures, policy.attempts)
            time.sleep(wait_s)


class _TransientStatus(Exception):
    """A retryable HTTP status seen on a streamed response."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


class _ShortBody(Exception):
    """The connection ended before the promised bytes arrived (retried from where it stopped)."""


class RangeReader:
    """Reads byte ranges of the files of one repo at one pinned commit.

    Args:
        location: the repo (and folder) the files belong to.
        commit: the commit sha every read is pinned to, so a branch moving during the run
            cannot mix two versions of a model.
    """

    def __init__(self, location: HubLocation, commit: str):
        from huggingface_hub.utils import build_hf_headers

        self.location = location
        self.commit = commit
        self._endpoint = hub_endpoint()
        self._headers = build_hf_headers(library_name="perta-stream")
        self._storage_urls: dict[str, str] = {}
        self._lock = threading.Lock()
        self.bytes_received = 0
        self.requests = 0

    def resolve_url(self, file_name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.location.repo_id, self.location.file_path(file_name), revision=self.commit, endpoint=self._endpoint)

    def read_into(self, file_name: str, offset: int, view: memoryview) -> None:
        """Fill `view` with the bytes of `file_name` at `offset` (one ranged GET, resumed on failure).

        Raises:
            HubError: a permanent failure, or a transient one that outlasted the retries.
        """
        filled = 0
        policy = RETRY_POLICY
        failures = 0
        where = f"{self.location.pinned(self.commit)}/{file_name}"
        while filled < len(view):
            try:
                filled += self._get_range(file_name, offset + filled, view[filled:])
            except Exception as exc:  # noqa: BLE001  (sorted below)
                partial = getattr(exc, "filled", 0)
                filled += partial
                failures = 0 if partial else failures + 1
                transient = isinstance(exc, _ShortBody) or is_transient(exc)
                if not transient:
                    raise hub_error(exc, action="reading", location=where) from None
                if failures >= policy.attempts:
                    error = hub_error(exc, action="reading", location=where)
                    raise HubError(f"{error} (gave up after {failures} tries)") from None
                if failures:
                    wait_s = policy.wait_s(failures)
                    logger.warning("reading %s: %s; retrying in %.1f s (%d/%d)", where, _first_line(exc), wait_s, failures, policy.attempts)
                    time.sleep(wait_s)

    def _get_range(self, file_name: str, offset: int, view: memoryview) -> int:
        """One GET of `view`'s range; returns the bytes stored (or raises with `.filled` set)."""
        from huggingface_hub.utils import get_session, hf_raise_for_status

        with self._lock:
            cached = self._storage_urls.get(file_name)
        url = cached or self.resolve_url(file_name)
        headers = {"Range": f"bytes={offset}-{offset + len(view) - 1}", "Accept-Encoding": "identity"}
        if _origin(url) == _origin(self._endpoint):
            headers = {**self._headers, **headers}  # storage hosts get no token
        filled = 0
        with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=_READ_TIMEOUT_S) as response:
            with self._lock:
                self.requests += 1
            if cached and response.status_code in EXPIRED_LOCATION_STATUS:
                with self._lock:
                    self._storage_urls.pop(file_name, None)
                raise _TransientStatus(response.status_code)
            if response.status_code in TRANSIENT_STATUS:
                raise _TransientStatus(response.status_code)
            if response.status_code >= 400:
                response.read()
                hf_raise_for_status(response)
            _check_range(response, offset, len(view), file_name)
            final_url = str(response.url)
            if final_url != url:
                with self._lock:
                    self._storage_urls[file_name] = final_url
            try:
                for piece in response.iter_raw():
                    end = filled + len(piece)
                    if end > len(view):
                        raise HubError(f"{file_name}: the server sent more bytes than the range asked for; retry later")
                    view[filled:end] = piece
                    filled = end
            except Exception as exc:
                exc.filled = filled  # type: ignore[attr-defined]
                raise
            finally:
                with self._lock:
                    self.bytes_received += filled
        if filled < len(view):
            short = _ShortBody(f"{file_name}: got {filled} of {len(view)} bytes")
            short.filled = filled  # type: ignore[attr-defined]
            raise short
        return filled

    def read_bytes(self, file_name: str, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(file_name, offset, memoryview(buffer))
        return bytes(buffer)


def _check_range(response, offset: int, length: int, file_name: str) -> None:
    """Refuse a response that is not the asked-for range (a server ignoring Range would
    silently send the whole file from byte 0)."""
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        try:
            start = int(content_range.split()[1].split("-")[0])
        except (IndexError, ValueError):
            raise HubError(f"{file_name}: the server answered a range read without a valid Content-Range ({content_range!r})") from None
        if start != offset:
            raise HubError(f"{file_name}: asked for bytes from {offset}, the server sent from {start}; retry later")
        return
    if response.status_code == 200 and offset == 0 and _int(response.headers.get("Content-Length")) == length:
        return  # the whole file was asked for and sent
    raise HubError(
        f"{file_name}: the server ignored the Range header (HTTP {response.status_code}); a Hub endpoint that "
        "supports range requests is needed to stream checkpoints"
    )


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default_port


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
