"""The store's key layout: every key FedKeeper reads or writes is built and parsed here."""

from __future__ import annotations

import re

FEDERATION = "federation.json"
STATE = "state.json"
TEST_DATA = "data/test.npz"
EVENTS_PREFIX = "rounds/"
HISTORY = "population/history.json"   # per-client timings, failures and participation, folded round by round
MEMBERS = "population/members.json"   # the federation's current client list (absent: the config's list)

_UPDATE = re.compile(r"^rounds/(\d{6})/updates/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.safetensors$")


def rnd(r: int) -> str:
    """Zero-padded round number, so listings sort in round order."""
    return f"{int(r):06d}"


def model(r: int) -> str:
    """Global model at the start of round r (models/000000 is the initial one)."""
    return f"models/{rnd(r)}.safetensors"


def model_index(r: int) -> str:
    """Index of a sharded global model at the start of round r (Hugging Face's sharded safetensors layout)."""
    return f"models/{rnd(r)}/model.safetensors.index.json"


def model_shard(r: int, i: int, m: int) -> str:
    """Shard i (from 0) of m of the sharded global model at the start of round r."""
    return f"models/{rnd(r)}/model-{i + 1:05d}-of-{m:05d}.safetensors"


def shard_plan(r: int, phase: int) -> str:
    """Which updates, tensors and shards a sharded aggregation of round r folds in a phase."""
    return f"rounds/{rnd(r)}/shards/plan-{phase}.json"


def shard_sum(r: int, phase: int, i: int) -> str:
    """Shard i's partial sums (and per-client squared distances) in a phase of round r."""
    return f"rounds/{rnd(r)}/shards/p{phase}-{i:05d}.safetensors"


def shard_claim(r: int, phase: int, i: int | str) -> str:
    """The create-only claim on folding shard i (or 'final': writing the model) in a phase of round r."""
    return f"rounds/{rnd(r)}/shard-claims/p{phase}-{i}.json"


def shard_group_plan(r: int, group: int) -> str:
    """Tree mode with shards: which updates of group g of round r are folded, validated from their headers."""
    return f"rounds/{rnd(r)}/shards/g{group:05d}-plan.json"


def shard_group_sum(r: int, group: int, i: int) -> str:
    """Tree mode with shards: shard i's partial sums (and per-client squared distances) over group g of round r."""
    return f"rounds/{rnd(r)}/shards/g{group:05d}-{i:05d}.safetensors"


def shard_group_claim(r: int, group: int, i: int | str) -> str:
    """The create-only claim on planning group g ('plan') or folding its shard i in round r."""
    step = i if isinstance(i, str) else f"{i:05d}"
    return f"rounds/{rnd(r)}/shard-claims/g{group:05d}-{step}.json"


def client_data(client: str) -> str:
    """A client's partition, the stand-in for data living on the device."""
    return f"data/{client}.npz"


def started(r: int) -> str:
    """Written once every selected client of round r was invoked; until then the opening call is at work or failed."""
    return f"rounds/{rnd(r)}/started.json"


def starting(r: int) -> str:
    """The last call that resumed round r's invocations, or one that failed at them: when, and whether it failed."""
    return f"rounds/{rnd(r)}/starting.json"


def round_prefix(r: int) -> str:
    """Folder of round r."""
    return f"rounds/{rnd(r)}/"


def manifest(r: int) -> str:
    """Who was selected for round r, its deadline and quorum."""
    return f"rounds/{rnd(r)}/manifest.json"


def updates_prefix(r: int) -> str:
    """Folder holding round r's client updates."""
    return f"rounds/{rnd(r)}/updates/"


def update(r: int, client: str) -> str:
    """One client's update for round r."""
    return f"{updates_prefix(r)}{client}.safetensors"


def claim(r: int) -> str:
    """The aggregator's create-only claim on round r."""
    return f"rounds/{rnd(r)}/claim.json"


def result(r: int) -> str:
    """Outcome of round r: included and rejected clients, metrics, timings."""
    return f"rounds/{rnd(r)}/result.json"


def aggregation_marker(r: int, invocation: str) -> str:
    """One marker per aggregator invocation that actually aggregated round r."""
    return f"rounds/{rnd(r)}/aggregations/{invocation}.json"


def evaluation(r: int) -> str:
    """Central test-set evaluation of the model produced by round r."""
    return f"rounds/{rnd(r)}/evaluation.json"


def invocations_prefix(r: int) -> str:
    """Folder of per-invocation failure records for round r."""
    return f"rounds/{rnd(r)}/failures/"


def failure(r: int, client: str) -> str:
    """Record of a client invocation that failed or timed out in round r."""
    return f"{invocations_prefix(r)}{client}.json"


def client_timings(r: int, client: str) -> str:
    """A client's post-upload timing record for round r (outside updates/, so it fires no aggregation)."""
    return f"rounds/{rnd(r)}/timings/{client}.json"


def running(r: int, client: str) -> str:
    """Marker a client writes when its invocation starts (attempt, start time): timeouts are found from it."""
    return f"rounds/{rnd(r)}/running/{client}.json"


def running_prefix(r: int) -> str:
    """Folder of round r's running markers."""
    return f"rounds/{rnd(r)}/running/"


def evaluation_request(r: int) -> str:
    """When the evaluation of round r's model was last requested, and how often (it is re-run when lost)."""
    return f"rounds/{rnd(r)}/evaluation_request.json"


