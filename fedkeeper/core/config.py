"""One validated config schema for the CLI, the functions and the deploy scripts."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from fedkeeper.core import strategy as strategies
from fedkeeper.core.privacy.settings import PrivacyConfig

PLATFORM_KINDS = ("local", "openwhisk", "openfaas", "gcf", "lambda")
MODELS = ("nn", "cnn")
OPTIMIZERS = ("adam", "sgd")
EVENT_MODES = ("auto", "store", "client")  # who tells the aggregator an update landed
STRATEGIES = strategies.names()
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and how to fix it."""

    def __init__(self, field_path: str, problem: str, fix: str) -> None:
        self.field = field_path
        self.problem = problem
        self.fix = fix
        super().__init__(f"config field '{field_path}': {problem}. Fix: {fix}")


@dataclass
class ModelConfig:
    """Which network, and how each client trains it."""

    name: str = "nn"
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    batch_size: int = 10
    epochs: int = 2
    jit_compile: bool = True
    steps_per_execution: int = 32


@dataclass
class DataConfig:
    """Which dataset and how it is split across clients."""

    dataset: str = "digits"
    partition: str = "iid"
    test_fraction: float = 0.2
    holdout_fraction: float = 0.1


@dataclass
class StrategyConfig:
    """How clients are sampled and updates combined and checked."""

    name: str = "fedavg"
    params: dict = field(default_factory=dict)
    fraction: float = 1.0
    min_clients: int = 1
    quorum: float = 0.5
    deadline_s: float = 600.0
    max_update_mb: float = 256.0
    norm_multiple: float = 4.0
    max_examples: int = 100_000
    retries: int = 0
    lease_s: float = 120.0


@dataclass
class PlatformConfig:
    """One FaaS platform that runs clients: what kind, how many clients, its limits and endpoint."""

    name: str
    kind: str = "local"
    clients: int = 1
    concurrency: int = 2
    timeout_s: float = 300.0
    memory_mb: int = 2048
    endpoint: str = ""
    auth_env: str = ""
    options: dict = field(default_factory=dict)


@dataclass
class ClientConfig:
    """One data owner: its id, the platform its function runs on, and optionally its own data URI."""

    id: str
    platform: str
    data: str = ""


