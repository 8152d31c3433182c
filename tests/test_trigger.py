"""The trigger: deterministic selection, create-only manifest, one start per round, clear refusals."""

import pytest

from fedkeeper.core import config, keys
from fedkeeper.functions import trigger
from fedkeeper.functions.context import Context, HandlerError, NullInvoker
from fedkeeper.store.local import LocalStore


def test_starts_round_and_invokes_each_selected_client(federation):
    inv = NullInvoker()
    out = trigger.handle({}, Context(store=federation.store, invoker=inv))
    assert out["status"] == "started" and out["round"] == 0 and out["selected"] == federation.ids
    assert [(f, p["client"], plat) for f, p, plat in inv.calls] == [("client", c, "p") for c in federation.ids]
    m = federation.store.get_json(keys.manifest(0))
    assert m["quorum"] == 2 and m["model"] == keys.model(0)
    assert federation.store.get_json(keys.STATE)["status"] == "open"


def test_duplicate_trigger_does_not_start_twice(federation):
    inv = NullInvoker()
    trigger.handle({"round": 0}, Context(store=federation.store, invoker=inv))
    again = trigger.handle({"round": 0}, Context(store=federation.store, invoker=inv))
    assert again == {"status": "exists", "round": 0}
    assert len(inv.calls) == 4
    busy = trigger.handle({}, Context(store=federation.store, invoker=inv))
    assert busy["status"] == "busy" and busy["round"] == 0 and not busy["overdue"]


class _Reentrant:
    """An invoker whose second invocation lets another call arrive first, as a duplicate trigger event or a tick
    does while the opening call is still invoking a thousand clients."""

    def __init__(self, second):
        self.calls, self.second, self.seconds = [], second, []

    def invoke(self, function, payload, platform=None):
        self.calls.append((function, payload.get("client"), payload.get("attempt")))
        if function == "client" and len(self.calls) == 2:
            self.seconds.append(self.second())


@pytest.mark.parametrize("second", ["duplicate trigger event", "next call without a round", "tick"])
def test_a_call_arriving_while_the_round_is_being_opened_invokes_nobody(federation, second):
    # Prepare
    clock = [1000.0]
    calls = {"duplicate trigger event": lambda ctx: trigger.handle({"round": 0}, ctx),
             "next call without a round": lambda ctx: trigger.handle({}, ctx),
             "tick": lambda ctx: trigger.tick({}, ctx)}[second]
    other = NullInvoker()
    inv = _Reentrant(lambda: calls(Context(store=federation.store, invoker=other, now=lambda: clock[0])))
    # Execute
    out = trigger.handle({"round": 0}, Context(store=federation.store, invoker=inv, now=lambda: clock[0]))
    # Assert: each client was invoked once, by the opening call, and the second call said why it did nothing
    assert out["status"] == "started"
    assert sorted(c for f, c, _ in inv.calls if f == "client") == sorted(federation.ids)
    assert [c for c in other.calls if c[0] == "client"] == []
    assert inv.seconds[0]["status"] in ("exists", "busy")


def test_a_round_whose_opening_call_went_silent_is_finished_after_the_start_lease(federation):
    # Prepare: the opening call wrote the manifest and died before invoking anyone (killed, no failure record)
    from fedkeeper.functions import protocol

    clock = [1000.0]

    class Dies(NullInvoker):
        def invoke(self, function, payload, platform=None):
            raise SystemExit("killed")

    ctx = Context(store=federation.store, invoker=Dies(), now=lambda: clock[0])
    with pytest.raises(SystemExit):
        trigger.handle({"round": 0}, ctx)
    federation.store.delete(keys.starting(0))  # a killed process writes nothing: only the lease is left
    inv = NullInvoker()
    later = Context(store=federation.store, invoker=inv, now=lambda: clock[0])
    # Execute
    within, invoked_within = trigger.handle({}, later), list(inv.calls)
    clock[0] += protocol.start_lease_s(len(federation.ids)) + 1
    after = trigger.handle({}, later)
    # Assert
    assert within["status"] == "busy" and invoked_within == []
    assert after["status"] == "resumed" and sorted(after["reinvoked"]) == sorted(federation.ids)
    assert trigger.handle({}, later)["status"] == "busy"  # started now: nobody is invoked a third time


def test_the_tick_finishes_a_round_whose_opening_call_died_once_its_lease_is_over(federation):
    # Prepare: the opening call died after the manifest, before invoking anyone
    from fedkeeper.functions import protocol

    clock = [1000.0]

    class Dies(NullInvoker):
        def invoke(self, function, payload, platform=None):
            raise SystemExit("killed")

    with pytest.raises(SystemExit):
        trigger.handle({"round": 0}, Context(store=federation.store, invoker=Dies(), now=lambda: clock[0]))
    federation.store.delete(keys.starting(0))
    inv = NullInvoker()
    ctx = Context(store=federation.store, invoker=inv, now=lambda: clock[0])
    # Execute
    early = trigger.tick({}, ctx)
    clock[0] += protocol.start_lease_s(len(federation.ids)) + 1
    late = trigger.tick({}, ctx)
    # Assert
    assert early["status"] == "busy"
    assert late["status"] == "resumed" and sorted(p["client"] for f, p, _ in inv.calls) == sorted(federation.ids)
    assert trigger.tick({}, ctx)["status"] == "busy"


