import re

import pytest

from vascdist.config import Config, config_from_dict, load_config, to_dict
from vascdist.errors import ConfigError


def test_overrides_beat_file_beat_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.2\ndata:\n  batch_size: 32\n")
    cfg = load_config(path, ["optim.lr=0.01", "model.width=0.5"])
    assert cfg.optim.lr == 0.01 and cfg.data.batch_size == 32 and cfg.model.width == 0.5
    assert cfg.train.epochs == Config().train.epochs


def test_round_trip_through_dict():
    cfg = load_config("quickstart")
    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("optim.lr=-1", "config key 'optim.lr' must be > 0"),
    ("data.batch_size=abc", "config key 'data.batch_size' must be int"),
    ("model.stem=huge", "config key 'model.stem'"),
    ("train.grad_accum=3", "config key 'data.batch_size' (64) must be divisible by the number of ranks x 'train.grad_accum' (1 x 3 = 3)"),
    ("optim=3", "config key 'optim' must be a mapping"),
    ("nonsense", "must look like section.key=value"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'; did you mean 'train.epochs'"):
        load_config(path)


def test_shipped_configs_load():
    for name in ("quickstart", "resnet50"):
        load_config(name)


@pytest.mark.parametrize("old, new", [("data.num_workers", "data.reader_threads"),
                                      ("data.prefetch_factor", "data.windows_ahead"),
                                      ("optim.gamma", "optim.bound_gamma")])
def test_a_renamed_key_names_its_new_name(tmp_path, old, new):
    message = f"config key '{old}' was renamed to '{new}'; use '{new}'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [f"{old}=1"])
    section, name = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {name}: 1\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)
    saved = to_dict(Config())  # a run directory's or checkpoint's config written before the rename: moved
    del saved[section][new.split(".")[1]]
    value = 0.5 if new == "optim.bound_gamma" else 3  # a valid value of the key
    saved[section][name] = value
    assert config_from_dict(saved) == load_config(None, [f"{new}={value}"])


def test_loader_choice_is_checked():
    assert Config().data.loader == "threads"
    with pytest.raises(ConfigError, match="config key 'data.loader' must be 'threads' or 'dataloader'"):
        load_config(None, ["data.loader=processes"])


def test_a_run_saved_before_the_rename_resumes():
    from vascdist.config.drift import check_resume
    saved = to_dict(Config())  # a run directory's config.yaml written before the rename and before data.loader
    data = saved["data"]
    data["num_workers"] = data.pop("reader_threads")
    data["prefetch_factor"] = data.pop("windows_ahead")
    for key in ("loader", "workers", "worker_prefetch_factor", "persistent_workers", "transform"):
        del data[key]
    assert check_resume(Config(), saved) == {}
    assert check_resume(load_config(None, ["data.reader_threads=4", "data.loader=dataloader"]), saved) == {
        "data.loader": ("threads", "dataloader"), "data.reader_threads": (2, 4)}
    with pytest.raises(ConfigError, match="data.transform"):  # not a resume-safe change
        check_resume(load_config(None, ["data.transform=json:dumps"]), saved)