@dataclass
class FederationConfig:
    """The whole federation: written to federation.json at setup and read by every function."""

    name: str = "fedkeeper"
    seed: int = 0
    rounds: int = 5
    store: str = "./fedkeeper-data"
    schedule: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    platforms: list[PlatformConfig] = field(default_factory=list)
    clients: list[ClientConfig] = field(default_factory=list)
    evaluation_platform: str = ""
    events: str = "auto"
    client_access: str = "store"
    control_platform: str = ""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of this config."""
        return asdict(self)

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


def _check_keys(section: str, raw: Mapping, allowed: set[str]) -> None:
    for key in raw:
        if key not in allowed:
            where = f"{section}.{key}" if section else str(key)
            raise ConfigError(where, "unknown field", f"remove it or use one of: {', '.join(sorted(allowed))}")


def _num(path: str, value: Any, kind: type, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise ConfigError(path, f"expected {'an integer' if kind is int else 'a number'}, got {value!r}",
                          f"set {path} to a {'whole ' if kind is int else ''}number")
    value = kind(value)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(path, f"must be {'>' if lo_open else '>='} {lo}, got {value}", f"set {path} to at least {lo}")
    if hi is not None and value > hi:
        raise ConfigError(path, f"must be <= {hi}, got {value}", f"set {path} to at most {hi}")
    return value


def _choice(path: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(path, f"unknown value {value!r}", f"use one of: {', '.join(choices)}")
    return value


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected true or false, got {value!r}", f"set {path} to true or false (unquoted)")
    return value


def _str(path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected text, got {value!r}", f"quote the value of {path}")
    return value


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


def _section(raw: Mapping, name: str) -> Mapping:
    sec = raw.get(name, {}) or {}
    if not isinstance(sec, Mapping):
        raise ConfigError(name, f"expected a mapping, got {sec!r}", f"write {name}: as a block of key: value lines")
    return sec


def from_dict(raw: Mapping[str, Any] | None) -> FederationConfig:
    """Validate a raw mapping (from YAML, JSON or CLI) into a FederationConfig."""
    raw = copy.deepcopy(dict(raw or {}))
    top = {f for f in FederationConfig.__dataclass_fields__}
    _check_keys("", raw, top)
    cfg = FederationConfig()
    cfg.name = _str("name", raw.get("name", cfg.name))
    cfg.seed = _num("seed", raw.get("seed", cfg.seed), int, 0)
    cfg.rounds = _num("rounds", raw.get("rounds", cfg.rounds), int, 1, 100000)
    cfg.store = _str("store", raw.get("store", cfg.store))
    cfg.schedule = _str("schedule", raw.get("schedule", cfg.schedule) or "")
    if cfg.schedule:
        check_cron(cfg.schedule)
    cfg.evaluation_platform = _str("evaluation_platform", raw.get("evaluation_platform", "") or "")
    cfg.events = _choice("events", raw.get("events", "auto"), EVENT_MODES)
    cfg.client_access = _choice("client_access", raw.get("client_access", "store"), ("store", "presigned"))

    m = _section(raw, "model")
    _check_keys("model", m, set(ModelConfig.__dataclass_fields__))
    cfg.model = ModelConfig(
        name=_choice("model.name", m.get("name", "nn"), MODELS),
        optimizer=_choice("model.optimizer", m.get("optimizer", "adam"), OPTIMIZERS),
        learning_rate=_num("model.learning_rate", m.get("learning_rate", 1e-3), float, 0, 10, lo_open=True),
        batch_size=_num("model.batch_size", m.get("batch_size", 10), int, 1, 1 << 20),
        epochs=_num("model.epochs", m.get("epochs", 2), int, 0, 10000),
        jit_compile=_bool("model.jit_compile", m.get("jit_compile", True)),
        steps_per_execution=_num("model.steps_per_execution", m.get("steps_per_execution", 32), int, 1, 100000),
    )
    d = _section(raw, "data")
    _check_keys("data", d, set(DataConfig.__dataclass_fields__))
    cfg.data = DataConfig(
        dataset=validate_dataset("data.dataset", d.get("dataset", "digits")),
        partition=validate_partition("data.partition", d.get("partition", "iid")),
        test_fraction=_num("data.test_fraction", d.get("test_fraction", 0.2), float, 0, 0.9, lo_open=True),
        holdout_fraction=_num("data.holdout_fraction", d.get("holdout_fraction", 0.1), float, 0, 0.9),
    )
    s = _section(raw, "strategy")
    _check_keys("strategy", s, set(StrategyConfig.__dataclass_fields__))
    sname = _choice("strategy.name", s.get("name", "fedavg"), strategies.names())
    params, errors = strategies.check_params(sname, s.get("params", {}) or {})
    if errors:
        raise ConfigError(*errors[0])
    cfg.strategy = StrategyConfig(
        name=sname,
        params=params,
        fraction=_num("strategy.fraction", s.get("fraction", 1.0), float, 0, 1, lo_open=True),
        min_clients=_num("strategy.min_clients", s.get("min_clients", 1), int, 1),
        quorum=_num("strategy.quorum", s.get("quorum", 0.5), float, 0, 1, lo_open=True),
        deadline_s=_num("strategy.deadline_s", s.get("deadline_s", 600.0), float, 0, lo_open=True),
        max_update_mb=_num("strategy.max_update_mb", s.get("max_update_mb", 256.0), float, 0, lo_open=True),
        norm_multiple=_num("strategy.norm_multiple", s.get("norm_multiple", 4.0), float, 0),
        max_examples=_num("strategy.max_examples", s.get("max_examples", 100_000), int, 1),
        retries=_num("strategy.retries", s.get("retries", 0), int, 0, 100),
        lease_s=_num("strategy.lease_s", s.get("lease_s", 120.0), float, 0, lo_open=True),
    )

    plats = raw.get("platforms", DEFAULT_PLATFORMS if not raw.get("clients") else None)
    if plats is None:
        raise ConfigError("platforms", "clients are listed but no platform is",
                          "add a platforms: list naming each platform the clients use")
    if isinstance(plats, Mapping):  # allow {name: {...}} as well as a list
        plats = [dict(v or {}, name=k) for k, v in plats.items()]
    if not isinstance(plats, list) or not plats:
        raise ConfigError("platforms", "expected a non-empty list", "list at least one platform, e.g. - {name: local, clients: 4}")
    seen: set[str] = set()
    for i, p in enumerate(plats):
        path = f"platforms[{i}]"
        if not isinstance(p, Mapping):
            raise ConfigError(path, f"expected a mapping, got {p!r}", "write each platform as name: ..., kind: ..., clients: ...")
        _check_keys(path, p, set(PlatformConfig.__dataclass_fields__))
        name = _str(f"{path}.name", p.get("name", ""))
        if not _CLIENT_ID.match(name):
            raise ConfigError(f"{path}.name", f"invalid name {name!r}", "use letters, digits, '-', '_' or '.'")
        if name in seen:
            raise ConfigError(f"{path}.name", f"duplicate platform {name!r}", "give every platform its own name")
        seen.add(name)
        opts = p.get("options", {}) or {}
        if not isinstance(opts, Mapping):
            raise ConfigError(f"{path}.options", "expected a mapping", "write options as key: value lines")
        kind = p.get("kind", "local")
        if kind in ("openwhisk", "openfaas") and not p.get("endpoint"):
            raise ConfigError(f"{path}.endpoint", f"a {kind} platform needs its API endpoint",
                              "set endpoint to the " + ("OpenWhisk API host, e.g. https://ow.example.com" if kind == "openwhisk"
                                                        else "OpenFaaS gateway, e.g. http://gateway:8080"))
        if kind == "gcf" and not p.get("endpoint") and not (opts.get("urls") if isinstance(opts, Mapping) else None):
            raise ConfigError(f"{path}.endpoint", "a gcf platform needs its functions' base URL",
                              "set endpoint to https://REGION-PROJECT.cloudfunctions.net or list options.urls per function")
        cfg.platforms.append(PlatformConfig(
            name=name,
            kind=_choice(f"{path}.kind", p.get("kind", "local"), PLATFORM_KINDS),
            clients=_num(f"{path}.clients", p.get("clients", 0 if raw.get("clients") else 1), int, 0, 1_000_000),
            concurrency=_num(f"{path}.concurrency", p.get("concurrency", 2), int, 1, 10000),
            timeout_s=_num(f"{path}.timeout_s", p.get("timeout_s", 300.0), float, 0, lo_open=True),
            memory_mb=_num(f"{path}.memory_mb", p.get("memory_mb", 2048), int, 64),
            endpoint=_str(f"{path}.endpoint", p.get("endpoint", "") or ""),
            auth_env=_str(f"{path}.auth_env", p.get("auth_env", "") or ""),
            options=dict(opts),
        ))

    clients = raw.get("clients") or []
    if not isinstance(clients, list):
        raise ConfigError("clients", "expected a list", "list clients as - {id: c1, platform: NAME}")
    ids: set[str] = set()
    for i, c in enumerate(clients):
        path = f"clients[{i}]"
        if not isinstance(c, Mapping):
            raise ConfigError(path, f"expected a mapping, got {c!r}", "write each client as - {id: ..., platform: ...}")
        _check_keys(path, c, set(ClientConfig.__dataclass_fields__))
        cid = _str(f"{path}.id", c.get("id", ""))
        if not _CLIENT_ID.match(cid):
            raise ConfigError(f"{path}.id", f"invalid client id {cid!r}", "use 1-64 letters, digits, '-', '_' or '.'")
        if cid in ids:
            raise ConfigError(f"{path}.id", f"duplicate client id {cid!r}", "give every client its own id")
        ids.add(cid)
        plat = _str(f"{path}.platform", c.get("platform", ""))
        if plat not in seen:
            raise ConfigError(f"{path}.platform", f"unknown platform {plat!r}", f"use one of: {', '.join(sorted(seen))}")
        cfg.clients.append(ClientConfig(id=cid, platform=plat, data=_str(f"{path}.data", c.get("data", "") or "")))
    # Platforms with a client count get generated ids, so a config needs no list of hundreds of clients.
    for p in cfg.platforms:
        for k in range(p.clients):
            cid = f"{p.name}-{k:03d}"
            if cid in ids:
                raise ConfigError("clients", f"client id {cid!r} is both listed and generated from platforms",
                                  f"rename the listed client or lower {p.name}'s clients count")
            ids.add(cid)
            cfg.clients.append(ClientConfig(id=cid, platform=p.name))
        p.clients = sum(1 for c in cfg.clients if c.platform == p.name)
    if not cfg.clients:
        raise ConfigError("clients", "the federation has no clients", "set clients: N on a platform or list clients")
    if cfg.strategy.min_clients > len(cfg.clients):
        raise ConfigError("strategy.min_clients", f"{cfg.strategy.min_clients} exceeds the {len(cfg.clients)} clients",
                          f"set it to at most {len(cfg.clients)}")
    cfg.privacy = _privacy(raw.get("privacy"), cfg)
    cfg.control_platform = _str("control_platform", raw.get("control_platform", "") or "")
    if cfg.control_platform and cfg.control_platform not in seen:
        raise ConfigError("control_platform", f"unknown platform {cfg.control_platform!r}",
                          f"use one of: {', '.join(sorted(seen))}")
    if cfg.evaluation_platform and cfg.evaluation_platform not in seen:
        raise ConfigError("evaluation_platform", f"unknown platform {cfg.evaluation_platform!r}",
                          f"use one of: {', '.join(sorted(seen))}")
    return cfg


def _privacy(raw: Any, cfg: FederationConfig) -> PrivacyConfig:
    """The `privacy` section (DP and secure aggregation), checked against the chosen strategy."""
    from fedkeeper.core.privacy import dp, settings

    out, errors = settings.parse(raw)
    if not errors:
        errors = settings.check_strategy(out, cfg.strategy.name, dp.is_linear(strategies.create(
            cfg.strategy.name, None, cfg.strategy.params)))
    if not errors and out.secure_aggregation and cfg.client_access == "presigned":
        errors = [("privacy.secure_aggregation", "masked clients read the round's roster and their peers' keys from "
                   "the store, which presigned clients cannot", "set client_access: store, or turn secure aggregation off")]
    if errors:
        raise ConfigError(*errors[0])
    return out


def from_stored(raw: Mapping[str, Any]) -> FederationConfig:
    """Re-validate a config read back from federation.json (clients already expanded)."""
    raw = dict(raw)
    plats = [dict(p, clients=0) for p in raw.get("platforms", [])]
    return from_dict(dict(raw, platforms=plats))


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
    import yaml  # only the CLI and deploy scripts read files; functions read federation.json

    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = yaml.safe_load(text) if not path.endswith(".json") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError("<file>", f"{path} is not valid YAML/JSON ({exc})", "fix the syntax at the position shown") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("<file>", f"{path} holds {type(data).__name__}, not a mapping", "start the file with key: value lines")
    return dict(data)


def resolve_events(mode: str, store_url: str) -> str:
    """'store' (the store's own object events) or 'client' (each client notifies after upload) for `auto`."""
    if mode != "auto":
        return mode
    # The GCS emulator sends no notifications and a deployed GCS bucket needs a trigger set up by deploy.
    return "client" if store_url.startswith("gs://") else "store"
