"""Where an href's bytes come from: one store per scheme/host/bucket, created once and reused.

Kept apart from the fetch stage because which store may be built, and how (no redirects,
operator-configured endpoints only), is part of the access policy, not of reading tiles:

- HTTP(S): core.httpstore.HTTPRangeStore (no redirects, connect-time address check, byte
  caps), asked for the canonical path the policy checked (core.access.parse_remote).
- S3: the object_store client under obstore follows up to 10 redirects and has no option to
  stop it (its ClientOptions has none; checked against apache/arrow-rs-object-store's
  client/mod.rs and retry.rs, and by test). So S3 objects are read as presigned GETs
  (obstore.sign with the operator's credentials, local HMAC) through the same
  HTTPRangeStore: a 3xx is refused, never followed. Anonymous buckets
  (AWS_SKIP_SIGNATURE) get the same URL without the signature.
- GCS and Azure: obstore stores. They follow redirects (the same object_store client; https
  only unless the operator enabled plain HTTP) — stated in the start-up report.

Object stores are built from the bucket or container name alone (validated by the policy:
no dots for Azure, no `@`, no port), never by parsing the href with `from_url`, so an href
cannot choose an endpoint, account or region; those come from the operator's environment
(AWS_*, GOOGLE_*, AZURE_*) and are named in the start-up report.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import obstore
from obstore.store import AzureStore, GCSStore, LocalStore, S3Store

from core.access import OBJECT_SCHEMES, parse_remote
from core.httpstore import HTTPRangeStore

if TYPE_CHECKING:
    from core.access import AccessPolicy

SIGN_TTL_S = 3600  # presigned URLs live this long ...
SIGN_REUSE_S = 3000  # ... and are reused for this long (then signed again)
_S3_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
_AZURE_SCHEMES = ("az", "abfs", "abfss", "azure")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def split_href(href: str) -> tuple[str, str]:
    """(store key, path inside that store) for an href: local path, file://, s3://, http(s)://...

    Remote hrefs go through core.access.parse_remote, so the store is asked for exactly the
    URL the access policy decided on (and a hostile href raises AccessDenied here too, even
    where no policy is set).
    """
    parts = urlsplit(href)
    if parts.scheme in ("", "file"):
        return ("file", unquote(parts.path) if parts.scheme == "file" else href)
    # http(s)://host:port/path, s3://bucket/key, gs://bucket/key, az://container/key, ...
    target = parse_remote(href)
    return (target.origin, target.path.lstrip("/"))


def s3_endpoint(env: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """(variable, value) of the operator's S3 endpoint setting, or None for AWS itself."""
    for name in _S3_ENDPOINT_VARS:
        if env.get(name):
            return name, env[name]
    return None


class SignedS3Store(HTTPRangeStore):
    """S3 range reads as presigned GETs through HTTPRangeStore (which refuses redirects).

    The signing store is built from the bucket name and the operator's AWS_* environment
    only. A configured endpoint is the operator's choice, so its address may be internal
    (MinIO on a private network); AWS's own endpoints get the connect-time check.
    """

    def __init__(self, bucket: str, **kw: Any) -> None:
        # obstore's S3Store reads the same os.environ: the decisions here match its own
        super().__init__(f"s3://{bucket}", allow_internal=s3_endpoint() is not None, **kw)
        self.bucket = bucket
        self.anonymous = _truthy(os.environ.get("AWS_SKIP_SIGNATURE"))
        if self.anonymous:
            # object_store signs even when told to skip signatures (and then looks for
            # credentials); sign with throwaway keys for the URL, then drop the signature
            self._signer = S3Store(
                bucket,
                access_key_id="anonymous",
                secret_access_key="anonymous",
                skip_signature=False,
            )
        else:
            self._signer = S3Store(bucket)
        self._signed: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def _url(self, path: str) -> str:
        now = time.monotonic()
        hit = self._signed.get(path)
        if hit is not None and now - hit[0] < SIGN_REUSE_S:
            return hit[1]
        url = await obstore.sign_async(
            self._signer, "GET", path, expires_in=timedelta(seconds=SIGN_TTL_S)
        )
        if self.anonymous:
            url = url.split("?", 1)[0]
        self._signed[path] = (now, url)
        while len(self._signed) > 4096:
            self._signed.popitem(last=False)
        return url


