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


@pytest.mark.parametrize(
    "args, key",
    [
        (["--q.gamma", "0"], "q.gamma"),
        (["--q.gamma", "1.5"], "q.gamma"),
        (["--train.lr", "nan"], "train.lr"),
        (["--train.lr", "inf"], "train.lr"),
        (["--q.alpha_0", "nan"], "q.alpha_0"),
        (["--q.beta", "inf"], "q.beta"),
        (["--q.alpha_tilde", "inf"], "q.alpha_tilde"),
        (["--adapter.lora_alpha", "0"], "adapter.lora_alpha"),
        (["--train.dpo_beta", "0"], "train.dpo_beta"),
        (["--train.epochs", "0"], "train.epochs"),
        (["--train.max_steps", "0"], "train.max_steps"),
        (["--train.keep_checkpoints", "0"], "train.keep_checkpoints"),
        (["--train.max_failures", "-2"], "train.max_failures"),
        (["--train.max_grad_norm", "-1"], "train.max_grad_norm"),
        (["--run.name", "a/b"], "run.name"),
        (["--run.name", ".."], "run.name"),
        (["--run.name", ""], "run.name"),
        (["--eval.methods", "[qadapter, ppo]"], "eval.methods[1]"),
        (["--eval.methods", "[dpo, dpo]"], "eval.methods"),
        (["--eval.dial", "[{alpha_0: -1}]"], "eval.dial[0]"),
        (["--eval.dial", "[{alpha_tilde: 0}]"], "eval.dial[0]"),
        (["--eval.dial", "[{alpha: 1}]"], "eval.dial[0]"),
        (["--eval.dial", "[{alpha_0: .nan}]"], "eval.dial[0].alpha_0"),
        (["--tune.space", "{train.lr: {type: loguniform, low: 0, high: 1}}"], "tune.space.train.lr"),
        (["--tune.space", "{train.lr: {type: choice, values: []}}"], "tune.space.train.lr"),
        (["--tune.space", "{train.lr: {type: normal}}"], "tune.space.train.lr"),
        (["--tune.num_workers", "0"], "tune.num_workers"),
        (["--train.method_overrides", "{ppo: {train.lr: 1}}"], "train.method_overrides.ppo"),
        (["--train.method_overrides", "{dpo: {train.lrr: 1}}"], "train.method_overrides.dpo"),
    ],
)
def test_ranges_name_the_key(args, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, args)
    assert f"'{key}'" in str(err.value)


def test_ranges_accept_their_edges_and_null_unsets_optional_keys():
    cfg = load_config(None, ["--q.gamma", "1", "--train.max_failures", "-1", "--train.max_grad_norm", "0",
                             "--train.max_steps", "-1", "--eval.prompts_file", "x.jsonl"])
    assert (cfg.q.gamma, cfg.train.max_failures, cfg.train.max_grad_norm) == (1.0, -1, 0.0)
    assert load_config(None, ["--eval.prompts_file", "null"]).eval.prompts_file is None
    assert load_config(None, ["--train.resume_from", "~"]).train.resume_from is None


def test_hydra_style_overrides():
    cfg = load_config(None, ["train.lr=1e-4", "--q.alpha_0", "0.5", "q.variant=bellman"])
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.q.alpha_0 == 0.5 and cfg.q.variant == "bellman"
    with pytest.raises(ConfigError, match="section.key=VALUE"):
        load_config(None, ["lr=1"])


def test_readme_config_table_lists_every_key():
    """README.md's configuration table names every key of qcore/config.py in its section's row, and every key a
    row lists exists, so the two cannot drift."""
    import re
    from pathlib import Path

    from qcore.config import config_keys

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", readme, flags=re.M))
    keys = config_keys()
    for section in {k.split(".")[0] for k, _, _ in keys}:
        assert section in rows, f"README config table has no row for section '{section}'"
        row = rows[section]
        for key, _, _ in keys:
            top, _, rest = key.partition(".")
            if top == section:
                name = rest.split(".")[0]
                assert f"`{name}`" in row or f"`{rest}`" in row, f"README row '{section}' does not name '{key}'"
    for section, row in rows.items():  # a key the README names first in an item must exist (no stale key)
        for name in re.findall(r"(?:^|, )`([a-z_0-9]+)`", row):
            assert f"{section}.{name}" in {k for k, _, _ in keys} or any(
                k.startswith(f"{section}.{name}.") for k, _, _ in keys), f"README row '{section}' names '{name}'"
