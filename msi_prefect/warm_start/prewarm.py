"""Work the warm server does once, before its first fork, so each flow run need not.

Measured in a forked child (``prefect.engine`` from fork to its run accepted as RUNNING,
backup-file, idle stack, 2 cores), about 360 ms of CPU, of which two parts repeat the same
work in every run:

- **TLS contexts**: every Prefect API client builds ``ssl.create_default_context(cafile=
  certifi.where())``, which parses the whole CA bundle (about 16 ms of CPU here). A run makes
  eight clients before it is RUNNING (the engine's, the flow loader's, the log and event
  workers'...), about 130 ms, even when the API is plain ``http://`` and the context is never
  used. :func:`share_api_tls_contexts` gives Prefect's API clients one verified context per
  CA file, built here once.
- **The flow script**: ``load_flow_from_entrypoint`` executes ``flows/x.py`` afresh in every
  run (Prefect keeps no cache): the ``@flow`` decorator builds pydantic models of the
  parameters, and the script's imports come on top (7-80 ms of CPU). :func:`preload_flow_scripts`
  executes the scripts of the folders in :data:`FLOWS_ENV` here once; in the child, a script
  whose file is unchanged (same path, size, modification time and inode) is that module,
  a cache hit, and any other script loads as before.

- **The server's default result storage**: Prefect asks the server for it (``GET
  /admin/storage``) each time it sets up a result store, three times per run, once before
  the run is RUNNING. :func:`remember_default_result_storage` makes a run ask once a
  minute (:data:`DEFAULT_STORAGE_TTL_S`); a failed request is not remembered.

- **Prefect's deferred models**: Prefect's pydantic models (its client schemas, events,
  artifacts) are built on their first use (``defer_build``), so every run built the ones
  it used (``FlowRun`` when the engine reads its run, ``FlowRunUpdate`` when it names it,
  ``DeploymentResponse`` for its events...): about 36 ms of CPU per run, part of it before
  RUNNING (py-spy of forked runs, 2026-12-06). :func:`build_deferred_models` builds them
  here once (about 0.16 s and 4 MB for Prefect's 259 models).

- **Validators of the flows' parameters**: Prefect builds a pydantic model of the flow
  function's signature each time a run validates its parameters (about 10 ms of CPU
  before RUNNING, py-spy of forked runs, 2026-12-06), although it built the same model
  when the flow was declared. :func:`share_parameter_validators` keeps one per function,
  so the flow scripts preloaded here come with theirs.

- **botocore's service data**: s3fs starts a botocore session for every file system,
  and each session's loader parsed the S3 service model, its endpoint rule set and the
  endpoints file again (about 40 ms of CPU per backup or metadata run, py-spy of forked
  runs, 2026-12-06). :func:`share_botocore_data` gives the sessions of a process one
  loader per search path, loaded here with S3's data, and
  :func:`share_s3_tls_contexts` builds aiobotocore's verified TLS context (about 15 ms,
  for every S3 client, even of a plain-HTTP endpoint) once per setting.

None of them starts a thread, so the server stays safe to fork.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import sys
import time
import types
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msi_prefect.warm_start import FLOWS_ENV
from msi_prefect.warm_start.patching import library_original, put_in_place

logger = logging.getLogger("msi_prefect.warm_start")

#: ``0`` turns both off (each run then does that work itself, as before).
PREWARM_ENV = "MSI_WARM_START_PREWARM"


class _SharedTlsContexts(types.ModuleType):
    """Stands in for ``ssl`` in Prefect's client module: one verified context per CA file.

    Only ``create_default_context(cafile=...)`` with nothing else, the call Prefect's API
    clients make for a verified connection, is answered from the cache; Prefect hands that
    context to httpx unchanged (``verify=ctx``). Every other call and attribute is ``ssl``'s own,
    so the insecure context (``PREFECT_API_TLS_INSECURE_SKIP_VERIFY``, which Prefect then
    changes) is still a new one each time.
    """

    def __init__(self) -> None:
        super().__init__("ssl")
        self._contexts: dict[str, ssl.SSLContext] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(ssl, name)

    def create_default_context(
        self,
        purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH,
        *,
        cafile: str | None = None,
        capath: str | None = None,
        cadata: str | bytes | None = None,
    ) -> ssl.SSLContext:
        if cafile is None or capath is not None or cadata is not None:
            return ssl.create_default_context(purpose, cafile=cafile, capath=capath, cadata=cadata)
        if purpose is not ssl.Purpose.SERVER_AUTH:
            return ssl.create_default_context(purpose, cafile=cafile)
        context = self._contexts.get(cafile)
        if context is None:
            context = self._contexts[cafile] = ssl.create_default_context(cafile=cafile)
        return context


def share_api_tls_contexts() -> bool:
    """Make Prefect's API clients share one TLS context per CA file (Prefect's one built now).

    Returns False (and changes nothing) when Prefect's client module is not as expected.
    """
    try:
        import certifi
        from prefect.client import orchestration
        from prefect.settings import PREFECT_API_SSL_CERT_FILE
    except ImportError:
        return False
    if getattr(orchestration, "ssl", None) is not ssl:
        logger.warning("warm start: prefect.client.orchestration has no ssl; TLS not shared")
        return False
    shared = _SharedTlsContexts()
    # The CA file Prefect picks (PREFECT_API_SSL_CERT_FILE, else certifi's); a run whose
    # environment names another builds that one once.
    shared.create_default_context(cafile=PREFECT_API_SSL_CERT_FILE.value() or certifi.where())
    orchestration.ssl = shared
    return True


#: Seconds a run reuses the server's answer on its default result storage.
DEFAULT_STORAGE_TTL_S = 60.0


def remember_default_result_storage(
    ttl_s: float = DEFAULT_STORAGE_TTL_S, clock: Callable[[], float] = time.monotonic
) -> bool:
    """Make Prefect's clients reuse the server's default result storage for ``ttl_s`` seconds.

    Patches ``read_server_default_result_storage`` of Prefect's async and sync API clients;
    the answers are per API URL and per process (a forked run starts with none). Returns
    False (and changes nothing) when Prefect's clients are not as expected.
    """
    try:
        from prefect.client.orchestration import PrefectClient, SyncPrefectClient
    except ImportError:
        return False
    async_read = getattr(PrefectClient, "read_server_default_result_storage", None)
    sync_read = getattr(SyncPrefectClient, "read_server_default_result_storage", None)
    if async_read is None or sync_read is None:
        logger.warning("warm start: Prefect's clients read no default result storage")
        return False
    answers: dict[str, tuple[float, Any]] = {}

    def remembered(client: Any) -> Any | None:
        hit = answers.get(str(client.api_url))
        if hit is None or clock() - hit[0] > ttl_s:
            return None
        return hit[1].model_copy()

    def remember(client: Any, answer: Any) -> Any:
        answers[str(client.api_url)] = (clock(), answer)
        return answer.model_copy()

    async def read_async(self: PrefectClient) -> Any:
        hit = remembered(self)
        return hit if hit is not None else remember(self, await async_read(self))

    def read_sync(self: SyncPrefectClient) -> Any:
        hit = remembered(self)
        return hit if hit is not None else remember(self, sync_read(self))

    PrefectClient.read_server_default_result_storage = read_async  # type: ignore[method-assign]
    SyncPrefectClient.read_server_default_result_storage = read_sync  # type: ignore[method-assign]
    return True


#: The pydantic configuration Prefect validates a flow's parameters with.
PARAMETER_VALIDATION_CONFIG = {"arbitrary_types_allowed": True}


def share_parameter_validators() -> bool:
    """Build the validator of a flow function's parameters once, not once per run.

    Prefect builds a pydantic model of a flow function's signature when the flow is
    declared (to check it early; then it drops it) and again each time a run validates its
    parameters. Patches ``prefect.flows.ValidatedFunction`` so that a validator built with
    Prefect's configuration is kept per function (weakly: it goes with its function) and
    used again; the flow scripts preloaded here are declared here, so a forked run's
    validation finds theirs. Any other configuration is built as before. Returns False
    (and changes nothing) when Prefect has no such name.
    """
    try:
        from prefect import flows
    except ImportError:
        return False
    build = library_original(flows, "ValidatedFunction")
    if build is None:
        return False
    validators: weakref.WeakKeyDictionary[Callable[..., Any], Any] = weakref.WeakKeyDictionary()

    def validator(function: Callable[..., Any], config: Any = None) -> Any:
        if config != PARAMETER_VALIDATION_CONFIG:
            return build(function, config=config)
        found = validators.get(function)
        if found is None:
            found = validators[function] = build(function, config=config)
        return found

    put_in_place(flows, "ValidatedFunction", validator, build)
    return True


#: The AWS services whose botocore data the warm server loads before its first fork.
BOTOCORE_SERVICES = ("s3",)


def share_botocore_data(services: Iterable[str] = BOTOCORE_SERVICES) -> bool:
    """Load botocore's service data once per process, not once per S3 session.

    s3fs starts a new botocore session for every file system, and each session makes a
    loader of its own that reads and parses the service's JSON model, its endpoint rule
    set and the endpoints file again: about 40 ms of CPU per backup or metadata run
    (py-spy of forked runs, 2026-12-06). Patches ``botocore.session.create_loader`` to
    hand every session of the process the one loader for its search path, as botocore
    already shares a session's loader between all of that session's clients; then builds
    a client of each of ``services`` here (offline, nothing is sent), so a forked run finds
    their data loaded. Returns False (and changes nothing) when botocore is not there or
    not as expected.
    """
    try:
        import botocore.session
    except ImportError:
        return False
    create = library_original(botocore.session, "create_loader")
    if create is None:
        return False
    # One loader per search path (botocore passes it positionally).
    put_in_place(botocore.session, "create_loader", functools.cache(create), create)
    session = botocore.session.get_session()
    for service in services:
        try:
            session.create_client(
                service,
                region_name="us-east-1",
                endpoint_url="http://127.0.0.1:9",
                aws_access_key_id="warm-start",
                aws_secret_access_key="warm-start",
            )
        except Exception:
            logger.warning("warm start: %s's botocore data is left to runs", service, exc_info=True)
    return True


#: Where botocore finds a CA bundle named, in its order.
CA_BUNDLE_VARIABLES = ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE")


def share_s3_tls_contexts() -> bool:
    """Build aiobotocore's verified TLS context once per process and setting, not per client.

    Every S3 client of s3fs opens an aiohttp session, which builds a verified TLS context
    (the CA bundle parsed, about 15 ms of CPU, in a thread) even for a plain-HTTP endpoint.
    Patches ``AIOHTTPSession._build_ssl_contexts``: a session with no client certificate
    and no proxy gets the context built for its ``verify`` setting (here, before the first
    fork, for the settings a run's client comes with); any other session builds its own,
    as before. Returns False (and changes nothing) when aiobotocore is not there or not
    as expected.
    """
    try:
        from aiobotocore.httpsession import AIOHTTPSession
    except ImportError:
        return False
    build = library_original(AIOHTTPSession, "_build_ssl_contexts")
    if build is None:
        return False
    contexts: dict[Any, tuple[Any, Any]] = {}

    def shared_contexts(self: Any, proxy_url: str | None) -> tuple[Any, Any]:
        if proxy_url is not None or getattr(self, "_cert_file", None) is not None:
            return build(self, proxy_url)
        verify = getattr(self, "_verify", None)
        found = contexts.get(verify)
        if found is None:
            found = contexts[verify] = build(self, proxy_url)
        return found

    put_in_place(AIOHTTPSession, "_build_ssl_contexts", shared_contexts, build)
    # The settings a run's S3 client comes with: botocore takes a CA bundle named in the
    # environment (AWS_CA_BUNDLE, then REQUESTS_CA_BUNDLE), else verifies with its own.
    named = [path for name in CA_BUNDLE_VARIABLES if (path := os.environ.get(name))]
    for verify in dict.fromkeys((*named, True)):
        try:
            AIOHTTPSession(verify=verify)._build_ssl_contexts(None)
        except Exception:
            logger.warning("warm start: no TLS context for verify=%r", verify, exc_info=True)
    return True


#: Packages whose deferred pydantic models are built before the first fork.
DEFERRED_MODEL_PACKAGES = ("prefect",)


def build_deferred_models(packages: Iterable[str] = DEFERRED_MODEL_PACKAGES) -> int:
    """Build every pydantic model of ``packages`` that is still deferred; return how many.

    A model that cannot be built here (a name it refers to is not defined yet, or its
    schema fails) stays deferred, and a run builds it on first use, as before.
    """
    from pydantic import BaseModel

    prefixes = tuple(packages)
    built = 0
    pending: list[type[BaseModel]] = [BaseModel]
    seen: set[type[BaseModel]] = set()
    while pending:
        for model in pending.pop().__subclasses__():
            if model in seen:
                continue
            seen.add(model)
            pending.append(model)
            in_packages = model.__module__.split(".")[0] in prefixes
            if in_packages and not model.__pydantic_complete__:
                try:
                    built += bool(model.model_rebuild(raise_errors=False))
                except Exception:
                    logger.debug("warm start: %s left to its first use", model, exc_info=True)
    return built


@dataclass(frozen=True)
class _Preloaded:
    signature: tuple[int, int, int]
    module: types.ModuleType


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """A file's modification time, size and inode (what changes when it is rewritten or
    replaced), or None when it is not there."""
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def flow_script_folders(value: str | None = None) -> list[Path]:
    """The folders named in :data:`FLOWS_ENV` (or ``value``) that exist."""
    raw = os.environ.get(FLOWS_ENV, "") if value is None else value
    return [Path(item) for item in raw.split(os.pathsep) if item.strip() and Path(item).is_dir()]


def preload_flow_scripts(folders: Iterable[Path]) -> dict[Path, types.ModuleType]:
    """Execute every ``*.py`` in ``folders`` as Prefect loads a flow script; cache hits later.

    A script that fails is logged and left out (its runs load it themselves). Installs the
    cached lookup in :func:`prefect.utilities.importtools.load_script_as_module` and returns
    the scripts loaded (by resolved path).
    """
    from prefect.utilities import importtools

    load = importtools.load_script_as_module
    original: Callable[[str], types.ModuleType] = getattr(load, "__wrapped__", load)
    cache: dict[Path, _Preloaded] = {}
    path_before = list(sys.path)
    try:
        for folder in folders:
            for script in sorted(Path(folder).glob("*.py")):
                resolved = script.resolve()
                signature = file_signature(resolved)
                if signature is None or script.name.startswith("_"):
                    continue
                try:
                    module = original(str(resolved))
                except Exception:
                    logger.exception("warm start: could not preload flow script %s", script)
                    continue
                cache[resolved] = _Preloaded(signature, module)
    finally:
        sys.path[:] = path_before  # what the script's loading added is the child's to add

    def load_script_as_module(path: str) -> types.ModuleType:
        resolved = Path(path).resolve()
        hit = cache.get(resolved)
        if hit is None or file_signature(resolved) != hit.signature:
            return original(path)
        # As the original leaves it: the script's folder and the working directory first.
        for entry in (os.getcwd(), str(resolved.parent)):
            sys.path.insert(0, entry)
        return hit.module

    load_script_as_module.__wrapped__ = original  # type: ignore[attr-defined]
    load_script_as_module.__doc__ = original.__doc__
    importtools.load_script_as_module = load_script_as_module
    logger.info("warm start: preloaded %d flow script(s)", len(cache))
    return {path: entry.module for path, entry in cache.items()}
