"""HTTP client for the co-training panel: MONAI Label's REST API plus the app's ``/cotrain``.

Standard library only (``urllib``): it runs in 3D Slicer's Python as is, and imports nothing
from ``slicer``, ``qt``, ``vtk`` or ``monailabel``. Every failure raises :class:`CoTrainError`
(or a subclass) whose text is meant for the user: the server is down, authentication is
needed or refused, the model is unknown, the model is not trained yet, a training is already
running, or the server is not the co-training app.

Endpoints used (MONAI Label 0.8): ``GET /info/``, ``POST /train/{model}``, ``DELETE /train/``,
``POST /infer/{model}?image=ID&output=json``, ``GET /datastore/label?label=ID&tag=TAG``,
``PUT /datastore/label?image=ID&tag=TAG``, ``GET /auth/``, ``POST /auth/token``; and the
co-training app's ``GET /cotrain/state`` (which also reports the training status) and
``PUT /cotrain/auto_train`` (``apps/cotrain/lib/control.py``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import uuid
from typing import Any
from urllib import error, parse, request

logger = logging.getLogger(__name__)

#: Seconds to wait for an answer to a quick request (state, switches).
DEFAULT_TIMEOUT_S = 10.0
#: Seconds to wait for an inference (a whole volume, sliding window, every member).
INFER_TIMEOUT_S = 600.0


class CoTrainError(Exception):
    """A request failed; ``str(error)`` says what happened and what to do, for the user.

    Attributes:
        status: The HTTP status, or ``None`` when the server did not answer.
        detail: The server's own explanation (FastAPI's ``detail``), if any.
    """

    def __init__(self, message: str, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class ServerUnreachableError(CoTrainError):
    """No answer: the server is down, the address is wrong, or it timed out."""


class AuthenticationError(CoTrainError):
    """401 (no or bad token) or 403 (the account lacks the role)."""


class NotTrainedError(CoTrainError):
    """503: the model has not been trained yet (or no model file verifies)."""


class UnknownModelError(CoTrainError):
    """The server does not serve a model of that name."""


class TrainingBusyError(CoTrainError):
    """A training is already running (MONAI Label runs one at a time)."""


class EndpointMissingError(CoTrainError):
    """The server has no ``/cotrain`` endpoints: it does not run the co-training app."""


def _detail(body: bytes) -> str:
    """FastAPI's ``detail`` of an error body, else the body's text (shortened)."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(data, dict) and "detail" in data:
        detail = data["detail"]
        if isinstance(detail, list):  # request validation errors
            return "; ".join(
                str(item.get("msg", item)) if isinstance(item, dict) else str(item)
                for item in detail
            )
        return str(detail)
    return text[:500]


def normalize_token(token: Any) -> str | None:
    """An ``Authorization`` header value from a token.

    Accepts a bare access token, ``"Bearer TOKEN"``, or MONAI Label's token answer
    ``{"access_token": ..., "token_type": ...}``; ``None`` or empty means no token.
    """
    if not token:
        return None
    if isinstance(token, dict):
        access = token.get("access_token")
        if not access:
            return None
        return f"{token.get('token_type') or 'Bearer'} {access}"
    text = str(token).strip()
    if not text:
        return None
    return text if " " in text else f"Bearer {text}"


