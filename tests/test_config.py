"""Configs: every key reachable from the command line, documented, and mistakes reported in
one line."""

import importlib.metadata
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from aa_flax import config_utils, trainer
from aa_flax.errors import ConfigError, ConfigMismatchError
from train_helpers import REPO_ROOT, subprocess_env

CONFIG_DOC = REPO_ROOT / "docs" / "CONFIG.md"


def _parse_flags(monkeypatch, config_spec: str, *overrides: str):
  """Parses ``--config=<spec> <overrides>`` the way ``train.py`` does, in-process."""
  argv = ["train.py", f"--config={config_spec}", *overrides]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides' names here
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True)
  flag_values(argv)
  return holder.value


def test_every_config_key_is_documented():
  documented = set(re.findall(r"^\| `([a-z_.]+)`", CONFIG_DOC.read_text(), re.MULTILINE))
  documented |= {"data.std"}  # documented together with data.mean
  keys = set(config_utils.flatten(config_utils.base_config()))
  assert keys - documented == set(), "keys missing from docs/CONFIG.md"
  assert documented - keys == set(), "docs/CONFIG.md lists keys that do not exist"


def test_attention_and_model_settings_reach_create_model_from_the_command_line(monkeypatch):
  config = _parse_flags(monkeypatch, str(REPO_ROOT / "configs" / "imagenet_resnet.py:aa_resnet50"),
                        "--config.model.attention.attention_impl=pallas",
                        "--config.model.attention.remat=True",
                        "--config.model.attention.num_heads=4",
                        "--config.model.attention_pool_stages=(1,2)",
                        "--config.model.width=32")
  model = trainer.build_model(config, num_classes=10, dtype=jnp.float32)
  assert (model.attention.attention_impl, model.attention.remat) == ("pallas", True)
  assert model.attention.num_heads == 4 and model.width == 32
  assert tuple(model.attention_pool_stages) == (1, 2)
  # Unset keys keep the registry's values.
  assert model.attention.key_ratio == 0.2 and tuple(model.stage_sizes) == (3, 4, 6, 3)


def test_model_settings_that_do_not_apply_are_refused():
  config = config_utils.load_config(str(REPO_ROOT / "configs" / "default.py"))
  config.model.depth = 16
  with pytest.raises(ConfigError, match=r"config.model.depth=16 does not apply to "
                                        r"'aa_resnet_tiny' \(a ResNet\).*WideResNet"):
    trainer.build_model(config, num_classes=10, dtype=jnp.float32)
  config = config_utils.load_config(str(REPO_ROOT / "configs" / "cifar.py:wrn28_10"))
  config.model.attention.num_heads = 4
  with pytest.raises(ConfigError, match="has no attention"):
    trainer.build_model(config, num_classes=10, dtype=jnp.float32)


def test_override_key_typos_name_the_closest_keys():
  config = config_utils.base_config()
  config_utils.check_override_keys(config, ["num_epochs", "model.attention.remat", "model"])
  with pytest.raises(ConfigError, match=r"--config.num_epoch: no such config key; closest: "
                                        r"num_epochs"):
    config_utils.check_override_keys(config, ["num_epochs", "num_epoch"])
  with pytest.raises(ConfigError, match="closest: model.attention.attention_impl"):
    config_utils.check_override_keys(config, ["model.attention.attention_imp"])


def test_load_config_reports_bad_files_and_arguments_as_config_errors():
  with pytest.raises(ConfigError, match=r"does not exist\. Files there: .*cifar.py"):
    config_utils.load_config(str(REPO_ROOT / "configs" / "cifr.py"))
  with pytest.raises(ConfigError, match=r"cifar.py:aa_wrn28-10: .*valid models"):
    config_utils.load_config(str(REPO_ROOT / "configs" / "cifar.py:aa_wrn28-10"))


def test_bare_config_names_find_the_shipped_configs_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shipped = config_utils.load_config(str(REPO_ROOT / "configs" / "default.py"))
  assert config_utils.load_config("default.py").to_dict() == shipped.to_dict()
  assert config_utils.load_config("cifar.py:aa_wrn28_10").model.name == "aa_wrn28_10"
  (tmp_path / "mine.py").write_text(
      "from aa_flax.config_utils import base_config\n"
      "def get_config():\n  config = base_config()\n  config.seed = 7\n  return config\n")
  assert config_utils.load_config("mine.py").seed == 7  # a file here is a path, as before


