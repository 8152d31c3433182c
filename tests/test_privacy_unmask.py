"""Secure aggregation's unmask phase through the round protocol: failure records, retries, the tick, resume."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pytest

pytest.importorskip("cryptography")

from fedkeeper.core import blob, keys  # noqa: E402
from fedkeeper.core.aggregate import fedavg  # noqa: E402
from fedkeeper.core.config import from_dict  # noqa: E402
from fedkeeper.functions import aggregator, client, protocol, trigger  # noqa: E402
from fedkeeper.functions import secagg as phases  # noqa: E402
from fedkeeper.functions.context import AGGREGATOR, CLIENT, Context, NullInvoker  # noqa: E402
from fedkeeper.platforms import common  # noqa: E402
from tests.conftest import Federation  # noqa: E402
from tests.test_privacy_secagg import _masked_federation, _trained  # noqa: E402
from tests.test_protocol import entry  # noqa: E402

# Long enough that no test can pass by waiting the phase out: every round below ends on its records.
PHASE_S = 3600


def _federation(tmp_path, monkeypatch, retries: int, n: int = 6) -> Federation:
    fed = _masked_federation(tmp_path, monkeypatch, n=n, phase_s=PHASE_S)
    raw = fed.cfg.to_dict()
    raw["platforms"] = [dict(p, clients=0) for p in raw["platforms"]]
    raw["strategy"]["retries"] = retries
    raw["strategy"]["deadline_s"] = 4 * PHASE_S
    fed.cfg = from_dict(raw)
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    return fed


class Clock:
    """A settable clock for the contexts, so phase deadlines are passed without waiting."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


# What happens to one unmask invocation: "run" it, "fail" it (the platform reports the failure to the
# aggregator, as the local runtime does), "fail-lambda" (the report is a Lambda on-failure destination record
# delivered to the deployed Lambda aggregator entry), or "lose" it (the process died unseen).
UnmaskFate = Callable[[dict], str]


def _drive(fed: Federation, r: int, trained: dict, drop: set[str], unmask_fate: UnmaskFate,
           clock: Clock | None = None, inv: NullInvoker | None = None) -> tuple[NullInvoker, Context]:
    """Run round r's invocations in order until none is left; train failures of `drop` are reported."""
    inv = inv if inv is not None else NullInvoker()
    ctx = Context(store=fed.store, invoker=inv, now=clock or Clock())
    trigger.handle({"round": r}, ctx)
    run_calls(fed, r, trained, drop, unmask_fate, inv, ctx, 0)
    return inv, ctx


def run_calls(fed: Federation, r: int, trained: dict, drop: set[str], unmask_fate: UnmaskFate, inv: NullInvoker,
              ctx: Context, done: int) -> int:
    """Work through inv.calls from index `done`; returns the index after the last call handled."""
    while done < len(inv.calls):
        fn, payload, _ = inv.calls[done]
        done += 1
        if fn == AGGREGATOR:
            aggregator.handle(payload, ctx)
        elif fn == CLIENT and payload.get("mode") == "advertise":
            client.handle(payload, ctx)
        elif fn == CLIENT and payload.get("mode") == "unmask":
            fate = unmask_fate(payload)
            if fate == "run":
                try:
                    client.handle(payload, ctx)
                except Exception as exc:  # noqa: BLE001 - the platform reports it too, as a local runtime does
                    aggregator.handle({"failure": {"payload": payload, "reason": str(exc)}}, ctx)
            elif fate == "fail":
                aggregator.handle({"failure": {"payload": payload, "reason": "worker lost"}}, ctx)
            elif fate == "fail-lambda":  # Lambda's on-failure destination record, to the deployed aggregator entry
                record = {"version": "1.0", "requestContext": {"condition": "RetriesExhausted"},
                          "requestPayload": payload, "responsePayload": {"errorMessage": "worker lost"}}
                entry("aggregator", "lambda_function.py").handler(record, None)
        elif fn == CLIENT and payload.get("mode") == "train":
            cid = payload["client"]
            if cid in drop:
                protocol.client_failed(ctx, r, cid, "worker lost", payload.get("attempt", 1))
                continue
            m = protocol.read_manifest(fed.store, r)
            w, n = trained[cid]
            meta = {"kind": "update", "round": r, "client": cid, "num_examples": n, "metrics": {}, "timings": {}}
            fed.store.put(keys.update(r, cid), phases.masker(ctx, fed.cfg, m, cid, fed.global_weights)(w, meta))
            aggregator.handle({"key": keys.update(r, cid)}, ctx)
    return done


def _unmask_calls(inv: NullInvoker, start: int = 0) -> list[dict]:
    return [p for fn, p, _ in inv.calls[start:] if fn == CLIENT and p.get("mode") == "unmask"]


def _assert_model_is_fedavg(fed: Federation, trained: dict, survivors: list[str]) -> None:
    res = fed.store.get_json(keys.result(0))
    assert res["status"] == "done", res["rejected"]
    assert res["included"] == survivors
    model = blob.decode(fed.store.get(keys.model(1))).tensors
    want = fedavg([trained[c] for c in survivors])
    scale = res["secure_aggregation"]["scale"]
    for k in want:
        assert np.abs(model[k] - want[k]).max() <= 1e-5 + len(survivors) * 0.5 / 2 ** scale


