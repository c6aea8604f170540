import pytest

from conftest import ROOT
from insight.config import ConfigError, InsightConfig, config_with, load_config

# Every step config the project ships: the profiles and each Kubernetes overlay's insight.yaml.
SHIPPED = sorted(str(p.relative_to(ROOT)) for p in [*(ROOT / "configs").glob("*.yaml"),
                                                     *(ROOT / "k8s" / "overlays").glob("*/insight.yaml")])


def test_every_shipped_config_is_listed():
    assert {"configs/tiny.yaml", "configs/quickstart.yaml", "configs/vit-b16-paper.yaml",
            "k8s/overlays/dev/insight.yaml", "k8s/overlays/prod/insight.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate_and_can_sweep(name):
    """Full validation, and every choice of the sweep space gives a valid config (a profile whose
    sweep `insight sweep` rejects cannot register a champion, so nothing after it can run)."""
    from insight.sweeps.tune import validate_space

    cfg = load_config(ROOT / name)
    assert isinstance(cfg, InsightConfig)
    validate_space(cfg)


@pytest.mark.parametrize("dataset", sorted(p.name for p in (ROOT / "configs" / "datasets").glob("*.yaml")))
def test_dataset_configs_validate_on_every_profile(dataset):
    from insight.tasks.evaluate import load_eval_config

    for name in SHIPPED:
        cfg = load_eval_config(str(ROOT / name), str(ROOT / "configs" / "datasets" / dataset), [])
        assert cfg.data.root and cfg.tasks.classes


def test_validate_space_names_the_bad_choice():
    from insight.sweeps.tune import validate_space

    cfg = load_config(None, ["sae.group_fractions=[0.5,0.5]"])  # the default space varies sae.depth over [1, 3, 6]
    with pytest.raises(ConfigError, match=r"sweep.space.sae.depth choice 1"):
        validate_space(cfg)


def test_paper_profile_matches_method():
    cfg = load_config(ROOT / "configs" / "vit-b16-paper.yaml")
    assert cfg.backbone.model == "ViT-B-16" and cfg.backbone.pretrained == "laion2b_s34b_b88k"
    assert cfg.sae.expansion == 16 and cfg.sae.k == 12
    assert cfg.sae.fractions() == [0.008, 0.03, 0.06, 0.12, 0.24, 0.542]
    assert cfg.train.batch_size == 16384 and cfg.train.lr == 1e-4
    assert cfg.concepts.tau == 0.75 and cfg.backbone.dinoiser.gamma == 0.2


def test_misspelled_key_is_named_with_suggestion(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("sae:\n  expansoin: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "sae.expansoin" in msg and "did you mean 'sae.expansion'" in msg


def test_wrong_type_and_range_name_key_value_and_rule():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sae.k=lots"])
    assert "'sae.k'" in str(err.value) and '"lots"' in str(err.value) and "integer" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["cache.val_fraction=1.5"])
    assert "cache.val_fraction" in str(err.value) and "less than 1" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.kind=tarball"])
    assert "data.kind" in str(err.value) and "'folder'" in str(err.value)


def test_set_overrides_parse_yaml_values():
    cfg = load_config(None, ["sae.k=16", "train.use_gpu=true", "sae.group_fractions=[0.25,0.75]",
                             "backbone.pretrained=null"])
    assert cfg.sae.k == 16 and cfg.train.use_gpu is True
    assert cfg.sae.fractions() == [0.25, 0.75] and cfg.backbone.pretrained is None


def test_set_errors():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["sae.k"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["sae.k.x=1"])
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_config(None, ["nope=1"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(None, ["sae.group_fractions=[0.5,0.6]"])
    with pytest.raises(ConfigError, match="disagrees"):
        load_config(None, ["sae.depth=3", "sae.group_fractions=[0.5,0.5]"])
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config(None, ["data.kind=folder"])
    with pytest.raises(ConfigError, match="slot"):
        load_config(None, ["backbone.templates=['a photo']"])


def test_depth_rule_doubles_groups():
    fr = load_config(None, ["sae.depth=3"]).sae.fractions()
    assert len(fr) == 3 and fr[1] == pytest.approx(2 * fr[0]) and sum(fr) == pytest.approx(1)
    assert load_config(None, ["sae.depth=1"]).sae.fractions() == [1.0]


def test_config_with_for_sweeps():
    cfg = config_with(load_config(None), {"sae.k": 4, "sae.depth": 2})
    assert cfg.sae.k == 4 and len(cfg.sae.fractions()) == 2
    with pytest.raises(ConfigError):
        config_with(cfg, {"sae.k": -1})


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    p.write_text("sae: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_relative_workdir_is_made_absolute(tmp_path, monkeypatch):
    """Tune runs each trial in its own folder: a relative workdir must not follow it there."""
    import os

    from insight.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["workdir=outputs/run"])
    assert cfg.workdir == str(tmp_path / "outputs" / "run") and os.path.isabs(cfg.path(cfg.cache.root))
    monkeypatch.chdir("/")
    assert load_config(None, [f"workdir={cfg.workdir}"]).workdir == cfg.workdir  # stable once absolute
    assert load_config(None, ["workdir=~/x"]).workdir == os.path.expanduser("~/x")


# ------------------------------------------------------------------ reading the schema and error messages


def test_every_config_key_is_described():
    """`insight config explain` and `config show --explain` print these; a new key needs one too."""
    from insight.config import describe, schema_keys

    keys = schema_keys()
    assert len(keys) > 150 and "train.lr" in keys and "sae" in keys
    missing = sorted(k for k, f in keys.items() if not describe(f))
    assert not missing, f"config keys without a description (give Field(..., description=...)): {missing}"


def test_explain_key_gives_description_type_default_and_rules():
    from insight.config import explain_key

    lr = explain_key("train.lr")
    assert lr["description"] and lr["type"] == "number" and lr["default"] == 1e-4 and lr["rules"] == ["> 0"]
    kind = explain_key("backbone.kind")
    assert kind["allowed"] == ["openclip", "offline", "auto"] and kind["default"] == "openclip"
    assert explain_key("serve.api_key")["secret"] is True
    sae = explain_key("sae")
    assert "k" in sae["keys"] and sae["keys"]["k"] and sae["description"]
    with pytest.raises(ConfigError, match=r"no config key 'train\.lrr'; did you mean train\.lr"):
        explain_key("train.lrr")


def test_yaml_round_trips_and_masks_secrets():
    import yaml

    from insight.config import to_yaml

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    assert InsightConfig.model_validate(yaml.safe_load(to_yaml(cfg))) == cfg  # the YAML is a valid config again
    secret = load_config(None, ["serve.api_key=s3cret-key", "tracking.uri=postgresql://mlflow:pa55word@db:5432/mlflow"])
    text = to_yaml(secret, explain=True)
    assert "s3cret-key" not in text and "pa55word" not in text
    shown = yaml.safe_load(text)
    assert shown["serve"]["api_key"] == "***" and shown["tracking"]["uri"] == "postgresql://mlflow:***@db:5432/mlflow"
    assert "# Adam learning rate" in text  # --explain: the description above its key


def test_cross_field_error_names_the_problem_and_the_fix():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sae.depth=3", "sae.group_fractions=[0.5,0.5]"])
    msg = str(err.value)
    assert "sae.depth=3 disagrees with 2 sae.group_fractions" in msg and "give as many fractions as the depth" in msg
    assert "Value error" not in msg and "{...}" not in msg  # no pydantic internals


def test_a_section_given_a_value_says_it_is_a_section():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["tracking=foo"])
    msg = str(err.value)
    assert "'tracking' is a section, not a value" in msg and "--set tracking.uri=VALUE" in msg
    assert "TrackingConfig" not in msg  # no class names of the code


def test_a_wrong_type_shows_the_expected_form():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sweep.space=foo"])
    msg = str(err.value)
    assert "'sweep.space' = \"foo\"" in msg and "{sae.k: [8, 16]" in msg and "insight config explain sweep.space" in msg
    with pytest.raises(ConfigError) as err:  # a union: one line naming the types, not one per member type
        load_config(None, ["tasks.classes=5"])
    problems = str(err.value).splitlines()[1:]
    assert len(problems) == 1 and "expected list of string or string or null" in problems[0]


def test_sweep_space_error_says_how_to_fix_it():
    from insight.sweeps.tune import validate_space

    cfg = load_config(ROOT / "configs" / "vit-b16-paper.yaml", ["sweep.space={sae.depth: [1, 3]}"])
    with pytest.raises(ConfigError) as err:
        validate_space(cfg)
    msg = str(err.value)
    assert "sweep.space.sae.depth choice 1 makes an invalid config" in msg
    assert "sae.depth=1 disagrees with 6 sae.group_fractions" in msg and "drop it from sweep.space.sae.depth" in msg


def test_sweep_space_combinations_are_checked_too():
    """Each choice alone is valid here, but depth 3 with two fractions is not: a grid would fail that trial."""
    from insight.sweeps.tune import validate_space

    cfg = load_config(None, ["sweep.space={sae.depth: [2, 3], sae.group_fractions: [[0.5, 0.5]]}"])
    with pytest.raises(ConfigError) as err:
        validate_space(cfg)
    msg = str(err.value)
    assert "sweep.space combination {'sae.depth': 3, 'sae.group_fractions': [0.5, 0.5]}" in msg
    assert "sae.depth=3 disagrees with 2 sae.group_fractions" in msg and "sweep them in separate sweeps" in msg