def test_command_line_takes_bare_config_names_as_the_shipped_files(tmp_path, monkeypatch):
  from aa_flax import cli
  monkeypatch.chdir(tmp_path)
  cifar = f"{config_utils.shipped_configs_dir()}/cifar.py:aa_wrn28_10"
  assert cli._checked_argv(["t", "--config=cifar.py:aa_wrn28_10", "--config.seed=1"]) == \
      ["t", f"--config={cifar}", "--config.seed=1"]
  assert cli._checked_argv(["t", "--config", "cifar.py:aa_wrn28_10"]) == ["t", "--config", cifar]
  path = str(REPO_ROOT / "configs" / "default.py")
  assert cli._checked_argv(["t", f"--config={path}"]) == ["t", f"--config={path}"]


def test_missing_config_names_the_shipped_configs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shipped = "cifar.py, cifar10_evidence.py, default.py, imagenet_mnasnet.py, imagenet_resnet.py"
  with pytest.raises(ConfigError, match=r"^No config file 'defualt.py' here and no shipped "
                                        rf"config of that name; shipped: {shipped}\.$"):
    config_utils.load_config("defualt.py")
  with pytest.raises(ConfigError, match=rf"'configs/default.py' does not exist\. .*"
                                        rf"shipped configs by bare name .*: {shipped}\.$"):
    config_utils.load_config("configs/default.py:x")


def test_train_py_mistakes_print_one_line_and_write_nothing(tmp_path):
  """A typo'd key (top-level and nested), a bad config argument and a missing config file:
  one line, exit 1."""
  workdir = tmp_path / "w"
  for args, expected in [
      (["--config.num_epoch=1"], "closest: num_epochs"),
      (["--config.optimizer.learning_rat=0.1"], "--config.optimizer.learning_rat: no such config"),
      (["--config=configs/cifar.py:aa_wrn28-10"], "valid models"),
      (["--config=configs/nope.py"], "does not exist"),
      (["--config=nope.py"], "shipped: cifar.py,"),
  ]:
    run = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), f"--workdir={workdir}",
                          *args], env=subprocess_env(), capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=120)
    assert run.returncode == 1, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not workdir.exists()


def test_installed_package_requires_every_runtime_dependency():
  """``pip install .`` must bring everything training needs: requirements.txt is the one list."""
  required = {r.split(";")[0].replace(" ", "") for r in importlib.metadata.requires("aa_flax")}
  lines = [line.split("#")[0].strip() for line in
           (REPO_ROOT / "requirements.txt").read_text().splitlines()]
  listed = {line.replace(" ", "") for line in lines if line}
  normalise = lambda spec: "".join(sorted(spec.lower()))  # noqa: E731 - specifier order varies
  assert {normalise(s) for s in listed} <= {normalise(s) for s in required}


def test_version_is_the_package_metadata_version():
  import tomllib

  import aa_flax
  pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
  assert aa_flax.__version__ == importlib.metadata.version("aa_flax") \
      == pyproject["project"]["version"]


@pytest.mark.parametrize("source", ["base_config", "load_config"])
def test_assigning_a_key_that_does_not_exist_is_refused_with_the_closest_keys(source):
  config = (config_utils.base_config() if source == "base_config"
            else config_utils.load_config(str(REPO_ROOT / "configs" / "default.py")))
  config.num_train_steps = 30  # existing keys take new values
  config.optimizer.weight_decay = 0.0
  with pytest.raises(ConfigError, match=r"^config.num_train_step: no such config key; "
                                        r"closest: num_train_steps\b[^\n]*$"):
    config.num_train_step = 30
  with pytest.raises(ConfigError, match=r"^config.optimizer.wieght_decay: no such config key; "
                                        r"closest: optimizer.weight_decay\b[^\n]*$"):
    config.optimizer.wieght_decay = 0.0
  with pytest.raises(ConfigError, match="closest: model.attention.num_heads"):
    config.model.attention["num_head"] = 4
  assert "num_train_step" not in config and config.num_train_steps == 30


def test_resume_mismatch_advice_names_the_flag_and_the_python_spelling():
  with pytest.raises(ConfigMismatchError) as error:
    config_utils.check_resume_config([("seed", 0, 3)], allow_mismatch=False)
  assert "--config.allow_config_mismatch=True" in str(error.value)
  assert "config.allow_config_mismatch = True" in str(error.value)


def test_model_name_typos_name_the_closest_models_first_briefly():
  config = config_utils.load_config(str(REPO_ROOT / "configs" / "default.py"))
  config.model.name = "aa_resnet_tinyy"
  with pytest.raises(ConfigError) as error:
    trainer.build_model(config, num_classes=10, dtype=jnp.float32)
  message = str(error.value)
  assert re.search(r"unknown model 'aa_resnet_tinyy'; closest: aa_resnet_tiny\b", message)
  assert len(message) < 300 and "\n" not in message