def test_a_failed_opening_call_is_finished_at_once_by_the_next_call(federation):
    # Prepare
    clock = [1000.0]

    class Fails(NullInvoker):
        def invoke(self, function, payload, platform=None):
            if len(self.calls) == 1:
                raise RuntimeError("platform answered 500")
            super().invoke(function, payload, platform)

    with pytest.raises(RuntimeError):
        trigger.handle({"round": 0}, Context(store=federation.store, invoker=Fails(), now=lambda: clock[0]))
    inv = NullInvoker()
    # Execute: a duplicate of the same trigger event, well within the lease
    out = trigger.handle({"round": 0}, Context(store=federation.store, invoker=inv, now=lambda: clock[0]))
    # Assert: every client without an update is invoked again, the one reached before included (harmless)
    assert out["status"] == "resumed"
    assert sorted(p["client"] for f, p, _ in inv.calls) == sorted(federation.ids)
    assert federation.store.exists(keys.started(0))


def test_resume_reinvokes_only_missing_clients(federation):
    from tests.conftest import make_weights, update_bytes

    trigger.handle({"round": 0}, Context(store=federation.store, invoker=NullInvoker()))
    federation.store.put(keys.update(0, federation.ids[0]), update_bytes(0, federation.ids[0], make_weights(1), 3))
    inv = NullInvoker()
    out = trigger.handle({"round": 0, "reinvoke": True}, Context(store=federation.store, invoker=inv))
    assert out["reinvoked"] == federation.ids[1:]


def test_selection_is_seeded_and_respects_fraction_and_min_clients():
    cfg = config.from_dict({"seed": 3, "strategy": {"fraction": 0.3, "min_clients": 2},
                            "platforms": [{"name": "a", "clients": 10}]})
    first = trigger.select_clients(cfg, 1)
    assert len(first) == 3 and first == trigger.select_clients(cfg, 1)
    others = [[c["id"] for c in trigger.select_clients(cfg, r)] for r in range(2, 8)]
    assert any(o != [c["id"] for c in first] for o in others)  # rounds draw different samples
    cfg.strategy.fraction = 0.01
    assert len(trigger.select_clients(cfg, 1)) == 2


def test_refuses_missing_federation_and_missing_model(tmp_path, federation):
    with pytest.raises(HandlerError, match="fedkeeper setup"):
        trigger.handle({}, Context(store=LocalStore(tmp_path / "empty")))
    with pytest.raises(HandlerError, match="missing"):
        trigger.handle({"round": 2}, Context(store=federation.store))
    with pytest.raises(HandlerError):
        trigger.handle({"round": "x"}, Context(store=federation.store))
    assert trigger.handle({"round": 3}, Context(store=federation.store))["status"] == "finished"


def test_tick_starts_a_round_then_waits_then_closes_an_overdue_one(federation):
    inv = NullInvoker()
    clock = [1000.0]
    ctx = Context(store=federation.store, invoker=inv, now=lambda: clock[0])
    assert trigger.tick({}, ctx)["status"] == "started"
    busy = trigger.tick({}, ctx)
    assert busy["status"] == "busy" and busy["deadline_in_s"] == pytest.approx(600.0)
    clock[0] += 601
    assert trigger.tick({}, ctx) == {"status": "closing", "round": 0, "timed_out": []}
    assert inv.calls[-1][0] == "aggregator" and inv.calls[-1][1]["round"] == 0


def test_scheduled_federation_does_not_chain_rounds(tmp_path):
    from fedkeeper.core import blob
    from fedkeeper.functions import aggregator
    from tests.conftest import Federation

    fed = Federation(tmp_path / "s")
    raw = fed.store.get_json(keys.FEDERATION)
    fed.store.put_json(keys.FEDERATION, dict(raw, schedule="*/5 * * * *"))
    fed.open_round(0)
    fed.submit_all(0)
    inv = NullInvoker()
    aggregator.handle({"round": 0}, Context(store=fed.store, invoker=inv))
    assert [f for f, _, _ in inv.calls] == ["client"]  # the evaluation only; the cron starts round 1
    assert blob.decode(fed.store.get(keys.model(1))).meta["round"] == 1


def test_resume_gives_presigned_clients_their_urls_again(tmp_path):
    """Re-invoked clients go through the same payload as the first invocation, URLs included."""
    from fedkeeper.store.local import LocalStore
    from tests.conftest import Federation

    class SigningStore(LocalStore):
        def presign(self, key, method, expires_s, max_bytes=None):
            return f"https://signed.example/{method}/{key}"

    fed = Federation(tmp_path / "s")
    store = SigningStore(fed.store.root)
    raw = store.get_json(keys.FEDERATION)
    store.put_json(keys.FEDERATION, dict(raw, client_access="presigned"))
    store.put_json("data/meta.json", {"num_classes": 3})
    first = NullInvoker()
    trigger.handle({"round": 0}, Context(store=store, invoker=first))
    again = NullInvoker()
    trigger.handle({"round": 0, "reinvoke": True}, Context(store=store, invoker=again))
    assert [p["access"]["update"] for _, p, _ in again.calls] == [p["access"]["update"] for _, p, _ in first.calls]
    assert again.calls[0][1]["spec"]["num_classes"] == 3
