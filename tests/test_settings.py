"""The one settings mechanism: typed values parsed once, every for_scale class, one error type."""

import pickle

import pytest

from labkit.attention_cost import CostConfig
from labkit.cluster import preflight
from labkit.cluster.jobscript import job_directives
from labkit.cluster.slurm import lifetime_args
from labkit.config import ConfigError, Profile, ScaleSettings, load_config
from labkit.data.config import DataConfig
from labkit.hardware.measure import MeasureConfig
from labkit.prune.config import PruneConfig
from labkit.semantic_search import SearchConfig
from labkit.serve.config import ServeConfig
from labkit.serve.load import LoadPreset
from labkit.settings import Duration, Memory, Settings, Walltime
from labkit.train import TrainConfig

# every ScaleSettings class, with one of its whole-number keys
SCALED = {TrainConfig: "max_steps", DataConfig: "vocab_size", PruneConfig: "train_steps",
          ServeConfig: "max_new_tokens", SearchConfig: "max_docs", MeasureConfig: "matmul_n",
          CostConfig: "batch", LoadPreset: "requests"}


def _user_file(tmp_path, monkeypatch, text: str):
    path = tmp_path / "user.yaml"
    path.write_text(text)
    monkeypatch.setenv("LABKIT_USER_CONFIG", str(path))
    return path


@pytest.mark.parametrize("text, seconds", [
    ("30", 1800), ("05:30", 330), ("01:30:00", 5400), ("1-02", 93600), ("1-02:30", 95400),
    ("1-02:30:15", 95415), (90, 5400),
])
def test_walltime_forms(text, seconds):
    w = Walltime(text)
    assert w.seconds == seconds and isinstance(w, str) and w == str(text)


@pytest.mark.parametrize("bad", ["1:99:00", "00:10:75", "abc", "0", "", "1:2:3:4", "one hour", True, 1.5])
def test_walltime_refuses_bad_forms_naming_the_key(bad):
    with pytest.raises(ConfigError, match="walltime.*write it like '01:30:00'"):
        Walltime(bad, "walltime")


@pytest.mark.parametrize("text, size", [("4G", 4 * 10**9), ("500M", 500 * 10**6), ("16GB", 16 * 10**9),
                                        ("4GiB", 4 * 2**30), ("1.5GB", 15 * 10**8), (4096, 4096)])
def test_memory_forms(text, size):
    assert Memory(text).bytes == size


@pytest.mark.parametrize("bad", ["lots", "0", "0GB", "4 parsecs", "-1G", -5])
def test_memory_refuses_bad_forms_naming_the_key(bad):
    with pytest.raises(ConfigError, match=r"memory_limit=.*write it like '4GiB'"):
        Memory(bad, "memory_limit")


def test_duration_forms():
    assert [Duration(t).seconds for t in ("55m", "30s", "1h", "00:04:00", "90", "2 minutes")] == [
        3300, 30, 3600, 240, 90, 120]
    with pytest.raises(ConfigError, match="lifetime='soon' as a duration"):
        Duration("soon", "lifetime")


def test_typed_values_survive_pickle_and_a_job_script():
    w = pickle.loads(pickle.dumps(Walltime("01:00:00")))
    assert type(w) is Walltime and w.seconds == 3600
    prof = load_config().profile("slurm").replace(walltime="02:00:00", memory="8GiB")
    assert isinstance(prof.walltime, Walltime) and isinstance(prof.memory, Memory)
    assert "--time=02:00:00" in job_directives(prof, 0, prof.memory.bytes)
    assert pickle.loads(pickle.dumps(prof)) == prof


def test_profile_types_are_read_once_at_load(tmp_path, monkeypatch):
    """Preflight, the lifetime flags and the job script use .seconds/.bytes: nothing parses again."""
    prof = load_config().profile("slurm").replace(walltime="01:00:00", lifetime="20m", lifetime_stagger="1m")

    def no_second_read(cls, text, key):
        raise AssertionError(f"{cls.__name__} {text!r} parsed again after load")

    for typ in (Walltime, Duration, Memory):
        monkeypatch.setattr(typ, "_read", classmethod(no_second_read))
    assert lifetime_args(prof) == ["--lifetime", "20m", "--lifetime-stagger", "1m"]
    assert lifetime_args(prof.model_copy(update={"lifetime": None, "signal": None})) == [
        "--lifetime", "3300s", "--lifetime-stagger", "60s"]
    preflight._check_lifetime(prof, "here")  # 20m + 1m ends before the walltime
    assert "--time=01:00:00" in job_directives(prof, 0, prof.memory.bytes)


