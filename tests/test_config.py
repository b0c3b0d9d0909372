"""Every config error is one line that names the key, raised before anything compiles."""
import pytest

from conftest import ROOT, run_cli
from phijax.config import load_config, validate
from phijax.errors import ConfigError

TINY = ROOT / "configs" / "tiny.yaml"


def error(*overrides, devices=None):
    with pytest.raises(ConfigError) as e:
        cfg = load_config(TINY, list(overrides))
        validate(cfg, devices)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_shipped_configs_load():
    for name in ("tiny", "bench-cpu-53m", "phi-4"):
        load_config(ROOT / "configs" / f"{name}.yaml")


def test_overrides_are_typed_and_applied():
    cfg = load_config(TINY, ["train.steps=20", "run.dir=/tmp/r", "mesh.fsdp=4",
                             "optimizer.learning_rate=1e-3", "model.tie_word_embeddings=true"])
    assert cfg.train.steps == 20 and cfg.run.dir == "/tmp/r" and cfg.mesh.fsdp == 4
    assert cfg.optimizer.learning_rate == 1e-3 and cfg.model.tie_word_embeddings is True


def test_unknown_key_suggests_closest():
    assert error("model.hiden_size=3") == "unknown key model.hiden_size (did you mean model.hidden_size?)"
    assert "unknown key trian" in error("trian.steps=3")


def test_wrong_type_names_key():
    assert error("train.steps=many") == "train.steps: expected an integer, got str 'many'"
    assert error("model.tie_word_embeddings=3").startswith("model.tie_word_embeddings: expected true/false")


def test_non_positive_sizes():
    assert error("model.hidden_size=0") == "model.hidden_size must be positive, got 0"
    assert error("train.batch_size=-8") == "train.batch_size must be positive, got -8"


def test_mesh_must_match_device_count():
    assert error("mesh.fsdp=4", "train.batch_size=16", devices=8) == (
        "mesh data*fsdp*tensor = 1*4*1 = 4 does not match the 8 available devices")


def test_batch_divisible_by_data_parallel():
    assert "train.batch_size 10" in error("train.batch_size=10", "mesh.fsdp=4")
    assert "data-parallel size mesh.data*mesh.fsdp = 4" in error("train.batch_size=10", "mesh.fsdp=4")


def test_heads_divisible():
    assert error("model.num_key_value_heads=3") == (
        "model.num_attention_heads 4 is not divisible by model.num_key_value_heads 3")
    assert error("mesh.tensor=8") == "model.num_attention_heads 4 is not divisible by mesh.tensor 8"


def test_dpo_values():
    assert error("dpo.rpo_alpha=-1") == "dpo.rpo_alpha must be >= 0, got -1.0"
    assert error("dpo.beta=0") == "dpo.beta must be positive, got 0.0"


def test_bad_choice():
    assert error("model.remat=sometimes").startswith("model.remat: 'sometimes' is not one of")


def test_cli_reports_one_line_before_compiling():
    out = run_cli("train", TINY, "model.num_hiden_layers=3", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "phijax: error: unknown key model.num_hiden_layers (did you mean model.num_hidden_layers?)")
    out = run_cli("train", TINY, "mesh.fsdp=2", devices=1, check=False)
    assert out.returncode == 2
    assert "does not match the 1 available devices" in out.stderr.strip().splitlines()[-1]


def test_override_below_a_value_is_an_error():
    assert error("train.steps.x=1") == "override train.steps.x: train.steps is not a section"


def test_on_and_off_are_words_not_booleans(tmp_path):
    """YAML 1.2's booleans (true/false): `run.distributed: on` is the choice `on`, in a file and
    in an override; yes/no are words too, and a true/false field refuses them by name."""
    assert load_config(TINY, ["run.distributed=on"]).run.distributed == "on"
    assert load_config(TINY, ["run.distributed=off"]).run.distributed == "off"
    path = tmp_path / "c.yaml"
    path.write_text("run: {distributed: on}\nmodel: {tie_word_embeddings: true}\n")
    cfg = load_config(path)
    assert cfg.run.distributed == "on" and cfg.model.tie_word_embeddings is True
    assert error("model.scan_layers=yes") == \
        "model.scan_layers: expected true/false, got str 'yes'"
