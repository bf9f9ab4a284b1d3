import re

import pytest
import yaml

from kftune.config import ConfigError, load_params, params_from_dict, params_help
from tests.conftest import ROOT


def test_params_yaml_loads_and_hash_is_stable():
    a, b = load_params(ROOT / "params.yaml"), load_params(ROOT / "params.yaml")
    assert a == b and a.digest() == b.digest()
    assert load_params(ROOT / "params.yaml", ["finetune.seed=1"]).digest() != a.digest()


def test_override_sets_one_key_and_parses_yaml_scalars():
    p = load_params(ROOT / "params.yaml", ["finetune.learning_rate=3e-5", "finetune.bf16=false",
                                           "ingest.labels=[neg, pos]"])
    assert p.finetune.learning_rate == 3e-5 and p.finetune.bf16 == "false" and p.ingest.labels == ["neg", "pos"]


def test_every_problem_is_reported_at_once_with_its_key_path():
    with pytest.raises(ConfigError) as err:
        load_params(ROOT / "params.yaml", ["finetune.batch_size=0", "ingest.test_fraction=0.9",
                                           "tokenize.max_length=abc", "register.model_name=", "task=ner",
                                           "nosuch.key=1", "finetune.nosuch=1"])
    msg = str(err.value)
    for expected in ["finetune.batch_size=0", "ingest.test_fraction=0.9", "tokenize.max_length='abc'",
                     "register.model_name is empty", "task='ner'", "'nosuch' is not a section",
                     "override finetune.nosuch: unknown key"]:
        assert expected in msg
    assert len(re.findall(r"^\s+- ", msg, re.M)) == 7


def test_a_key_of_the_wrong_type_does_not_hide_its_sections_other_problems():
    with pytest.raises(ConfigError) as err:
        load_params(ROOT / "params.yaml", ["finetune.batch_size=x", "finetune.learning_rate=5", "serve.max_batch=[1]",
                                           "serve.agreement_rows=-1", "register.keep_versions=-1"])
    lines = str(err.value).splitlines()[1:]
    assert lines == ["  - finetune.batch_size='x': expected int, got str",
                     "  - finetune.learning_rate=5.0: must be in (0, 1)",
                     "  - register.keep_versions=-1: must be >= 0 (0 keeps every version)",
                     "  - serve.max_batch=[1]: expected int, got list",
                     "  - serve.agreement_rows=-1: must be > 0"], lines


@pytest.mark.parametrize("setting", ["retrain.cooldown_hours=nan", "drift.psi_threshold=.nan",
                                     "finetune.weight_decay=inf"])
def test_nan_and_infinity_are_refused_for_numbers(setting):
    with pytest.raises(ConfigError, match=r"expected a finite number"):
        load_params(ROOT / "params.yaml", [setting])


def test_text_settings_keep_their_text_and_yes_no_still_work_for_switches():
    p = load_params(ROOT / "params.yaml", ["ingest.labels=[no, yes]", "ingest.split_salt=010",
                                           "ingest.bio_repair=no", "finetune.group_by_length=on"])
    assert p.ingest.labels == ["no", "yes"] and p.ingest.split_salt == "010", "YAML 1.1 read false, true and 8"
    assert p.ingest.bio_repair is False and p.finetune.group_by_length is True


def test_a_params_file_that_is_not_a_mapping_says_so(tmp_path):
    (tmp_path / "list.yaml").write_text("- finetune\n- ingest\n")
    with pytest.raises(ConfigError, match=r"list.yaml: expected a mapping of sections.*got a list"):
        load_params(tmp_path / "list.yaml")


@pytest.mark.parametrize("delta", ["-1.5", "1"])
def test_a_min_delta_outside_minus_one_to_one_is_refused(delta):
    with pytest.raises(ConfigError, match=r"register.min_delta=.*must be in \[-1, 1\)"):
        load_params(ROOT / "params.yaml", [f"register.min_delta={delta}"])
    with pytest.raises(ConfigError, match=r"register.min_delta='nan': expected a finite number"):
        load_params(ROOT / "params.yaml", ["register.min_delta=nan"])


def test_missing_and_unknown_keys_in_the_file_are_named(tmp_path):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    del data["finetune"]["seed"]
    data["evaluate"]["typo_key"] = 1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"finetune\.seed: missing") as err:
        load_params(path)
    assert "evaluate.typo_key: unknown key" in str(err.value)