@pytest.mark.parametrize("key, value, needle", [
    ("gpus_per_worker", -1, "gpus_per_worker must be 0 or more, not -1"),
    ("gpus_per_worker", "2", "gpus_per_worker must be a valid integer, not '2'"),
    ("walltime", "1:99:00", "profiles.slurm.walltime: cannot read walltime='1:99:00'"),
    ("memory", "lots", "profiles.slurm.memory: cannot read memory='lots'"),
    ("kind", "pbs", "kind must be 'local', 'slurm' or 'kubernetes', not 'pbs'"),
    ("walltimes", "01:00:00", "unknown profile key profiles.slurm.walltimes; valid keys: .*walltime"),
])
def test_bad_profile_file_names_file_key_and_valid_values(tmp_path, monkeypatch, key, value, needle):
    path = _user_file(tmp_path, monkeypatch, f"profiles:\n  slurm:\n    {key}: {value!r}\n")
    with pytest.raises(ConfigError, match=needle) as err:
        load_config()
    assert str(err.value).startswith(f"{path}: ")
    assert "Profile:" not in str(err.value)  # pydantic took labkit's __init__ as its own (no double wrap)


def test_profile_from_yaml_numbers_and_single_lines(tmp_path, monkeypatch):
    _user_file(tmp_path, monkeypatch, "profiles:\n  slurm:\n    account: 1234\n    prologue: module load cuda\n"
                                      "    memory: 4096\n")
    prof = load_config().profile("slurm")
    assert prof.account == "1234" and prof.prologue == ("module load cuda",) and prof.memory.bytes == 4096


def test_direct_construction_raises_config_error():
    with pytest.raises(ConfigError, match="ServeConfig: max_queue must be positive, not 0"):
        ServeConfig(max_queue=0)
    with pytest.raises(ConfigError, match="Profile: workers_per_job must be 1 or more"):
        Profile(name="x", workers_per_job=0)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("cls", list(SCALED), ids=lambda c: c.__name__)
def test_every_for_scale_class_shares_the_mechanism(cls, tmp_path, monkeypatch):
    assert issubclass(cls, ScaleSettings) and issubclass(cls, Settings) and cls.section
    assert set(cls.presets) == {"tiny", "binder", "workshop", "full"}
    tiny = cls.for_scale("tiny")
    assert isinstance(tiny, cls) and cls.for_scale() == tiny  # LABKIT_SCALE=tiny (conftest)
    key = SCALED[cls]
    assert getattr(cls.for_scale("tiny", **{key: 7}), key) == 7
    assert getattr(tiny.replace(**{key: 9}), key) == 9 and getattr(tiny, key) != 9  # a copy
    with pytest.raises(ConfigError, match=rf"scales\.tiny\.{cls.section}: unknown {cls.section} key bogus; "
                                          rf"valid keys: .*{key}"):
        cls.for_scale("tiny", bogus=1)
    with pytest.raises(ConfigError, match=rf"{key} must be a valid integer, not '7'"):
        cls.for_scale("tiny", **{key: "7"})
    with pytest.raises(ConfigError, match="unknown scale 'huge'; valid scales: tiny, binder, workshop, full"):
        cls.for_scale("huge")
    _user_file(tmp_path, monkeypatch, f"scales:\n  mini:\n    description: mine\n  tiny:\n    {cls.section}:\n"
                                      f"      {key}: 5\n")
    assert getattr(cls.for_scale("tiny"), key) == 5  # the config files' section
    assert getattr(cls.for_scale("tiny", **{key: 6}), key) == 6  # then the overrides
    with pytest.raises(ConfigError, match=rf"no {cls.section} preset for scale 'mini'; valid scales: tiny, binder"):
        cls.for_scale("mini")


def test_a_bad_section_in_a_config_file_names_scale_and_key(tmp_path, monkeypatch):
    _user_file(tmp_path, monkeypatch, "scales:\n  tiny:\n    serve:\n      max_batch_size: '8'\n")
    with pytest.raises(ConfigError, match=r"scales\.tiny\.serve: max_batch_size must be a valid integer, not '8'"):
        ServeConfig.for_scale("tiny")


def test_train_config_nested_model_and_pickle():
    c = TrainConfig.for_scale("tiny", n_layer=3, model={"n_head": 4, "n_embd": 64})
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd, c.scale) == (3, 4, 64, "tiny")
    assert pickle.loads(pickle.dumps(c)) == c  # it travels to Dask workers
    with pytest.raises(ConfigError, match="model: n_embd=64 is not divisible by n_head=3"):
        c.replace(n_head=3)
    with pytest.raises(ConfigError, match="min_lr <= lr"):
        c.replace(lr=1e-3, min_lr=1e-2)


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path, monkeypatch):
    """PyYAML reads `lr: 1e-3` as a string (YAML 1.1); a settings file means the number."""
    _user_file(tmp_path, monkeypatch, "scales:\n  tiny:\n    train:\n      lr: 1e-3\n      min_lr: 5E-5\n"
               "      weight_decay: +2.5e-1\n")
    config = TrainConfig.for_scale("tiny")
    assert (config.lr, config.min_lr, config.weight_decay) == (1e-3, 5e-5, 0.25)
    # a quoted value is still the string the user wrote, and refused as such
    _user_file(tmp_path, monkeypatch, "scales:\n  tiny:\n    train:\n      lr: '1e-3'\n")
    with pytest.raises(ConfigError, match=r"lr must be a valid number, not '1e-3'"):
        TrainConfig.for_scale("tiny")