@pytest.mark.parametrize("how", ["platform reports it", "Lambda destination to the deployed entry", "handler raises"])
def test_a_failed_unmask_invocation_is_retried_and_the_round_completes(tmp_path, monkeypatch, how):
    # Prepare: one retry allowed; p-001 drops in training, so its mask key must be rebuilt from the answers
    fed = _federation(tmp_path, monkeypatch, retries=1)
    trained = _trained(fed)
    clock = Clock()
    inv = NullInvoker()
    if how.startswith("Lambda"):
        # The deployed entry opens the store named by FEDKEEPER_STORE, keeps the real clock, and invokes through
        # the recording invoker, so the test's clock starts at the real time.
        monkeypatch.setenv("FEDKEEPER_STORE", fed.store.url)
        monkeypatch.setitem(common._STORES, fed.store.url, fed.store)
        monkeypatch.setitem(common._INVOKERS, fed.store.url, inv)
        clock.t = time.time()
    if how == "handler raises":
        real = phases.identity
        failed_once: set[str] = set()

        def flaky(fid: str, cid: str) -> bytes:
            # p-003's first unmask attempt cannot read its secret key file (a mount not ready yet)
            if cid == "p-003" and phases.phase(fed.store, 0) == phases.UNMASK and cid not in failed_once:
                failed_once.add(cid)
                raise OSError("secret store unavailable")
            return real(fid, cid)

        monkeypatch.setattr(phases, "identity", flaky)
        fate = lambda p: "run"  # noqa: E731
    else:
        how_fails = "fail-lambda" if how.startswith("Lambda") else "fail"
        fate = lambda p: how_fails if p["client"] == "p-003" and p.get("attempt", 1) == 1 else "run"  # noqa: E731

    # Execute
    inv, _ = _drive(fed, 0, trained, {"p-001"}, fate, clock, inv)

    # Assert: the failure was recorded (not final: a retry was left), the retry ran as attempt 2 and answered,
    # and the round ended on its records, long before the phase's one-hour wait
    rec = fed.store.get_json(keys.secagg_unmask_failure(0, "p-003"))
    assert rec["attempt"] == 1 and rec["final"] is False and rec["phase"] == "unmask"
    # the handler records its own failure first (the platform's report of the same attempt is a duplicate)
    assert rec["reason"] == ("OSError: secret store unavailable" if how == "handler raises" else "worker lost")
    assert [p["attempt"] for p in _unmask_calls(inv) if p["client"] == "p-003"] == [1, 2]
    assert fed.store.exists(keys.secagg_answer(0, "p-003"))
    survivors = [c for c in fed.ids if c != "p-001"]
    _assert_model_is_fedavg(fed, trained, survivors)
    res = fed.store.get_json(keys.result(0))
    assert res["secure_aggregation"]["answers"] == survivors and res["secure_aggregation"]["unanswered"] == []


def test_too_few_unmask_answers_fail_the_round_at_once_with_the_reason(tmp_path, monkeypatch):
    # Prepare: no retries; t = 4 of 6; p-001 drops in training and three of the five survivors fail to unmask
    fed = _federation(tmp_path, monkeypatch, retries=0)
    silent = {"p-000", "p-002", "p-004"}

    # Execute
    inv, ctx = _drive(fed, 0, _trained(fed), {"p-001"}, lambda p: "fail" if p["client"] in silent else "run")

    # Assert: no waiting out the phase; the round failed, naming the missing shares and who did not answer
    res = fed.store.get_json(keys.result(0))
    assert res["status"] == "failed"
    why = [x["reason"] for x in res["rejected"] if x["client"] == "*"][0]
    assert "4 are needed" in why and "stays masked" in why
    assert "survivors without an unmask answer: p-000 (worker lost), p-002 (worker lost), p-004 (worker lost)" in why
    for c in silent:
        rec = fed.store.get_json(keys.secagg_unmask_failure(0, c))
        assert rec["final"] is True and not fed.store.exists(keys.secagg_answer(0, c))
    assert {u["client"] for u in res["secure_aggregation"]["unanswered"]} == silent
    assert blob.decode(fed.store.get(keys.model(1))).tensors["hidden/bias"].tolist() == \
        fed.global_weights["hidden/bias"].tolist()


