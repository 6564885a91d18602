"""The typed config: YAML + dotted CLI overrides, one clear error naming the key."""
import pytest

from qcore.config import Config, ConfigError, apply_overrides, load_config, parse_overrides


def test_defaults_match_the_method_doc():
    cfg = Config()
    assert (cfg.adapter.rank, cfg.adapter.lora_alpha, cfg.adapter.dropout) == (8, 16, 0.05)
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert (cfg.q.alpha_0, cfg.q.alpha_tilde, cfg.q.gamma, cfg.q.beta) == (0.01, 1.0, 1.0, 0.1)
    assert (cfg.q.variant, cfg.q.mask_alignment) == ("paper", "standard")
    assert cfg.model.trust_remote_code is False


def test_yaml_then_cli_overrides(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("train:\n  lr: 0.001\n  num_workers: 1\nq:\n  variant: bellman\n")
    cfg = load_config(profile, ["--train.lr", "1e-4", "--q.alpha_0=0.5", "--adapter.target_modules", "[q_proj, k_proj]"])
    assert cfg.train.lr == pytest.approx(1e-4)  # CLI wins over YAML
    assert cfg.train.num_workers == 1  # YAML kept where not overridden
    assert cfg.q.variant == "bellman" and cfg.q.alpha_0 == 0.5
    assert cfg.adapter.target_modules == ["q_proj", "k_proj"]


@pytest.mark.parametrize(
    "args, key",
    [
        (["--train.lrr", "1"], "train.lrr"),
        (["--trian.lr", "1"], "trian.lr"),
        (["--train.lr", "abc"], "train.lr"),
        (["--q.variant", "other"], "q.variant"),
        (["--q.mask_alignment", "left"], "q.mask_alignment"),
        (["--train.num_workers", "1.5"], "train.num_workers"),
        (["--train.replay_fraction", "1"], "train.replay_fraction"),
        (["--train.replay_max_new_tokens", "0"], "train.replay_max_new_tokens"),
        (["--data.max_prompt_length", "600"], "data.max_prompt_length"),
        (["--tune.space", '{"adapter.rnk": {"type": "choice", "values": [1]}}'], "adapter.rnk"),
        (["--train.lr"], "train.lr"),
    ],
)
def test_bad_config_names_the_key(args, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, args)
    assert f"'{key}'" in str(err.value)


def test_profile_must_be_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["--a.b.c", "1", "--a.d=x"]) == {"a": {"b": {"c": "1"}, "d": "x"}}
    with pytest.raises(ConfigError):
        parse_overrides(["train.lr", "1"])


def test_hash_is_stable_and_sensitive():
    a, b = Config(), Config()
    assert a.hash() == b.hash() and a.hash("data") == b.hash("data")
    c = apply_overrides(a, {"train.lr": 1e-5})
    assert c.hash() != a.hash()
    assert c.hash("data", "model") == a.hash("data", "model")  # sections not touched keep their hash
    with pytest.raises(ConfigError, match="'train.nope'"):
        apply_overrides(a, {"train.nope": 1})