def object_store_report(schemes: set[str], env: Mapping[str, str] = os.environ) -> list[str]:
    """Where each object-store scheme in use reads from, by the operator's configuration.

    Names the variables that set endpoints, regions and credentials (values only for
    endpoints and regions, never secrets), so the start-up output says which stores a
    request can reach.
    """
    lines = []
    if "s3" in schemes:
        endpoint = s3_endpoint(env)
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1 (default)"
        where = f"{endpoint[0]}={endpoint[1]}" if endpoint else f"AWS, region {region}"
        if _truthy(env.get("AWS_SKIP_SIGNATURE")):
            creds = "anonymous (AWS_SKIP_SIGNATURE)"
        elif env.get("AWS_ACCESS_KEY_ID"):
            creds = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the environment"
        else:
            creds = "AWS credential chain (web identity, container or instance role)"
        lines.append(
            f"s3 store: endpoint {where}; credentials {creds}; presigned GETs, redirects refused"
        )
    if "gs" in schemes:
        base = env.get("GOOGLE_BASE_URL")
        where = f"GOOGLE_BASE_URL={base}" if base else "Google Cloud Storage"
        named = [
            n
            for n in (
                "GOOGLE_SERVICE_ACCOUNT",
                "GOOGLE_SERVICE_ACCOUNT_PATH",
                "GOOGLE_SERVICE_ACCOUNT_KEY",
                "GOOGLE_APPLICATION_CREDENTIALS",
            )
            if env.get(n)
        ]
        creds = ", ".join(named) or "application default credentials"
        lines.append(
            f"gs store: endpoint {where}; credentials {creds}; obstore client (follows "
            "redirects: object_store has no option to stop it)"
        )
    if schemes & set(_AZURE_SCHEMES):
        account = env.get("AZURE_STORAGE_ACCOUNT_NAME") or "(AZURE_STORAGE_ACCOUNT_NAME unset)"
        endpoint = env.get("AZURE_STORAGE_ENDPOINT") or env.get("AZURE_ENDPOINT")
        where = f"endpoint {endpoint}" if endpoint else f"account {account}"
        lines.append(
            f"azure store: {where}; obstore client (follows redirects: object_store has "
            "no option to stop it)"
        )
    return lines


class Stores:
    """One store per scheme/host/bucket, created on first use and reused.

    `policy` (set by the engine) tells an HTTP store whether its origin was allowed
    explicitly; without a policy every href is readable (library use), internal hosts too.
    """

    def __init__(
        self, factory: Callable[[str], Any] | None = None, policy: AccessPolicy | None = None
    ) -> None:
        self._stores: dict[str, Any] = {}
        self._factory = factory or self._default_store
        self.policy = policy

    def _default_store(self, key: str) -> Any:
        if key == "file":
            return LocalStore()
        scheme, _, host = key.partition("://")
        if scheme in ("http", "https"):
            explicit = self.policy is None or self.policy.allows_internal(key)
            return HTTPRangeStore(key, allow_internal=explicit)  # never follows redirects
        if scheme == "s3":
            return SignedS3Store(host)
        if scheme == "gs":
            return GCSStore(host)
        if scheme in _AZURE_SCHEMES:
            return AzureStore(host)
        raise ValueError(f"{key}: no store for scheme {scheme!r} ({', '.join(OBJECT_SCHEMES)})")

    async def aclose(self) -> None:
        """Close the stores that hold connections on this event loop."""
        for store in self._stores.values():
            close = getattr(store, "aclose", None)
            if close is not None:
                await close()

    def get(self, href: str) -> tuple[Any, str]:
        key, path = split_href(href)
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = self._factory(key)
        return store, path