def test_a_resumed_round_invokes_the_missing_unmask_requests_again(tmp_path, monkeypatch):
    # Prepare: the process dies during the unmask phase: two survivors' invocations are lost, unseen
    fed = _federation(tmp_path, monkeypatch, retries=0)
    trained = _trained(fed)
    clock = Clock()
    lost = {"p-002", "p-005"}
    inv, ctx = _drive(fed, 0, trained, {"p-001"}, lambda p: "lose" if p["client"] in lost else "run", clock)
    assert not fed.store.exists(keys.result(0))
    # ... and the federation is resumed much later, when the phase's wait is long over
    clock.t += 10 * PHASE_S
    mark = len(inv.calls)

    # Execute: `fedkeeper run --resume` invokes the trigger with reinvoke
    out = trigger.handle({"round": 0, "reinvoke": True}, ctx)

    # Assert: exactly the unanswered survivors are invoked again, in unmask mode, and the wait restarts from now
    assert out["status"] == "resumed" and sorted(out["reinvoked"]) == sorted(lost)
    again = _unmask_calls(inv, mark)
    assert sorted(p["client"] for p in again) == sorted(lost) and all(p["attempt"] == 1 for p in again)
    assert [fn for fn, _, _ in inv.calls[mark:]] == [CLIENT, CLIENT]
    assert aggregator.handle({"round": 0}, ctx)["status"] == "waiting"
    run_calls(fed, 0, trained, {"p-001"}, lambda p: "run", inv, ctx, mark)
    _assert_model_is_fedavg(fed, trained, [c for c in fed.ids if c != "p-001"])


def test_the_tick_times_out_a_hung_unmask_invocation_and_retries_it(tmp_path, monkeypatch):
    # Prepare: p-004's unmask invocation starts (its running marker is written) and then hangs
    fed = _federation(tmp_path, monkeypatch, retries=1)
    trained = _trained(fed)
    clock = Clock()
    hung: list[dict] = []

    def fate(p: dict) -> str:
        if p["client"] == "p-004" and p.get("attempt", 1) == 1:
            hung.append(p)
            return "lose"
        return "run"

    inv, ctx = _drive(fed, 0, trained, set(), fate, clock)
    fed.store.put_json(keys.secagg_unmask_running(0, "p-004"), {"client": "p-004", "round": 0, "attempt": 1,
                                                                 "started_at": clock.t, "platform": "p"})
    assert not fed.store.exists(keys.result(0)) and len(hung) == 1
    limit = fed.cfg.platform("p").timeout_s
    mark = len(inv.calls)

    # Execute: a tick within the platform timeout leaves it alone; one after it times the invocation out
    clock.t += limit / 2
    protocol.tick(ctx, {})
    quiet = fed.store.exists(keys.secagg_unmask_failure(0, "p-004"))
    clock.t += limit
    protocol.tick(ctx, {})

    # Assert
    assert not quiet
    rec = fed.store.get_json(keys.secagg_unmask_failure(0, "p-004"))
    assert "timed out" in rec["reason"] and rec["final"] is False
    assert [(p["client"], p["attempt"]) for p in _unmask_calls(inv, mark)] == [("p-004", 2)]
    run_calls(fed, 0, trained, set(), lambda p: "run", inv, ctx, mark)
    _assert_model_is_fedavg(fed, trained, fed.ids)


def test_an_unmask_answer_is_written_once(tmp_path, monkeypatch):
    # Prepare: a round in its unmask phase where p-000 has answered
    fed = _federation(tmp_path, monkeypatch, retries=0, n=4)
    inv, ctx = _drive(fed, 0, _trained(fed), {"p-003"}, lambda p: "run" if p["client"] == "p-000" else "lose")
    first = bytes(fed.store.get(keys.secagg_answer(0, "p-000")))
    calls = len(inv.calls)

    # Execute: the same invocation delivered again (events are at least once), and a late failure report of it
    again = client.handle({"round": 0, "client": "p-000", "mode": "unmask", "attempt": 2}, ctx)
    report = aggregator.handle({"failure": {"payload": {"round": 0, "client": "p-000", "mode": "unmask",
                                                        "attempt": 3}, "reason": "late"}}, ctx)

    # Assert: the answer is unchanged, no failure is recorded for an answered survivor, and nothing is retried
    assert again["status"] == "answered-already" and report["status"] == "answered"
    assert bytes(fed.store.get(keys.secagg_answer(0, "p-000"))) == first
    assert not fed.store.exists(keys.secagg_unmask_failure(0, "p-000"))
    assert not _unmask_calls(inv, calls)


def test_failure_reports_for_clients_not_asked_to_unmask_are_ignored(tmp_path, monkeypatch):
    # Prepare: p-003 dropped in training, so it is no survivor
    fed = _federation(tmp_path, monkeypatch, retries=2, n=4)
    inv, ctx = _drive(fed, 0, _trained(fed), {"p-003"}, lambda p: "lose")
    calls = len(inv.calls)

    # Execute: hostile or confused reports: a dropped client, an unselected id, a malformed round
    outs = [aggregator.handle({"failure": {"payload": p, "reason": "x"}}, ctx) for p in (
        {"round": 0, "client": "p-003", "mode": "unmask"},
        {"round": 0, "client": "nobody", "mode": "unmask"},
        {"round": "0", "client": "p-000", "mode": "unmask"})]

    # Assert
    assert [o["status"] for o in outs] == ["ignored"] * 3
    assert not fed.store.list(keys.secagg_unmask_failure_prefix(0))
    assert len(inv.calls) == calls
