"""One validated config schema (pydantic models) for the CLI, the functions and the deploy scripts."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from fedkeeper.core import strategy as strategies
from fedkeeper.core.privacy.settings import PrivacyConfig

PLATFORM_KINDS = ("local", "openwhisk", "openfaas", "gcf", "lambda")
MODELS = ("nn", "cnn")
OPTIMIZERS = ("adam", "sgd")
STRATEGIES = strategies.names()
EVENT_MODES = ("auto", "store", "client")  # who tells the aggregator an update landed
CLIENT_ACCESS = ("store", "presigned")
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """Config values are wrong; names the (first) field and how to fix it, and carries every problem found."""

    def __init__(self, field_path: str, problem: str, fix: str,
                 others: list[tuple[str, str, str]] | None = None) -> None:
        self.field = field_path
        self.problem = problem
        self.fix = fix
        self.errors: list[tuple[str, str, str]] = [(field_path, problem, fix)] + list(others or [])
        lines = [(f"config file: {p}. Fix: {x}" if f == "<file>" else f"config field '{f}': {p}. Fix: {x}")
                 for f, p, x in self.errors]
        text = lines[0] if len(lines) == 1 else f"{len(lines)} problems in the config:\n  " + "\n  ".join(lines)
        super().__init__(text)


def _problem(problem: str, fix: str) -> PydanticCustomError:
    """A validation error whose message and fix the ConfigError translation keeps verbatim."""
    return PydanticCustomError("fedkeeper", "{problem}", {"problem": problem, "fix": fix})


class _Section(BaseModel):
    # Unknown keys are typos far more often than intent; strict types keep "yes" from meaning true.
    model_config = ConfigDict(extra="forbid", strict=True)


def _inside(check, path: str, value: Any) -> Any:
    """Run a ConfigError-raising check inside a pydantic validator, keeping its problem and fix."""
    try:
        return check(path, value)
    except ConfigError as exc:
        raise _problem(exc.problem, exc.fix) from None


def _text_or_empty(v: Any) -> Any:
    """YAML's bare `key:` is null; an empty optional text field means 'not set'."""
    return "" if v is None else v


class ModelConfig(_Section):
    """Which network, and how each client trains it."""

    name: Literal["nn", "cnn"] = Field("nn", description="nn: Dense(500, relu) -> Dense(classes); cnn: "
                                       "Conv32-Pool-Conv64-Pool-Dense512-Dense(classes)")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="client optimizer, fresh each invocation")
    learning_rate: float = Field(1e-3, gt=0, le=10, description="client learning rate")
    batch_size: int = Field(10, ge=1, le=1 << 20, description="local batch size")
    epochs: int = Field(2, ge=0, le=10000, description="local epochs per round (0: clients only evaluate and "
                                                       "send the global model back, so nothing is learned)")
    jit_compile: bool = Field(True, description="compile each client's training loop with XLA (same math, less time)")
    steps_per_execution: int = Field(32, ge=1, le=100000, description="training steps per compiled call")


class DataConfig(_Section):
    """Which dataset and how it is split across clients."""

    dataset: str = Field("digits", description="digits (offline), mnist, fashion_mnist, cifar10, or npz:PATH")
    partition: str = Field("iid", description="iid, shards (2 label shards per client), shards:K, dirichlet:ALPHA")
    test_fraction: float = Field(0.2, gt=0, le=0.9, description="share held out centrally as the test set")
    holdout_fraction: float = Field(0.1, ge=0, le=0.9, description="share of each client's data for federated evaluation")

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return _inside(validate_dataset, "data.dataset", v)

    @field_validator("partition")
    @classmethod
    def _partition(cls, v: str) -> str:
        return _inside(validate_partition, "data.partition", v)


