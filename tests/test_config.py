"""Configuration: file, environment and --set layering; errors that name the key; CLI exit code 2."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from stream_cl.cli import main
from stream_cl.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_toml_lists_every_default() -> None:
    """config.toml at the repository root holds exactly the typed defaults, key for key."""
    text = (ROOT / "config.toml").read_text()
    loaded = load_config(ROOT / "config.toml", env={})
    assert loaded == Config()
    for section in dataclasses.fields(Config):
        assert f"[{section.name}]" in text
        for key in dataclasses.fields(getattr(Config(), section.name)):
            assert f"\n{key.name} = " in text, f"{section.name}.{key.name} is not documented in config.toml"


def test_precedence_file_then_env_then_set(tmp_path: Path) -> None:
    """--set beats the environment, which beats the file."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[kafka]\ntopic = "from-file"\ngroup_id = "file-group"\n[serve]\nport = 1234\n')
    env = {"STREAM_CL_KAFKA__TOPIC": "from-env", "STREAM_CL_SERVE__PORT": "4321"}
    c = load_config(cfg, ["kafka.topic=from-set"], env=env)
    assert c.kafka.topic == "from-set"
    assert c.kafka.group_id == "file-group"
    assert c.serve.port == 4321


def test_overrides_parse_lists_bools_and_tables() -> None:
    """Text overrides are parsed against the key's type (TOML syntax for lists and tables)."""
    c = load_config(
        None, ["model.hidden=[64, 32]", "serve.enabled=false", "strategy.options={buffer_size = 10}"], env={}
    )
    assert c.model.hidden == [64, 32]
    assert c.serve.enabled is False
    assert c.strategy.options == {"buffer_size": 10}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("kafka.nope=1", "kafka.nope"),
        ("nosection.key=1", "nosection"),
        ("model.lr=fast", "model.lr"),
        ("model.batch_size=1.5", "model.batch_size"),
        ("model.hidden=[]", "model.hidden"),
        ("model.device=tpu", "model.device"),
        ("serve.port=70000", "serve.port"),
        ("log.format=xml", "log.format"),
        ("kafka.auto_offset_reset=middle", "kafka.auto_offset_reset"),
        ("checkpoint.min_interval_s=-1", "checkpoint.min_interval_s"),
        ("evaluation.max_cpu_share=1.5", "evaluation.max_cpu_share"),
        ("learner.snapshot_min_interval_ms=-1", "learner.snapshot_min_interval_ms"),
        ("learner.gil_switch_interval_us=-5", "learner.gil_switch_interval_us"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    """Every unknown key or bad value raises ConfigError carrying the dotted key."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], env={})
    assert err.value.key == key
    assert key in str(err.value)


def test_bad_toml_file_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not TOML is reported as a config error, not a traceback."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})


def test_cli_exit_code_2_and_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad key on the command line exits 2 with a single stderr line naming it."""
    assert main(["run", "--set", "serve.porrt=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "serve.porrt" in err[0]


def test_unknown_strategy_lists_valid_names(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown strategy name exits 2 and lists the registered strategies."""
    assert main(["run", "--set", "strategy.name=magic"]) == 2
    err = capsys.readouterr().err
    assert "strategy.name" in err and "finetune" in err


def test_unknown_strategy_option_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    """An option the strategy's constructor does not take exits 2 naming strategy.options.KEY."""
    assert main(["run", "--set", "strategy.options={colour = 1}"]) == 2
    assert "strategy.options.colour" in capsys.readouterr().err


def test_console_script_exit_code() -> None:
    """The installed `stream-cl` entry point maps a config error to exit code 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "stream_cl.cli", "run", "--set", "metrics.port=-1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "metrics.port" in proc.stderr