def server_state(r: int) -> str:
    """A strategy's server state (momentum, moments, control variates) at the start of round r."""
    return f"state/{rnd(r)}.safetensors"


def partials_prefix(r: int) -> str:
    """Folder of round r's group partial sums (tree mode)."""
    return f"rounds/{rnd(r)}/partials/"


def partial(r: int, group: int, level: int = 1) -> str:
    """The partial sum of group g at tree level l (1: clients' updates; 2+: partials below) for round r."""
    return f"{partials_prefix(r)}L{level}-{group:05d}.safetensors"


def partial_claim(r: int, group: int, level: int = 1) -> str:
    """The create-only claim on folding group g at tree level l of round r."""
    return f"rounds/{rnd(r)}/partial-claims/L{level}-{group:05d}.json"


def control_variate(client: str) -> str:
    """A client's own SCAFFOLD control variate (written and read by that client only)."""
    return f"clients/{client}/control.safetensors"


def dispatch(v: int, client: str) -> str:
    """Async mode: created once when a client is invoked to train from model version v (exactly one invocation)."""
    return f"rounds/{rnd(v)}/dispatch/{client}.json"


def buffer_prefix(b: int) -> str:
    """Async mode: folder of buffer b's slots; buffer b folds into model version b+1 (it is round b's result)."""
    return f"rounds/{rnd(b)}/buffer/"


def buffer_slot(b: int, i: int) -> str:
    """Async mode: slot i of buffer b, created once, naming the update it holds."""
    return f"{buffer_prefix(b)}{i:06d}.json"


def assigned(v: int, client: str) -> str:
    """Async mode: the buffer a client's update from version v was placed in (duplicate events find it)."""
    return f"rounds/{rnd(v)}/assigned/{client}.json"


WAITING_PREFIX = "async/waiting/"
ASYNC_STARTED = "async/started.json"


def waiting(client: str) -> str:
    """Async mode: a client that delivered on the newest version waits here for the next one."""
    return f"{WAITING_PREFIX}{client}.json"


def late(r: int, client: str) -> str:
    """Record of an update that arrived after round r closed."""
    return f"rounds/{rnd(r)}/late/{client}.json"


# -- secure aggregation ------------------------------------------------------------------------------------
SECAGG_FEDERATION = "secagg/federation.json"  # the federation's random id, which binds every key derivation


def secagg_public(client: str) -> str:
    """A client's registered long-term X25519 public key (written at setup or when it joins)."""
    return f"secagg/public/{client}.json"


def secagg_advertise_prefix(r: int) -> str:
    """Folder of round r's advertise records (mask public keys and sealed share boxes)."""
    return f"rounds/{rnd(r)}/secagg/advertise/"


def secagg_advertise(r: int, client: str) -> str:
    """One client's advertise record for round r."""
    return f"{secagg_advertise_prefix(r)}{client}.json"


def secagg_roster(r: int) -> str:
    """The clients whose advertise records made it in time: they mask with each other (create-only)."""
    return f"rounds/{rnd(r)}/secagg/roster.json"


def secagg_request(r: int) -> str:
    """The unmask request: which roster clients survived and which dropped (create-only)."""
    return f"rounds/{rnd(r)}/secagg/unmask_request.json"


def secagg_answer_prefix(r: int) -> str:
    """Folder of round r's unmask answers."""
    return f"rounds/{rnd(r)}/secagg/unmask/"


def secagg_answer(r: int, client: str) -> str:
    """One survivor's unmask answer (the shares it reveals)."""
    return f"{secagg_answer_prefix(r)}{client}.json"


def secagg_unmask_failure_prefix(r: int) -> str:
    """Folder of round r's failed unmask invocations (one record per survivor, rewritten per attempt)."""
    return f"rounds/{rnd(r)}/secagg/unmask_failures/"


def secagg_unmask_failure(r: int, client: str) -> str:
    """A survivor's failed unmask invocation: attempt, reason, and whether it is final."""
    return f"{secagg_unmask_failure_prefix(r)}{client}.json"


def secagg_unmask_running_prefix(r: int) -> str:
    """Folder of round r's unmask running markers."""
    return f"rounds/{rnd(r)}/secagg/unmask_running/"


def secagg_unmask_running(r: int, client: str) -> str:
    """Marker an unmask invocation writes when it starts, so the tick can time it out."""
    return f"{secagg_unmask_running_prefix(r)}{client}.json"


def secagg_unmask_resumed(r: int) -> str:
    """When a resume last invoked round r's missing unmask answers again: their wait restarts from then."""
    return f"rounds/{rnd(r)}/secagg/unmask_resumed.json"


def dp_noise_seed(r: int) -> str:
    """Central DP: round r's noise seed, drawn once by the first aggregator and written create-only."""
    return f"rounds/{rnd(r)}/private/dp_noise_seed.json"


def record_client(key: str, suffix: str = ".json") -> str:
    """The client id a per-client record key ends in (ids may hold dots)."""
    name = key.rsplit("/", 1)[-1]
    return name[: -len(suffix)] if name.endswith(suffix) else name


def parse_update(key: str) -> tuple[int, str] | None:
    """(round, client) if key is an update key, else None."""
    m = _UPDATE.match(key)
    if not m:
        return None
    return int(m.group(1)), m.group(2)
