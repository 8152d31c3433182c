"""Asynchronous invokers per platform (OpenWhisk, OpenFaaS, AWS Lambda, GCF over HTTP) and a router by platform name."""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from typing import Any, Mapping

from fedkeeper.core import config as cfgmod
from fedkeeper.core import keys

DEFAULT_NAMES = {"trigger": "fedkeeper-trigger", "client": "fedkeeper-client", "aggregator": "fedkeeper-aggregator"}


class InvokeError(RuntimeError):
    """The platform refused or failed an asynchronous invocation; the message names platform, function and status."""


def function_name(platform: cfgmod.PlatformConfig, function: str) -> str:
    """The deployed name of `function` on `platform` (options.functions overrides the default)."""
    names = platform.options.get("functions") or {}
    return names.get(function, DEFAULT_NAMES[function])


def _secret(platform: cfgmod.PlatformConfig) -> str | None:
    if not platform.auth_env:
        return None
    value = os.environ.get(platform.auth_env)
    if not value:
        raise InvokeError(f"platform {platform.name}: environment variable {platform.auth_env} (auth_env) is empty; "
                          "set it to the platform's credential")
    return value


def _post(url: str, body: bytes, headers: dict, timeout: float, what: str) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - endpoints come from the config
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        raise InvokeError(f"{what} was refused with HTTP {exc.code}: {exc.read()[:300]!r}") from None
    except OSError as exc:
        raise InvokeError(f"{what} failed: {exc}") from None


class OpenWhiskInvoker:
    """POST /api/v1/namespaces/<ns>/actions/<name>?blocking=false with the namespace's API key (Basic auth)."""

    def __init__(self, platform: cfgmod.PlatformConfig) -> None:
        self.p = platform
        self.base = platform.endpoint.rstrip("/")
        self.namespace = platform.options.get("namespace", "_")

    def invoke(self, function: str, payload: dict, platform: str | None = None) -> None:
        """Non-blocking activation; OpenWhisk answers 202 with an activation id."""
        url = f"{self.base}/api/v1/namespaces/{self.namespace}/actions/{function_name(self.p, function)}?blocking=false"
        headers = {}
        key = _secret(self.p)
        if key:
            headers["Authorization"] = "Basic " + base64.b64encode(key.encode()).decode()
        _post(url, json.dumps(payload).encode(), headers, 30, f"OpenWhisk {self.p.name} {function}")


class OpenFaaSInvoker:
    """POST <gateway>/async-function/<name>: the gateway queues the call and answers 202.

    Invoking functions needs no gateway credentials in OpenFaaS; auth_env names the functions'
    own bearer token (FEDKEEPER_TOKEN), which the forwarded request carries.
    """

    def __init__(self, platform: cfgmod.PlatformConfig) -> None:
        self.p = platform
        self.base = platform.endpoint.rstrip("/")

    def invoke(self, function: str, payload: dict, platform: str | None = None) -> None:
        """Queue the call on the gateway (NATS-backed in OpenFaaS); the function checks the bearer token itself."""
        headers = {}
        token = _secret(self.p)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        _post(f"{self.base}/async-function/{function_name(self.p, function)}", json.dumps(payload).encode(),
              headers, 30, f"OpenFaaS {self.p.name} {function}")


class LambdaInvoker:
    """boto3 Lambda Invoke with InvocationType='Event' (Lambda queues it and answers 202)."""

    def __init__(self, platform: cfgmod.PlatformConfig, client: Any = None) -> None:
        self.p = platform
        if client is None:
            try:
                import boto3
            except ImportError as exc:
                raise InvokeError("AWS Lambda invocations need boto3: pip install 'fedkeeper[aws]'") from exc
            client = boto3.client("lambda", region_name=platform.options.get("region"),
                                  endpoint_url=platform.endpoint or None)
        self.client = client

    def invoke(self, function: str, payload: dict, platform: str | None = None) -> None:
        """Asynchronous invoke; anything but 202 is an error."""
        resp = self.client.invoke(FunctionName=function_name(self.p, function), InvocationType="Event",
                                  Payload=json.dumps(payload).encode())
        if resp.get("StatusCode") != 202:
            raise InvokeError(f"Lambda {self.p.name} {function} answered {resp.get('StatusCode')}, not 202")


class GCFInvoker:
    """HTTP functions have no asynchronous invoke: POST the event and return once the function has accepted it.

    Cloud Functions runs an HTTP function until it responds, so the call is sent with a short read
    timeout: the request is delivered and the function keeps running after this side stops
    waiting. A read timeout is therefore success; a refused connection or an HTTP error is not.
    """

    def __init__(self, platform: cfgmod.PlatformConfig, wait_s: float = 2.0) -> None:
        self.p = platform
        self.wait_s = float(platform.options.get("wait_s", wait_s))

    def url(self, function: str) -> str:
        """URL of the deployed function: options.urls[function], else <endpoint>/<name>."""
        urls = self.p.options.get("urls") or {}
        if function in urls:
            return urls[function]
        return f"{self.p.endpoint.rstrip('/')}/{function_name(self.p, function)}"

    def invoke(self, function: str, payload: dict, platform: str | None = None) -> None:
        """POST and wait at most wait_s for the answer."""
        headers = {}
        token = _secret(self.p)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url(function), data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=self.wait_s) as resp:  # noqa: S310 - from the config
                resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or exc.code in (401, 403, 404):
                raise InvokeError(f"GCF {self.p.name} {function} answered HTTP {exc.code}") from None
        except TimeoutError:
            return  # delivered and still running
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                return
            raise InvokeError(f"GCF {self.p.name} {function} could not be reached: {exc.reason}") from None


INVOKERS = {"openwhisk": OpenWhiskInvoker, "openfaas": OpenFaaSInvoker, "lambda": LambdaInvoker, "gcf": GCFInvoker}


class Router:
    """Sends each call to its platform's invoker: clients to their platform, trigger/aggregator to the control platform."""

    def __init__(self, cfg: cfgmod.FederationConfig, invokers: Mapping[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.invokers = dict(invokers or {})
        for p in cfg.platforms:
            if p.name not in self.invokers and p.kind in INVOKERS:
                self.invokers[p.name] = INVOKERS[p.kind](p)

    def invoke(self, function: str, payload: dict, platform: str | None = None) -> None:
        """Route and invoke; a platform without an invoker (local outside the runtime) is an error naming the fix."""
        name = platform if function == "client" and platform else self.cfg.control
        inv = self.invokers.get(name)
        if inv is None:
            raise InvokeError(f"platform {name!r} has no remote invoker (kind local); run this federation with "
                              "`fedkeeper run`, or give the platform a kind and endpoint")
        inv.invoke(function, payload, platform)


def router_for(store: Any) -> Router:
    """A Router from the federation.json in the store."""
    return Router(cfgmod.from_stored(store.get_json(keys.FEDERATION)))