def test_kfp_struct_numbers_come_back_as_floats_and_are_accepted():
    data = load_params(ROOT / "params.yaml").to_dict()
    data["finetune"]["batch_size"] = 32.0
    assert params_from_dict(data).finetune.batch_size == 32
    data["finetune"]["batch_size"] = 32.5
    with pytest.raises(ConfigError, match="finetune.batch_size=32.5"):
        params_from_dict(data)


def test_a_rules_numeric_label_and_name_read_the_same_after_a_kfp_struct():
    """A cluster task gets params through a protobuf Struct, where every integer becomes a float: a rule on label 1
    must still watch label "1", not "1.0" (which the champion lacks: the rule could never fire)."""
    rules = "[{name: 7, kind: label_share, label: 1, max_share: 0.5, window: 1h, min_requests: 1}]"
    local = load_params(ROOT / "params.yaml", [f"monitor.rules={rules}"])
    data = local.to_dict()
    data["monitor"]["rules"] = [{k: float(v) if isinstance(v, int) else v for k, v in r.items()}
                                for r in data["monitor"]["rules"]]
    on_cluster = params_from_dict(data)
    assert [(r.name, r.label) for r in on_cluster.monitor.parsed_rules()] == [("7", "1")]
    assert local.monitor.parsed_rules() == on_cluster.monitor.parsed_rules()


def test_missing_params_file_says_where():
    with pytest.raises(ConfigError, match="nope.yaml: params file not found"):
        load_params("nope.yaml")


def test_every_key_has_a_row_in_the_readmes_configuration_table():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key in params_help() if f"\n| `{key}` | " not in readme]
    assert not missing, f"README's configuration table lacks {missing}"


@pytest.mark.parametrize("bad", ["ingest.labels=[a, b", "model.name=!!python/object:os.system x"])
def test_a_malformed_override_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="not a YAML value"):
        load_params(ROOT / "params.yaml", [bad])


@pytest.mark.parametrize("override, message", [
    ("finetune.seed=-1", "finetune.seed=-1: must be in [0, 2**32 - 1]"),
    ("monitor.queue_seed=4294967296", "monitor.queue_seed=4294967296: must be in [0, 2**32 - 1]"),
    ("drift.methods=[embedding, embedding]", "drift.methods: 'embedding' is listed twice"),
    ("drift.methods=[]", "drift.methods is empty"),
    ("drift.methods=[entities]", "entities runs for token-classification only"),
    ("cluster.finetune_memory=1.5G", "cluster.finetune_memory='1.5G': not a memory quantity"),
    ("monitor.rules=[{name: [x], kind: volume, window: 1h, min_requests: 1}]",
     "monitor.rules[0].name=['x']: must be a non-empty text"),
    ("monitor.rules=[{name: 1, kind: volume, window: 1h, min_requests: 1}, "
     "{name: '1', kind: volume, window: 2h, min_requests: 1}]", "monitor.rules: name '1' is used twice"),
    ("monitor.rules=[{name: v, kind: volume, window: 1h, min_requests: 1.5}]",
     "monitor.rules[0].min_requests=1.5: must be a whole number"),
    ("drift.permutations=-1", "drift.permutations=-1: must be > 0"),
    ("monitor.rules=[{name: v, kind: volume, window: 1h, min_requests: .inf}]",
     "monitor.rules[0].min_requests=inf: must be a number >= 0"),
    ("monitor.rules=[{name: v, kind: volume, window: 1h, min_requests: 1, for_checks: .inf}]",
     "monitor.rules[0].for_checks=inf: must be a whole number >= 1"),
    ("monitor.rules=[{name: q, kind: live_quality, window: 1h, min_requests: 1, max_gap: .nan}]",
     "monitor.rules[0].max_gap=nan: must be a number >= 0"),
])
def test_values_that_would_break_a_later_step_are_refused_up_front(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_params(ROOT / "params.yaml", [override])
    assert load_params(ROOT / "params.yaml", ["task=token-classification", "drift.methods=[entities]",
                                              "drift.min_flags=1"]).drift.methods == ["entities"]


def test_a_key_given_twice_in_params_yaml_is_an_error_naming_both_lines(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("finetune:\n", "finetune:\n  learning_rate: 5.0e-5\n", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"'learning_rate' is given twice \(line \d+ and line \d+\)"):
        load_params(tmp_path / "params.yaml")
