"""Push services that cannot set headers may pass the token in the URL, and only to the aggregator's /events."""

from fedkeeper.platforms.http import create_app


def test_token_in_query_opens_events_only(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDKEEPER_TOKEN", "s3cret")
    monkeypatch.setenv("FEDKEEPER_STORE", str(tmp_path / "store"))
    agg = create_app("aggregator").test_client()
    # Authorized: an empty notification reports no update keys and runs nothing.
    assert agg.post("/events?token=s3cret", json={"message": {}}).status_code == 200
    assert agg.post("/events?token=wrong", json={"message": {}}).status_code == 401
    assert agg.post("/events", json={"message": {}}).status_code == 401
    assert agg.post("/?token=s3cret", json={}).status_code == 401  # other routes still need the header
    trig = create_app("trigger").test_client()
    assert trig.post("/rounds?token=s3cret", json={}).status_code == 401
    # A header, when present, decides even if a query token is also given.
    assert agg.post("/events?token=s3cret", json={"message": {}}, headers={"Authorization": "Bearer x"}).status_code == 401
