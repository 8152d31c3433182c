"""The config schema: defaults, generated clients, and errors that name the field and the fix."""

import pytest

from fedkeeper.core import config


def test_defaults_are_the_papers_settings():
    cfg = config.from_dict({})
    assert [(p.name, p.clients) for p in cfg.platforms] == [("openwhisk", 4), ("openfaas", 2), ("gcf", 4)]
    assert len(cfg.clients) == 10 and cfg.rounds == 5
    assert (cfg.model.name, cfg.model.epochs, cfg.model.batch_size, cfg.model.learning_rate) == ("nn", 2, 10, 1e-3)
    assert cfg.clients[0].id == "openwhisk-000" and cfg.clients[-1].platform == "gcf"


def test_compile_settings_default_on_and_survive_an_older_stored_config():
    cfg = config.from_dict({})
    assert (cfg.model.jit_compile, cfg.model.steps_per_execution) == (True, 32)
    stored = cfg.to_dict()
    del stored["model"]["jit_compile"], stored["model"]["steps_per_execution"]
    old = config.from_stored(stored)
    assert (old.model.jit_compile, old.model.steps_per_execution) == (True, 32)
    off = config.from_dict({"model": {"jit_compile": False, "steps_per_execution": 1}})
    assert (off.model.jit_compile, off.model.steps_per_execution) == (False, 1)


def test_stored_config_round_trips():
    cfg = config.from_dict({"platforms": [{"name": "a", "clients": 2}], "clients": [{"id": "x", "platform": "a"}]})
    again = config.from_stored(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("raw, field", [
    ({"rounds": 0}, "rounds"),
    ({"rounds": "five"}, "rounds"),
    ({"roundz": 3}, "roundz"),
    ({"model": {"learning_rate": -1}}, "model.learning_rate"),
    ({"model": {"name": "resnet"}}, "model.name"),
    ({"model": {"batch_size": 2.5}}, "model.batch_size"),
    ({"data": {"partition": "dirichlet:-1"}}, "data.partition"),
    ({"data": {"dataset": "imagenet"}}, "data.dataset"),
    ({"strategy": {"quorum": 1.5}}, "strategy.quorum"),
    ({"platforms": [{"name": "a", "kind": "azure"}]}, "platforms[0].kind"),
    ({"platforms": [{"name": "a"}, {"name": "a"}]}, "platforms[1].name"),
    ({"platforms": [{"name": "a"}], "clients": [{"id": "c", "platform": "b"}]}, "clients[0].platform"),
    ({"platforms": [{"name": "a", "clients": 0}], "clients": [{"id": "c/1", "platform": "a"}]}, "clients[0].id"),
    ({"strategy": {"min_clients": 50}}, "strategy.min_clients"),
    ({"model": "nn"}, "model"),
    ({"schedule": "every minute"}, "schedule"),
    ({"model": {"jit_compile": "yes"}}, "model.jit_compile"),
    ({"model": {"steps_per_execution": 0}}, "model.steps_per_execution"),
])
def test_errors_name_the_field_and_fix(raw, field):
    with pytest.raises(config.ConfigError) as info:
        config.from_dict(raw)
    assert info.value.field == field
    assert "Fix:" in str(info.value) and field in str(info.value)


def test_partition_specs():
    for ok in ("iid", "shards", "shards:3", "dirichlet:0.5"):
        assert config.validate_partition("p", ok) == ok
    for bad in ("shards:0", "dirichlet:x", "random"):
        with pytest.raises(config.ConfigError):
            config.validate_partition("p", bad)


def test_yaml_file_errors_are_clear(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("rounds: [1,\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load_file(str(p))
    p.write_text("- 1\n- 2\n")
    with pytest.raises(config.ConfigError, match="mapping"):
        config.load_file(str(p))


def test_functions_revalidate_the_stored_config_only_when_it_changes(tmp_path):
    # Prepare: a stored federation, read once by a warm function.
    from fedkeeper.core import keys
    from fedkeeper.functions.context import Context
    from fedkeeper.store.local import LocalStore

    store = LocalStore(tmp_path)
    store.put_json(keys.FEDERATION, config.from_dict({"rounds": 3}).to_dict())
    ctx = Context(store=store)
    first = ctx.config()
    # Execute: read again unchanged, then after the file changes, then after it turns invalid.
    again = ctx.config()
    changed = config.from_dict({"rounds": 7}).to_dict()
    store.put_json(keys.FEDERATION, changed)
    after = ctx.config()
    store.put_json(keys.FEDERATION, dict(changed, rounds=0))
    # Assert: the same bytes give the same validated object; new bytes are validated again.
    assert again is first and first.rounds == 3
    assert after.rounds == 7
    from fedkeeper.functions.context import HandlerError

    with pytest.raises(HandlerError, match="rounds"):
        ctx.config()