class StrategyConfig(_Section):
    """How clients are sampled and updates combined and checked."""

    name: str = Field("fedavg", description="aggregation strategy: " + ", ".join(STRATEGIES))
    params: dict = Field(default_factory=dict, description="strategy-specific settings")
    fraction: float = Field(1.0, gt=0, le=1, description="share of clients selected per round")
    min_clients: int = Field(1, ge=1, description="at least this many clients per round")
    quorum: float = Field(0.5, gt=0, le=1, description="share of selected clients whose accepted updates make a new "
                                                       "model; below it the round fails and the model stays")
    deadline_s: float | Literal["auto"] = Field(
        600.0, description="a round closes at its deadline with the updates present; auto: derived from the selected "
                           "clients' history (selection.deadline_*)")
    max_update_mb: float = Field(256.0, gt=0, description="larger updates are rejected before they are downloaded")
    norm_multiple: float = Field(4.0, ge=0, description="reject updates farther from the global model than this "
                                                        "multiple of the round's median (0: off)")
    max_examples: int = Field(100_000, ge=1, description="example-count cap for clients with their own data "
                                                         "(setup's clients are held to their partition size)")
    retries: int = Field(0, ge=0, le=100, description="re-invocations of a failed client while the deadline allows")
    lease_s: float = Field(120.0, gt=0, description="an aggregator's claim expires after this long")

    @field_validator("params", mode="before")
    @classmethod
    def _params(cls, v: Any) -> Any:
        return {} if v is None else copy.deepcopy(v)

    @field_validator("deadline_s", mode="before")
    @classmethod
    def _deadline(cls, v: Any) -> Any:
        # One message for both shapes, instead of pydantic's one error per member of the union.
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
            raise _problem(f"must be seconds above 0 or auto, got {v!r}",
                           "set strategy.deadline_s to a number of seconds above 0, or to auto")
        return float(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # Checked against the module tuple at call time, so registering a strategy extends it.
        if v not in STRATEGIES:
            raise _problem(f"unknown value {v!r}", f"use one of: {', '.join(STRATEGIES)}")
        return v


class SelectionConfig(_Section):
    """Which clients a round selects, from what the store has measured about each, and the automatic deadline."""

    name: Literal["random", "compute_aware", "utility"] = Field(
        "random", description="random: seeded sample; compute_aware: fast and reliable clients first, unexplored ones "
                              "tried, every client within max_wait rounds; utility: data size x loss against duration")
    max_wait: int = Field(5, ge=0, le=100000, description="a client unselected for this many rounds is picked first "
                                                          "(compute_aware, utility; 0: off)")
    explore: float = Field(0.2, ge=0, le=1, description="utility: share of a round given to clients without history")
    alpha: float = Field(2.0, ge=0, le=10, description="utility: penalty exponent for clients slower than preferred_s")
    preferred_s: float = Field(0.0, ge=0, description="utility: preferred client duration (0: the median expected one)")
    history_window: int = Field(5, ge=1, le=100, description="recent durations kept per client")
    deadline_percentile: float = Field(90.0, gt=0, le=100, description="deadline_s auto: this percentile of the "
                                                                       "selected clients' expected durations")
    deadline_margin: float = Field(1.5, ge=1, le=100, description="deadline_s auto: times this margin")
    deadline_floor_s: float = Field(10.0, gt=0, description="deadline_s auto: never below this")
    deadline_cap_s: float = Field(600.0, gt=0, description="deadline_s auto: never above this (and the deadline "
                                                           "while a selected client has no history)")


class BufferConfig(_Section):
    """Buffered asynchronous mode (mode: async): no round barrier; every `size` updates make a model version."""

    size: int = Field(5, ge=1, le=100000, description="accepted updates folded into each new model version")
    staleness: str = Field("polynomial:0.5", description="weight of an update by how many versions behind it is: "
                                                         "constant, polynomial:A ((1+t)^-A) or hinge:A,B")
    max_staleness: int = Field(10, ge=0, le=100000, description="updates more versions behind than this are rejected")
    server_lr: float = Field(1.0, gt=0, le=10, description="step size of the weighted mean update on the global model")
    time_budget_s: float = Field(0.0, ge=0, description="stop making versions after this many seconds (0: only "
                                                         "`rounds` versions end it)")

    @field_validator("staleness")
    @classmethod
    def _staleness(cls, v: str) -> str:
        from fedkeeper.core import staleness

        try:
            staleness.parse(v)
        except ValueError as exc:
            raise _problem(str(exc).split(";")[0], staleness.MSG_SPEC) from None
        return v


class AggregationConfig(_Section):
    """How a round's updates are folded: by one aggregator, or in a tree of group folds and a root."""

    mode: Literal["auto", "single", "tree"] = Field(
        "auto", description="single: one aggregator folds every update; tree: fixed groups of fan_in are folded "
                            "as they settle, then the partial sums; auto: tree above tree_above selected clients")
    fan_in: int = Field(32, ge=2, le=100000, description="clients (or partial sums) per group in tree mode")
    tree_above: int = Field(64, ge=1, description="auto mode folds rounds with more selected clients than this as a tree")
    shards: int = Field(1, ge=1, le=4096, description="fold each of this many byte-balanced tensor shards in its own "
                                                      "invocation, and write the model sharded (1: one file)")


class PlatformConfig(_Section):
    """One FaaS platform that runs clients: what kind, how many clients, its limits and endpoint."""

    name: str = Field(description="platform name; generated client ids start with it")
    kind: Literal["local", "openwhisk", "openfaas", "gcf", "lambda"] = Field(
        "local", description="local emulates the platform on this machine; the others call a deployed function")
    clients: int = Field(1, ge=0, le=1_000_000, description="clients generated on this platform (ids NAME-000, ...)")
    concurrency: int = Field(2, ge=1, le=10000, description="invocations running at once")
    instance_concurrency: int = Field(
        1, ge=1, le=1000, description="invocations one warm instance serves at once, each on its own thread "
        "(GCF 2nd gen and Cloud Run --concurrency, OpenWhisk's action concurrency, OpenFaaS max_inflight; "
        "Lambda serves one at a time); instances = concurrency / instance_concurrency, rounded up")
    timeout_s: float = Field(300.0, gt=0, description="an invocation is killed after this long")
    memory_mb: int = Field(2048, ge=64, description="an invocation is killed above this memory")
    endpoint: str = Field("", description="API host (openwhisk), gateway (openfaas) or functions' base URL (gcf)")
    auth_env: str = Field("", description="environment variable holding the credential for invocations")
    options: dict = Field(default_factory=dict, description="platform-specific settings (region, project, image, ...)")

    _opt = field_validator("endpoint", "auth_env", mode="before")(_text_or_empty)

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, v: Any) -> Any:
        return {} if v is None else copy.deepcopy(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _CLIENT_ID.match(v):
            raise _problem(f"invalid name {v!r}", "use letters, digits, '-', '_' or '.'")
        return v

    @model_validator(mode="after")
    def _one_per_lambda(self) -> "PlatformConfig":
        if self.kind == "lambda" and self.instance_concurrency > 1:
            raise _problem(f"platform {self.name}: instance_concurrency {self.instance_concurrency} on Lambda, "
                           "whose execution environments serve one invocation at a time",
                           "remove instance_concurrency (or set it to 1) and raise concurrency instead")
        return self


class ClientConfig(_Section):
    """One data owner: its id, the platform its function runs on, and optionally its own data URI."""

    # The id rule is a pattern checked inside pydantic-core: a federation of thousands of clients
    # is validated on every function's cold start.
    id: str = Field(description="1-64 letters, digits, '-', '_' or '.'", pattern=_CLIENT_ID.pattern)
    platform: str = Field(description="name of the platform its function runs on")
    data: str = Field("", description="a store key or URL of the owner's own data (default: its share from setup)")

    _opt = field_validator("data", mode="before")(_text_or_empty)


def _default_platforms() -> list[PlatformConfig]:
    return [PlatformConfig(**p) for p in DEFAULT_PLATFORMS]


class FederationConfig(_Section):
    """The whole federation: written to federation.json at setup and read by every function."""

    name: str = Field("fedkeeper", description="federation name")
    seed: int = Field(0, ge=0, description="seeds the data split, client sampling and the initial model")
    rounds: int = Field(5, ge=1, le=100000, description="federated rounds")
    store: str = Field("", description="folder, s3://bucket/prefix or gs://bucket/prefix; empty: `run` and "
                                       "`setup` create ./fedkeeper-data/run-TIME")
    schedule: str = Field("", description="cron expression: start a round on this schedule (run --schedule)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: rounds with a barrier; async: buffered asynchronous (no barrier, clients "
                            "re-invoked as soon as they deliver, a new model version every buffer.size updates; "
                            "`rounds` counts versions)")
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    platforms: list[PlatformConfig] = Field(default_factory=_default_platforms,
                                            description="platforms that run clients (a list, or a mapping name: settings)")
    clients: list[ClientConfig] = Field(default_factory=list, description="explicit clients, besides generated ones")
    evaluation_platform: str = Field("", description="where the central evaluation runs (default: first platform)")
    events: Literal["auto", "store", "client"] = Field(
        "auto", description="who tells the aggregator an update landed: store events, clients, or auto "
                            "(client for gs://, else store)")
    client_access: Literal["store", "presigned"] = Field(
        "store", description="presigned: clients get URLs for exactly their objects and hold no store credentials")
    control_platform: str = Field("", description="where the trigger and the aggregator run (default: first platform)")
    # Parsed into a PrivacyConfig by the cross checks (fedkeeper/core/privacy/settings.py names each field's problem).
    privacy: Any = Field(None, description="differential privacy (privacy.dp) and secure aggregation "
                                           "(privacy.secure_aggregation, privacy.secagg); see docs/privacy.md")

    _opt = field_validator("store", "schedule", "evaluation_platform", "control_platform", mode="before")(_text_or_empty)

    @field_validator("model", "data", "strategy", "aggregation", "selection", "buffer", mode="before")
    @classmethod
    def _section(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        return _inside(lambda _path, x: check_cron(x), "schedule", v) if v else v

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of this config."""
        return self.model_dump()

    def to_json(self) -> str:
        """JSON text of this config, stable key order."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def platform(self, name: str) -> PlatformConfig:
        """The platform called `name`."""
        for p in self.platforms:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def deadline_bound(self) -> float:
        """The longest a round may stay open: deadline_s, or the auto deadline's cap."""
        d = self.strategy.deadline_s
        return self.selection.deadline_cap_s if d == "auto" else float(d)

    @property
    def control(self) -> str:
        """Platform that runs the trigger and the aggregator: the configured one or the first."""
        return self.control_platform or self.platforms[0].name

    @property
    def eval_platform(self) -> str:
        """Platform that runs central evaluation: the configured one or the first."""
        return self.evaluation_platform or self.platforms[0].name


DEFAULT_PLATFORMS = [
    {"name": "openwhisk", "kind": "local", "clients": 4, "concurrency": 2},
    {"name": "openfaas", "kind": "local", "clients": 2, "concurrency": 1},
    {"name": "gcf", "kind": "local", "clients": 4, "concurrency": 2},
]

_SECTIONS: dict[str, type[BaseModel]] = {"model": ModelConfig, "data": DataConfig, "strategy": StrategyConfig,
                                         "aggregation": AggregationConfig, "selection": SelectionConfig, "buffer": BufferConfig,
                                         "platforms": PlatformConfig,
                                         "clients": ClientConfig}


def validate_partition(path: str, value: Any) -> str:
    """Check a partition spec: iid, shards, shards:K or dirichlet:ALPHA."""
    value = _str(path, value)
    if value in ("iid", "shards"):
        return value
    kind, _, arg = value.partition(":")
    try:
        num = float(arg)
    except ValueError:
        num = -1.0
    if kind == "dirichlet" and num > 0:
        return value
    if kind == "shards" and num >= 1 and num.is_integer():
        return value
    raise ConfigError(path, f"unknown partition {value!r}",
                      "use iid, shards (2 label shards per client), shards:K, or dirichlet:ALPHA with ALPHA > 0")


def validate_dataset(path: str, value: Any) -> str:
    """Check a dataset spec: a known name or npz:PATH."""
    value = _str(path, value)
    if value in DATASETS or (value.startswith("npz:") and len(value) > 4):
        return value
    raise ConfigError(path, f"unknown dataset {value!r}", f"use one of {', '.join(DATASETS)}, or npz:PATH")


def _str(path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected text, got {value!r}", f"quote the value of {path}")
    return value


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(loc: tuple) -> list[str]:
    """Field names allowed where an unknown key was found, for the 'use one of' fix."""
    model: type[BaseModel] = FederationConfig
    for part in loc[:-1]:
        if isinstance(part, str) and part in _SECTIONS:
            model = _SECTIONS[part]
    return sorted(model.model_fields)


def _num(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _translate(err: dict) -> tuple[str, str, str]:
    """One pydantic error as (field path, problem, fix), in this project's words."""
    loc = tuple(err["loc"])
    path = _path(loc) or "<file>"
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "fedkeeper":
        return path, ctx["problem"], ctx["fix"]
    if kind == "extra_forbidden":
        return path, "unknown field", f"remove it or use one of: {', '.join(_fields_at(loc))}"
    if kind == "missing":
        return path, "required field is missing", f"add {loc[-1]}: to {_path(loc[:-1]) or 'the file'}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return path, f"expected an integer, got {got!r}", f"set {path} to a whole number"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return path, f"expected a number, got {got!r}", f"set {path} to a number"
    if kind in ("bool_type", "bool_parsing"):
        return path, f"expected true or false, got {got!r}", f"set {path} to true or false (unquoted)"
    if kind in ("string_type",):
        return path, f"expected text, got {got!r}", f"quote the value of {path}"
    if kind == "greater_than":
        return path, f"must be > {_num(ctx['gt'])}, got {got}", f"set {path} to a value above {_num(ctx['gt'])}"
    if kind == "greater_than_equal":
        return path, f"must be >= {_num(ctx['ge'])}, got {got}", f"set {path} to at least {_num(ctx['ge'])}"
    if kind == "less_than_equal":
        return path, f"must be <= {_num(ctx['le'])}, got {got}", f"set {path} to at most {_num(ctx['le'])}"
    if kind == "less_than":
        return path, f"must be < {_num(ctx['lt'])}, got {got}", f"set {path} to a value below {_num(ctx['lt'])}"
    if kind == "string_pattern_mismatch":
        what = "client id" if loc[-1] == "id" else "name"
        return path, f"invalid {what} {got!r}", "use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
    if kind == "literal_error":
        choices = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
        return path, f"unknown value {got!r}", f"use one of: {choices}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return path, f"expected a mapping, got {got!r}", f"write {path} as a block of key: value lines"
    if kind in ("list_type",):
        return path, f"expected a list, got {got!r}", f"write {path} as a list of - items"
    return path, err.get("msg", kind), f"check the value of {path}"


def _raise(problems: list[tuple[str, str, str]]) -> None:
    if problems:
        (f, p, x), rest = problems[0], problems[1:]
        raise ConfigError(f, p, x, rest)


def _prepare(raw: dict, problems: list) -> dict:
    """Shape-level normalisation the schema itself cannot express: platforms as a mapping, context defaults."""
    plats = raw.get("platforms")
    if plats is None and raw.get("clients"):
        problems.append(("platforms", "clients are listed but no platform is",
                         "add a platforms: list naming each platform the clients use"))
        raw.pop("platforms", None)
    if isinstance(plats, Mapping):  # allow {name: {...}} as well as a list
        plats = [dict(v or {}, name=k) for k, v in plats.items()]
    if isinstance(plats, list):
        if not plats:
            problems.append(("platforms", "expected a non-empty list",
                             "list at least one platform, e.g. - {name: local, clients: 4}"))
        if raw.get("clients"):
            # With explicit clients, a platform generates none unless it says how many.
            plats = [dict(p, clients=p.get("clients", 0)) if isinstance(p, Mapping) else p for p in plats]
        raw["platforms"] = plats
    elif "platforms" in raw and plats is None:
        raw.pop("platforms")
    if raw.get("clients") is None:
        raw.pop("clients", None)
    return raw


def _cross_checks(cfg: FederationConfig, problems: list) -> None:
    """Rules that relate fields to each other; every violation is collected, none stops the others."""
    if cfg.aggregation.shards > 1 and cfg.client_access == "presigned":
        problems.append(("aggregation.shards", "a sharded model is not yet handed to presigned clients",
                         "set aggregation.shards: 1, or client_access: store"))
    # Each strategy validates its own parameters (names, types, bounds), naming strategy.params.<field>.
    params, errors = strategies.check_params(cfg.strategy.name, cfg.strategy.params)
    problems.extend(errors)
    cfg.strategy.params = params
    cfg.privacy, errors = _privacy(cfg.privacy, cfg)
    problems.extend(errors)
    seen: set[str] = set()
    duplicates: set[int] = set()
    for i, p in enumerate(cfg.platforms):
        if p.name in seen:
            problems.append((f"platforms[{i}].name", f"duplicate platform {p.name!r}", "give every platform its own name"))
            duplicates.add(i)
        seen.add(p.name)
        if p.kind in ("openwhisk", "openfaas") and not p.endpoint:
            problems.append((f"platforms[{i}].endpoint", f"a {p.kind} platform needs its API endpoint",
                             "set endpoint to the " + ("OpenWhisk API host, e.g. https://ow.example.com"
                                                       if p.kind == "openwhisk" else "OpenFaaS gateway, e.g. http://gateway:8080")))
        for opt, lo, hi in (("speed", 0.01, 1.0), ("cold_start_s", 0.0, 600.0)):
            v = p.options.get(opt)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi
                                  or (opt == "speed" and v <= 0)):
                problems.append((f"platforms[{i}].options.{opt}", f"must be a number from {lo:g} to {hi:g}, got {v!r}",
                                 f"set options.{opt} between {lo:g} and {hi:g} (it emulates "
                                 + ("a slower device: 0.2 is five times slower)" if opt == "speed"
                                    else "a slower cold start, in seconds)")))
        for opt, what in (("tf_threads", "the TensorFlow threads one local worker process may use "
                                         "(default: its instance_concurrency)"),
                          ("tf_intra_threads", "the intra-op threads of one local worker process (default: "
                                               "tf_threads if set, else 1 for the nn model and one per "
                                               "invocation served at once for the cnn)")):
            threads = p.options.get(opt)
            if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                        or not 1 <= threads <= 256):
                problems.append((f"platforms[{i}].options.{opt}", f"must be a whole number from 1 to 256, got {threads!r}",
                                 f"set options.{opt} to {what}, or remove it"))
        preload = p.options.get("preload")
        if preload is not None and not isinstance(preload, bool):
            problems.append((f"platforms[{i}].options.preload", f"must be true or false, got {preload!r}",
                             "set options.preload to true (a local worker is forked from a process that has "
                             "imported TensorFlow once; the default for the nn model) or false (every worker "
                             "starts a fresh interpreter and imports it itself; the default for the cnn)"))
        if p.kind == "gcf" and not p.endpoint and not p.options.get("urls"):
            problems.append((f"platforms[{i}].endpoint", "a gcf platform needs its functions' base URL",
                             "set endpoint to https://REGION-PROJECT.cloudfunctions.net or list options.urls per function"))
    ids: set[str] = set()
    for i, c in enumerate(cfg.clients):
        if c.id in ids:
            problems.append((f"clients[{i}].id", f"duplicate client id {c.id!r}", "give every client its own id"))
        ids.add(c.id)
        if c.platform not in seen:
            problems.append((f"clients[{i}].platform", f"unknown platform {c.platform!r}",
                             f"use one of: {', '.join(sorted(seen))}"))
    # Platforms with a client count get generated ids, so a config needs no list of hundreds of clients.
    for i, p in enumerate(cfg.platforms):
        if i in duplicates:
            continue  # already reported; generating its clients again would only add a second, derived error
        for k in range(p.clients):
            cid = f"{p.name}-{k:03d}"
            if cid in ids:
                problems.append(("clients", f"client id {cid!r} is both listed and generated from platforms",
                                 f"rename the listed client or lower {p.name}'s clients count"))
                continue
            ids.add(cid)
            cfg.clients.append(ClientConfig.model_construct(id=cid, platform=p.name, data=""))
    for p in cfg.platforms:
        p.clients = sum(1 for c in cfg.clients if c.platform == p.name)
    if not cfg.clients:
        problems.append(("clients", "the federation has no clients", "set clients: N on a platform or list clients"))
    elif cfg.strategy.min_clients > len(cfg.clients):
        problems.append(("strategy.min_clients", f"{cfg.strategy.min_clients} exceeds the {len(cfg.clients)} clients",
                         f"set it to at most {len(cfg.clients)}"))
    if cfg.mode == "async" and cfg.client_access == "presigned":
        problems.append(("client_access", "mode: async cannot use presigned URLs (they are issued per round)",
                         "set client_access: store, or use mode: sync"))
    if cfg.mode == "async" and not strategies.REGISTRY[cfg.strategy.name].composes:
        problems.append(("mode", f"strategy {cfg.strategy.name} cannot fold staleness-weighted updates",
                         "use mode: sync with this strategy, or a strategy whose updates are averaged (fedavg)"))
    if cfg.mode == "async" and isinstance(cfg.privacy, PrivacyConfig):
        # Async versions have no round to mask, noise or account: refused rather than released un-noised.
        if cfg.privacy.secure_aggregation:
            problems.append(("privacy.secure_aggregation", "mode: async folds each update as it lands, but masks "
                             "cancel only in a round's sum", "use mode: sync with secure aggregation"))
        if cfg.privacy.dp.mode == "central":
            problems.append(("privacy.dp.mode", "mode: async does not add central DP noise to its model versions",
                             "use mode: sync for central DP, or privacy.dp.mode: local (each client noises its update)"))
        if cfg.privacy.dp.epsilon_budget > 0:
            problems.append(("privacy.dp.epsilon_budget", "mode: async has no rounds to account, so a budget "
                             "cannot be enforced", "use mode: sync, or remove epsilon_budget"))
    sel = cfg.selection
    if sel.deadline_floor_s > sel.deadline_cap_s:
        problems.append(("selection.deadline_floor_s", f"{sel.deadline_floor_s:g} is above deadline_cap_s "
                         f"{sel.deadline_cap_s:g}", "set deadline_floor_s at most deadline_cap_s"))
    for fld in ("control_platform", "evaluation_platform"):
        name = getattr(cfg, fld)
        if name and name not in seen:
            problems.append((fld, f"unknown platform {name!r}", f"use one of: {', '.join(sorted(seen))}"))


def from_dict(raw: Mapping[str, Any] | None) -> FederationConfig:
    """Validate a raw mapping (from YAML, JSON or CLI) into a FederationConfig; every problem is reported at once."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError("<file>", f"expected a mapping, got {type(raw).__name__}", "start the file with key: value lines")
    problems: list[tuple[str, str, str]] = []
    # A shallow copy suffices: _prepare rebuilds what it changes, validation builds new objects, and
    # platform options (free-form, possibly nested) are deep-copied by their own validator.
    raw = _prepare(dict(raw or {}), problems)
    try:
        cfg = FederationConfig.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_translate(e) for e in exc.errors(include_url=False))
        _raise(problems)
        raise  # unreachable: a ValidationError always carries at least one error
    _cross_checks(cfg, problems)
    _raise(problems)
    return cfg


def _privacy(raw: Any, cfg: FederationConfig) -> tuple[PrivacyConfig, list[tuple[str, str, str]]]:
    """The `privacy` section (DP and secure aggregation) and its problems, checked against the chosen strategy."""
    from fedkeeper.core.privacy import dp, settings

    if isinstance(raw, PrivacyConfig):
        raw = asdict(raw)
    out, errors = settings.parse(raw)
    if not errors and cfg.strategy.name in STRATEGIES:
        try:
            linear = dp.is_linear(strategies.create(cfg.strategy.name, None, cfg.strategy.params))
        except (KeyError, TypeError, ValueError):
            linear = True  # the strategy's own problems are reported by its params check
        errors = settings.check_strategy(out, cfg.strategy.name, linear)
    if not errors and out.secure_aggregation and cfg.client_access == "presigned":
        errors = [("privacy.secure_aggregation", "masked clients read the round's roster and their peers' keys from "
                   "the store, which presigned clients cannot", "set client_access: store, or turn secure aggregation off")]
    return out, errors


def from_stored(raw: Mapping[str, Any]) -> FederationConfig:
    """Re-validate a config read back from federation.json (clients already expanded)."""
    raw = dict(raw)
    plats = [dict(p, clients=0) for p in raw.get("platforms", [])]
    return from_dict(dict(raw, platforms=plats))


def json_schema() -> dict:
    """JSON Schema of a fedkeeper.yaml file, for editor completion and checks."""
    schema = FederationConfig.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "FedKeeper federation config (fedkeeper.yaml)"
    props = schema["properties"]
    # The file may also give platforms as a mapping of name -> settings.
    item = props["platforms"]["items"]
    props["platforms"] = {"description": props["platforms"].get("description", ""),
                          "anyOf": [{"type": "array", "items": item},
                                    {"type": "object", "additionalProperties": {"$ref": item["$ref"]}}]}
    schema["$defs"]["StrategyConfig"]["properties"]["name"]["enum"] = list(STRATEGIES)
    return schema


def check_cron(expr: str) -> str:
    """Check a cron expression (5 fields, or 6 with seconds last) and return it."""
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ConfigError("schedule", f"{expr!r} is not a cron expression",
                          "use five fields, e.g. '*/10 * * * *' for every ten minutes")
    try:
        from croniter import croniter
    except ImportError:  # the functions need no croniter; the CLI and deploy scripts have it
        return expr
    if not croniter.is_valid(expr):
        raise ConfigError("schedule", f"{expr!r} is not a valid cron expression",
                          "check each field's range, e.g. minutes 0-59, hours 0-23")
    return expr


def load_file(path: str) -> dict:
    """Read a YAML or JSON config file into a raw mapping (validation is from_dict's)."""
    import os

    import yaml  # only the CLI and deploy scripts read files; functions read federation.json

    if os.path.isdir(path):
        raise ConfigError("<file>", f"{path} is a folder, not a config file",
                          "pass the YAML or JSON file itself, e.g. --config fedkeeper.yaml (fedkeeper init writes one)")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError("<file>", f"{path} does not exist", "check the path, or write a starter with fedkeeper init") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("<file>", f"{path} cannot be read ({exc})", "pass a readable UTF-8 YAML or JSON file") from None
    try:
        data = yaml.safe_load(text) if not path.endswith(".json") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError("<file>", f"{path} is not valid YAML/JSON ({exc})", "fix the syntax at the position shown") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("<file>", f"{path} holds {type(data).__name__}, not a mapping", "start the file with key: value lines")
    return dict(data)


load = load_file


def resolve_events(mode: str, store_url: str) -> str:
    """'store' (the store's own object events) or 'client' (each client notifies after upload) for `auto`."""
    if mode != "auto":
        return mode
    # The GCS emulator sends no notifications and a deployed GCS bucket needs a trigger set up by deploy.
    return "client" if store_url.startswith("gs://") else "store"