class CoTrainClient:
    """Talks to one MONAI Label server running the co-training app.

    Args:
        server_url: The server, e.g. ``http://127.0.0.1:8000``.
        token: Optional access token when MONAI Label authentication is on (see
            :func:`normalize_token` for the accepted forms); :meth:`login` sets one.
        timeout_s: Seconds to wait for quick requests.
        use_env_proxy: Use the ``http_proxy`` environment settings. Off by default, like
            MONAI Label's own client, which connects directly.
    """

    def __init__(
        self,
        server_url: str,
        token: Any = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        use_env_proxy: bool = False,
    ) -> None:
        url = (server_url or "").strip().rstrip("/")
        if not url:
            raise CoTrainError(
                "No server address: enter the MONAI Label server, e.g. http://127.0.0.1:8000"
            )
        if "://" not in url:
            url = f"http://{url}"
        scheme = parse.urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise CoTrainError(f"Server address {server_url!r} must start with http:// or https://")
        self.server_url = url
        self.authorization = normalize_token(token)
        self.timeout_s = timeout_s
        handlers = [] if use_env_proxy else [request.ProxyHandler({})]
        self._opener = request.build_opener(*handlers)

    # ------------------------------------------------------------------ transport

    def url(self, path: str, query: dict[str, Any] | None = None) -> str:
        """The full URL of ``path`` with ``query`` (``None`` values left out)."""
        url = f"{self.server_url}{path}"
        if query:
            items = {k: v for k, v in query.items() if v is not None}
            url += "?" + parse.urlencode(items)
        return url

    def _open(
        self,
        method: str,
        path: str,
        what: str,
        query: dict[str, Any] | None = None,
        data: bytes | None = None,
        content_type: str | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Send a request and return the open response (the caller closes it).

        Raises:
            CoTrainError: With a message naming ``what`` failed and why.
        """
        headers = {"Accept": "application/json, */*"}
        if self.authorization:
            headers["Authorization"] = self.authorization
        if content_type:
            headers["Content-Type"] = content_type
        req = request.Request(self.url(path, query), data=data, method=method, headers=headers)
        try:
            return self._opener.open(req, timeout=timeout_s or self.timeout_s)
        except error.HTTPError as e:
            body = e.read() if e.fp is not None else b""
            raise self._http_error(e.code, body, what) from None
        except (TimeoutError, socket.timeout):  # noqa: UP041 (distinct before Python 3.10)
            raise ServerUnreachableError(
                f"{what}: the MONAI Label server at {self.server_url} did not answer within "
                f"{timeout_s or self.timeout_s:.0f} s (busy or unreachable); try again"
            ) from None
        except (error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerUnreachableError(
                f"{what}: cannot reach the MONAI Label server at {self.server_url} ({reason}). "
                "Is it running (monailabel start_server ...) and is the address right?"
            ) from None

    def _http_error(self, status: int, body: bytes, what: str) -> CoTrainError:
        """The error for an HTTP error answer."""
        detail = _detail(body)
        if status == 401:
            state = "the token was refused" if self.authorization else "no token was given"
            return AuthenticationError(
                f"{what}: the server requires a login (MONAI Label authentication is on) and "
                f"{state}: log in or enter a valid access token ({detail})",
                status,
                detail,
            )
        if status == 403:
            return AuthenticationError(
                f"{what}: not allowed for this account: {detail}. Ask the server's "
                "administrator for that role.",
                status,
                detail,
            )
        if status == 503:
            return NotTrainedError(f"{what}: {detail}", status, detail)
        if status == 429:
            return TrainingBusyError(
                f"{what}: a training is already running ({detail}); stop it or wait",
                status,
                detail,
            )
        return CoTrainError(f"{what} failed (HTTP {status}): {detail}", status, detail)

    def _json(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        """Send a request and decode its JSON answer."""
        with self._open(method, path, what, **kwargs) as response:
            try:
                body = response.read()
            except OSError as e:  # timed out or cut off while reading the answer
                raise ServerUnreachableError(
                    f"{what}: the answer of the MONAI Label server at {self.server_url} was "
                    f"cut off ({e}); try again"
                ) from None
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except ValueError:
            raise CoTrainError(
                f"{what}: the server answered something other than JSON: {body[:200]!r}"
            ) from None

    # ------------------------------------------------------------------ MONAI Label API

    def info(self) -> dict[str, Any]:
        """``/info/``: models, trainers, ``train_stats`` per model and datastore counts."""
        info = self._json("GET", "/info/", "Reading the server's info")
        if not isinstance(info, dict):
            raise CoTrainError("Reading the server's info: unexpected answer")
        return info

    def start_training(self, model: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """``POST /train/{model}``: start a training run now (refused while one runs).

        Raises:
            TrainingBusyError: If a training is running.
        """
        body = json.dumps(params or {}).encode()
        task = self._json(
            "POST",
            f"/train/{parse.quote(model, safe='')}",
            f"Starting training of {model!r}",
            data=body,
            content_type="application/json",
        )
        return task if isinstance(task, dict) else {}

    def stop_training(self) -> dict[str, Any] | None:
        """``DELETE /train/``: stop the running training; ``None`` if none was running."""
        task = self._json("DELETE", "/train/", "Stopping training")
        return task if isinstance(task, dict) else None

    def infer(
        self, model: str, image_id: str, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``POST /infer/{model}?image=ID&output=json``: run the model, answer its params only.

        Raises:
            NotTrainedError: 503, the model has no published ensemble yet.
        """
        data = parse.urlencode({"params": json.dumps(params or {})}).encode()
        result = self._json(
            "POST",
            f"/infer/{parse.quote(model, safe='')}",
            f"Running {model!r} on {image_id!r}",
            query={"image": image_id, "output": "json"},
            data=data,
            content_type="application/x-www-form-urlencoded",
            timeout_s=INFER_TIMEOUT_S,
        )
        return result if isinstance(result, dict) else {}

    def download_label(self, label_id: str, tag: str, path: str) -> str:
        """``GET /datastore/label``: save the label ``label_id`` with ``tag`` to ``path``.

        Returns:
            ``path``.
        """
        what = f"Downloading the {tag!r} label of {label_id!r}"
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        partial = f"{path}.part"
        # No parenthesized multi-item ``with``: Slicer 5.0 to 5.6 run Python 3.9.
        response = self._open(
            "GET",
            "/datastore/label",
            what,
            query={"label": label_id, "tag": tag},
            timeout_s=INFER_TIMEOUT_S,
        )
        try:
            with open(partial, "wb") as f:
                shutil.copyfileobj(response, f)
            os.replace(partial, path)
        except OSError as e:  # cut off, or the local disk refused the file
            if os.path.exists(partial):
                os.remove(partial)
            raise CoTrainError(f"{what} to {path}: {e}") from None
        finally:
            response.close()
        return path

    def save_label(
        self,
        image_id: str,
        label_path: str,
        tag: str = "final",
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``PUT /datastore/label``: submit a label file for an image, as MONAI Label's plugin.

        Returns:
            The server's answer; the co-training app adds ``train`` (per model: ``started``,
            ``queued``, ``coalesced`` or why not) and ``labeled``.
        """
        with open(label_path, "rb") as f:
            content = f.read()
        body, content_type = _multipart(
            {"params": json.dumps(params or {})},
            {"label": (os.path.basename(label_path), content)},
        )
        result = self._json(
            "PUT",
            "/datastore/label",
            f"Saving the label of {image_id!r}",
            query={"image": image_id, "tag": tag},
            data=body,
            content_type=content_type,
        )
        return result if isinstance(result, dict) else {}

    def auth_enabled(self) -> bool:
        """Whether MONAI Label authentication is on (its ``/auth/`` exists only then)."""
        try:
            answer = self._json("GET", "/auth/", "Checking authentication")
        except CoTrainError as e:
            if e.status == 404:
                return False
            raise
        return bool(isinstance(answer, dict) and answer.get("enabled"))

    def login(self, username: str, password: str) -> str:
        """``POST /auth/token``: log in and use the token for the next requests.

        Returns:
            The ``Authorization`` header value now in use.
        """
        data = parse.urlencode(
            {"username": username, "password": password, "grant_type": "password"}
        ).encode()
        token = self._json(
            "POST",
            "/auth/token",
            f"Logging in as {username!r}",
            data=data,
            content_type="application/x-www-form-urlencoded",
        )
        authorization = normalize_token(token)
        if not authorization:
            raise AuthenticationError(
                "Logging in: the server gave no token (is authentication on?)", None, None
            )
        self.authorization = authorization
        return authorization

    # ------------------------------------------------------------------ co-training app API

    def cotrain_state(self) -> dict[str, Any]:
        """``GET /cotrain/state``: each model's method, switch, served model, training status.

        Raises:
            EndpointMissingError: If the server is not the co-training app.
        """
        try:
            state = self._json("GET", "/cotrain/state", "Reading the co-training state")
        except CoTrainError as e:
            raise self._missing_endpoint(e) from None
        return state if isinstance(state, dict) else {}

    def set_auto_train(self, model: str, enabled: bool) -> dict[str, Any]:
        """``PUT /cotrain/auto_train``: turn retrain on submit on or off; answers the model's state.

        Raises:
            UnknownModelError: If the server does not serve ``model``.
            EndpointMissingError: If the server is not the co-training app.
        """
        what = f"Turning retrain on submit {'on' if enabled else 'off'} for {model!r}"
        try:
            state = self._json(
                "PUT",
                "/cotrain/auto_train",
                what,
                query={"model": model, "enabled": "true" if enabled else "false"},
            )
        except CoTrainError as e:
            if e.status == 404 and e.detail and "unknown model" in e.detail:
                raise UnknownModelError(f"{what}: {e.detail}", 404, e.detail) from None
            raise self._missing_endpoint(e) from None
        return state if isinstance(state, dict) else {}

    def _missing_endpoint(self, e: CoTrainError) -> CoTrainError:
        if e.status in (404, 405) and (e.detail or "").strip().lower() in (
            "not found",
            "method not allowed",
        ):
            return EndpointMissingError(
                f"The server at {self.server_url} has no /cotrain endpoints: it is not running "
                "the co-training app (apps/cotrain), or an older version of it. Training state "
                "from /info still works; the retrain-on-submit switch does not.",
                e.status,
                e.detail,
            )
        return e


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """Encode form ``fields`` and ``files`` (name -> (filename, content)) as multipart/form-data.

    Returns:
        The body and its ``Content-Type``.
    """
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, (filename, content) in files.items():
        safe_name = filename.replace('"', "_")
        parts.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{safe_name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            + content
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
