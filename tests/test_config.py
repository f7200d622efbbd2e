"""Config composition, typed schemas, the batch protocol's derived values, and validate()'s errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from normlab.errors import ConfigError
from normlab.validation import INF, host_synced_norm, validate
from normlab.protocol import effective, identity
from normlab.models import MODELS
from normlab.norms import NORMS
from tests.conftest import REPO, TINY, compose_config, run_cli

GROUPS = ["model", "norm", "data", "optim", "schedule", "trainer", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_group_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    assert cfg[group] is not None


def test_the_registries_and_the_config_groups_agree():
    assert set(NORMS) <= set(options("norm"))  # every norm has its config; variants (gn8) name a registered norm
    assert {compose_config([f"norm={option}"]).norm.name for option in options("norm")} == set(NORMS)
    assert set(options("model")) == set(MODELS)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "experiments").glob("*.yaml")))
def test_every_experiment_composes_from_the_experiments_folder(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.name == experiment


@pytest.mark.parametrize("overrides, data, model", [
    ([], "cifar10", "resnet18"),
    (["data=imagenette", "model=imagenet_resnet18"], "imagefolder", "imagenet_resnet18"),
    (["data=cifar10_jpeg"], "imagefolder", "resnet18"),
])
def test_gn_batch_size_composes_for_cifar10_and_an_imagenet_subset(overrides, data, model):
    cfg = compose_config(["experiment=gn_batch_size", *overrides])
    assert (cfg.data.name, cfg.model.name, cfg.name) == (data, model, "gn_batch_size")
    assert (cfg.batch.workers, cfg.trainer.epochs) == (8, 100)


def test_defaults_reproduce_the_paper_protocol():
    cfg = compose_config()
    assert (cfg.batch.per_worker, cfg.batch.workers) == (32, 8)
    eff = effective(cfg)
    assert eff.total_batch == 256 and eff.lr == pytest.approx(0.1)
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4 and cfg.optim.decay_norm_and_bias
    assert list(cfg.schedule.milestones) == [0.3, 0.6, 0.9]


@pytest.mark.parametrize("n, w, lr", [(32, 8, 0.1), (2, 8, 0.00625), (4, 1, 0.0015625), (16, 4, 0.025)])
def test_linear_scaling_rule(n, w, lr):
    cfg = compose_config([f"batch.per_worker={n}", f"batch.workers={w}"])
    assert effective(cfg).lr == pytest.approx(0.1 * n * w / 256) == pytest.approx(lr)
    assert effective(compose_config([f"batch.per_worker={n}", "optim.lr=0.3"])).lr == 0.3


@pytest.mark.parametrize("n", [32, 16, 8, 4, 2])
def test_fixed_total_batch_splits_it_among_total_over_n_workers_with_one_lr(n):
    cfg = compose_config([f"batch.per_worker={n}", "batch.total=32", "batch.workers=null"])
    eff = effective(cfg)
    assert (eff.workers, eff.total_batch, eff.protocol) == (32 // n, 32, "fixed_total")
    assert eff.lr == pytest.approx(0.1 * 32 / 256)  # the linear rule on the total batch: the same for every N
    assert identity(cfg)["protocol"] == "fixed_total" and identity(cfg)["workers"] == 32 // n
    assert effective(compose_config([f"batch.per_worker={n}"])).protocol == "paper"


@pytest.mark.parametrize("overrides, message", [
    (["batch.total=32", "batch.workers=null", "batch.per_worker=3"],
     r"batch\.total=32 is not divisible by batch\.per_worker=3; for batch\.total=32 valid per-worker batches are "
     r"1, 2, 4, 8, 16, 32"),
    (["batch.total=16", "batch.workers=null", "batch.per_worker=32"],
     r"batch\.total=16 is invalid with batch\.per_worker=32: the total batch must be at least one worker's batch"),
    (["batch.total=32", "batch.per_worker=2"],  # batch.workers left at 8
     r"batch\.workers=8 disagrees with batch\.total / batch\.per_worker = 32/2 = 16; set batch\.workers=null"),
    (["batch.workers=null"], r"batch\.workers=None is invalid: set batch\.workers .* or batch\.total"),
    (["batch.total=0", "batch.workers=null"], r"batch\.total=0 is invalid: must be >= 1"),
])
def test_bad_batch_protocols_are_refused_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides))


def test_an_explicit_workers_equal_to_total_over_n_is_accepted():
    assert effective(compose_config(["batch.total=32", "batch.per_worker=4", "batch.workers=8"])).workers == 8


@pytest.mark.parametrize("override, error", [
    ("norm.gropus=4", ConfigCompositionException),
    ("trainer.epoch=3", ConfigCompositionException),
    ("batch.per_worker=many", ConfigCompositionException),
    ("optim.momentum=fast", ConfigCompositionException),
])
def test_typos_and_wrong_types_fail_at_composition(override, error):
    with pytest.raises(error) as err:
        compose_config([override])
    assert isinstance(err.value.__cause__, OmegaConfBaseException)


def test_norm_schema_takes_only_that_norms_options():
    with pytest.raises(ConfigCompositionException):
        compose_config(["norm=ln", "norm.groups=4"])
    cfg = compose_config(["norm=gn", "norm.group_size=16"])
    assert cfg.norm.group_size == 16 and cfg.norm.groups is None


# ---------------------------------------------------------------- validate: bad input, named

@pytest.mark.parametrize("overrides, message", [
    (["batch.per_worker=0"], r"batch\.per_worker=0 is invalid: need at least 1 image per worker"),
    (["batch.workers=0"], r"batch\.workers=0 is invalid: need at least 1 worker"),
    (["trainer.epochs=0"], r"trainer\.epochs=0 is invalid: need at least 1 epoch"),
    (["data=cifar10", "data.root=/nonexistent/cifar"],
     r"data\.root='/nonexistent/cifar' does not hold CIFAR-10 .* and data\.download=false; set data\.download=true"),
    (["data=imagefolder", "data.root=/nonexistent/tree.zip"],
     r"data\.root='/nonexistent/tree\.zip' does not exist"),
    (["model=resnet20", "norm=gn"],
     r"(?s)cannot build model=resnet20 with norm=gn: resnet20: the norm does not fit 7 layer\(s\):\n"
     r".*layer1\.0\.bn2.*groups=32 does not divide num_channels=16"),
    (["data=synthetic", "data.size=4", "model=resnet20", "batch.per_worker=1", "batch.workers=4"],
     r"batch\.per_worker=1 cannot work with norm=bn in resnet20: at layer3\.\d\.bn\d, bn: each worker sees a "
     r"single value per channel .*use a larger per-worker batch or a batch-independent norm"),
    (["data=synthetic", "data.size=32", "model=imagenet_resnet18", "batch.per_worker=1", "batch.workers=1"],
     r"batch\.per_worker=1 cannot work with norm=bn in imagenet_resnet18: at layer4"),
    (["+norm.gropus=4"], r"bn: unknown option\(s\) gropus=4; bn takes: "),  # forced past the schema with '+'
    (["model=resnet18", "model.width=8"], r"model=resnet18: unknown option\(s\) width=8; .*\(model\.\* keys\)"),
    (["model.shortcut=C"], r"cannot build model=resnet20 with norm=bn: shortcut='C' is invalid"),
    (["data.eval_batch=0"], r"data\.eval_batch=0 is invalid: must be >= 1"),
    (["optim.base_lr=0"], r"optim\.base_lr=0\.0 is invalid: must be > 0"),
    (["trainer.threads=0"], r"trainer\.threads=0 is invalid"),
    (["trainer.progress=yes"], r"trainer\.progress='yes' is invalid: valid: auto, true, false"),
    (["data=synthetic", "data.num_train=100"], r"batch\.per_worker × workers = 32 × 8 = 256 is invalid: "
                                               r"data=synthetic has 100 training images"),
    (["norm=brn", "trainer.compile=true"], r"trainer\.compile=True is invalid: torch\.compile does not match eager "
                                             r"for norm=brn"),
    (["trainer.device=tpu"], r"trainer\.device='tpu' is invalid: valid: auto, cpu, cuda, cuda:N"),
])
def test_validate_names_the_key_and_what_is_valid(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides))


def test_per_worker_batch_of_one_is_fine_where_feature_maps_are_larger():
    validate(compose_config(TINY + ["batch.per_worker=1", "batch.workers=8"]))
    validate(compose_config(["data=synthetic", "data.size=32", "model=resnet20", "batch.per_worker=1",
                             "norm=gn", "norm.groups=8"]))


@pytest.mark.parametrize("args, message", [
    (["norm=groupnorm"], "Could not find 'norm/groupnorm'"),
    (["model=resnet19"], "Could not find 'model/resnet19'"),
    (["data=mnist"], "Could not find 'data/mnist'"),
])
def test_unknown_group_names_fail_with_hydras_message(args, message):
    result = run_cli(*args, "--cfg", "job")
    assert result.returncode == 2 and message in result.stderr
    assert "valid options for " in result.stderr and "Traceback" not in result.stderr


def test_bad_input_on_the_cli_is_a_short_message_and_exit_2(tmp_path: Path):
    result = run_cli(*TINY, "batch.per_worker=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "normlab-train: error: batch.per_worker=0 is invalid: need at least 1 image per worker")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", ["../../escape", "a/b", "", "x" * 101])
def test_a_name_that_is_not_one_folder_name_is_refused_before_any_folder_is_made(tmp_path: Path, name):
    result = run_cli(*TINY, f"name={name}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"name={name!r} is invalid: it names the folder results/<name>/" in result.stderr
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "escape").exists()


def test_a_run_folder_name_too_long_for_the_file_system_is_exit_2_with_what_to_do(tmp_path: Path):
    result = run_cli(*TINY, "data.classes=[" + ",".join(f"class{i:03d}" for i in range(60)) + "]", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "a run folder's name is longer than the file system allows" in result.stderr
    assert "give hydra.run.dir (hydra.sweep.subdir in a sweep) a shorter name" in result.stderr


def test_cuda_graph_needs_cuda_and_excludes_compile(tiny):
    with pytest.raises(ConfigError, match="use trainer.cuda_graph or trainer.compile, not both"):
        validate(tiny("trainer.cuda_graph=true", "trainer.compile=true"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"trainer.cuda_graph=True is invalid: CUDA graphs need a CUDA device"):
            validate(tiny("trainer.cuda_graph=true"))
        validate(tiny("trainer.cuda_graph=auto"))  # auto is off on the CPU, not an error
    with pytest.raises(ConfigError, match=r"trainer.cuda_graph='sometimes' is invalid: valid: auto, true, false"):
        validate(tiny("trainer.cuda_graph=sometimes"))


def test_cuda_graph_refuses_a_norm_that_reads_the_host_and_auto_leaves_it_off(tiny):
    from normlab.engine.runtime import resolve_cuda_graph

    cumulative = tiny("norm=bn", "norm.momentum=null", "batch.workers=1")
    with pytest.raises(ConfigError, match=r"trainer.cuda_graph=True is invalid: norm=bn with norm.momentum=null"):
        validate(tiny("norm=bn", "norm.momentum=null", "batch.workers=1", "trainer.cuda_graph=true"))
    cuda = torch.device("cuda")
    assert host_synced_norm(cumulative, 1) and not resolve_cuda_graph("auto", cuda, False, host_synced_norm(cumulative, 1))
    per_worker = tiny("norm=bn", "norm.momentum=null", "batch.workers=2")  # per-worker BN keeps the count on device
    assert not host_synced_norm(per_worker, 2) and resolve_cuda_graph("auto", cuda, False, host_synced_norm(per_worker, 2))


@pytest.mark.parametrize("override, message", [
    ("optim.weight_decay=-1e-4", r"optim\.weight_decay=-0\.0001 is invalid: must be >= 0"),
    ("optim.momentum=1.5", r"optim\.momentum=1\.5 is invalid: must be in \[0, 1\)"),
    ("optim.momentum=1", r"optim\.momentum=1\.0 is invalid: must be in \[0, 1\)"),  # the open end
    ("optim.label_smoothing=1", r"optim\.label_smoothing=1\.0 is invalid: must be in \[0, 1\)"),
    ("trainer.eval_every=0", r"trainer\.eval_every=0 is invalid: must be >= 1"),
    ("trainer.epochs=1" + "0" * 400, r"trainer\.epochs=10+\.\.\.0+ is invalid: too large .*; need at least 1 epoch"),
    ("schedule.gamma=-0.1", r"schedule\.gamma=-0\.1 is invalid: must be in \(0, 1\]"),
    ("schedule.min_lr_factor=-1", r"schedule\.min_lr_factor=-1\.0 is invalid"),
    ("schedule.warmup_start_factor=0", r"schedule\.warmup_start_factor=0\.0 is invalid"),
    ("schedule.warmup_epochs=99", r"schedule\.warmup_epochs=99\.0 is invalid: must be in \[0, trainer\.epochs=30\]"),
    ("seed=-1", r"seed=-1 is invalid: must be an integer in \[0, 2\^32\)"),
    ("seed=4294967296", r"seed=4294967296 is invalid"),
    ("optim.base_lr=inf", r"optim\.base_lr=inf is invalid: must be > 0"),
    ("optim.lr=nan", r"optim\.lr=nan is invalid"),
    ("norm.momentum=2", r"norm\.momentum=2\.0 is invalid: must be in \[0, 1\]"),
    ("data.in_memory_max_gb=-1", r"data\.in_memory_max_gb=-1\.0 is invalid"),
    ("data.train_subset=0", r"data\.train_subset=0 is invalid"),
    ("optim.base_batch=0", r"optim\.base_batch=0 is invalid: must be >= 1"),  # before the lr divides by it
    ("trainer.threads=100000", r"trainer\.threads=100000 is invalid: must be in \[1, 1024\]"),
    ("data.crop_padding=9", r"data\.crop_padding=9 is invalid: must be in \[0, 8\] \(the image size\)"),
    ("model.width=100000000", r"model=resnet20 at model\.width=100000000 \(.* parameters; .*\) needs .* GB, more than"),
    ("+trainer.epoch=3", r"trainer\.epoch is not a normlab key .*did you mean trainer\.epochs\?"),
    ("+seedz=1", r"seedz is not a normlab key .*did you mean seed\?"),
])
def test_out_of_range_values_and_unknown_keys_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config([override]))


def test_every_bounded_key_is_a_key_of_the_config_and_its_ends_are_as_the_text_says():
    """A renamed key would never be checked: each must select a value of the default config (or a group's)."""
    from normlab.validation import RANGES

    configs = {group: compose_config(overrides) for group, overrides in
               {"norm": ["norm=brn"], "data": ["data=synthetic"], "": []}.items()}
    for key, bounds in RANGES.items():
        cfg = configs.get(key.split(".")[0], configs[""])
        assert OmegaConf.select(cfg, key, default="absent") != "absent", key
        low_in, high_in = not bounds.open_low, not bounds.open_high
        assert bounds.admits(bounds.low) is low_in and bounds.admits(bounds.high) is (high_in and bounds.high < INF), key
        assert not bounds.admits(float("nan")) and not bounds.admits(bounds.low - 1), key


@pytest.mark.parametrize("overrides, message", [
    (["norm=evonorm_b0", "eval.bn_stats=batch"], r"eval\.bn_stats='batch' is invalid: precise and batch .*norm=bn"),
    (["norm=syncbn", "eval.bn_stats=precise"], r"eval\.bn_stats='precise' is invalid: .*norm=syncbn keeps"),
    (["norm=brn", "eval.compare_bn_stats=true"], r"eval\.compare_bn_stats=True is invalid: .*norm=brn keeps"),
])
def test_bn_evaluation_modes_are_refused_for_norms_with_statistics_of_their_own_naming_the_key_set(overrides,
                                                                                                  message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides))


@pytest.mark.parametrize("override, message", [
    ("norm=bogus", r"Could not find 'norm/bogus'; valid options for norm: bn, brn, .*gn8"),
    ("optim.momentum=fast", r"optim\.momentum=fast: Value 'fast' of type 'str' could not be converted to Float"),
    ("trainer.epoch=3", r"Could not override 'trainer\.epoch'\. To append to your config use \+trainer\.epoch=3"),
])
def test_hydras_own_errors_come_out_as_one_line_with_exit_code_2(override, message):
    import subprocess
    import sys

    from tests.conftest import REPO

    result = subprocess.run([sys.executable, "-c", "from normlab.train import cli; cli()", override],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normlab-train: error: "), result.stderr
    import re
    assert re.search(message, lines[0]), lines[0]
    assert "_schema" not in result.stderr


def test_help_lists_the_config_groups_without_schema_names():
    import subprocess
    import sys

    from tests.conftest import REPO

    result = subprocess.run([sys.executable, "-c", "from normlab.train import cli; cli()", "--help"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0
    assert "norm: bn, brn, evonorm_b0" in result.stdout and "experiment: demo" in result.stdout
    assert "schema" not in result.stdout.split("== Config ==")[0]


# ---------------------------------------------------------------- one source of defaults

# Files whose every value is the option they name (a model, a data set): their values are choices, not defaults.
CHOICE_GROUPS = ("model", "data")
# Keys that make an option file what it is; anything else a file sets must equal the schema's default.
OPTION_KEYS = {"name"}
EXTRA_OPTION_KEYS = {"norm/gn8.yaml": {"groups"}}  # gn with G=8: the file's whole point


def _yaml(path: Path) -> dict:
    import yaml

    data = yaml.safe_load(path.read_text())
    data.pop("defaults", None)
    return data


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").glob("*/*.yaml")
                                        if p.parent.name not in (*CHOICE_GROUPS, "hydra", "experiment")))
def test_every_yaml_default_equals_its_schemas(path):
    """A value is written once: in the schema (normlab/settings.py, or the norm layer's signature). A YAML file
    that repeats a default must repeat it exactly, so that a saved run without the key means the same job."""
    from normlab.settings import schema_defaults

    group = path.split("/")[0]
    values = _yaml(REPO / "conf" / path)
    defaults = schema_defaults(values.get("name", "gn") if group == "norm" else "bn")[group]
    skip = OPTION_KEYS | EXTRA_OPTION_KEYS.get(path, set())
    differing = {k: (v, defaults.get(k, "<no such key>")) for k, v in values.items()
                 if k not in skip and defaults.get(k, "<no such key>") != v}
    assert not differing, f"conf/{path} differs from its schema (yaml, schema): {differing}"


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO / "conf").as_posix() for group in CHOICE_GROUPS
                                        for p in (REPO / "conf" / group).glob("*.yaml")))
def test_a_choice_file_sets_only_keys_its_schema_has(path):
    """A model or data file's values are the option itself (a differing value is the choice, an equal one
    repeats the default exactly); what it cannot do is set a key the schema does not know."""
    from normlab.settings import schema_defaults

    group = path.split("/")[0]
    unknown = set(_yaml(REPO / "conf" / path)) - set(schema_defaults("bn")[group])
    assert not unknown, f"conf/{path} sets keys its schema does not have: {sorted(unknown)}"


def test_train_yaml_repeats_the_schema_defaults_exactly():
    from normlab.settings import TrainConfig, schema_defaults

    train = _yaml(REPO / "conf" / "train.yaml")
    defaults = schema_defaults("bn")
    assert train["batch"] == defaults["batch"] and train["eval"] == defaults["eval"]
    assert (train["name"], train["seed"]) == (TrainConfig.name, TrainConfig.seed)


@pytest.mark.parametrize("key, value, words", [
    ("schedule.name", "linear", "step, cosine"), ("trainer.precision", "fp16", "auto, fp32, bf16"),
    ("logger.name", "tensorboard", "none, wandb"), ("logger.mode", "sometimes", "offline, online, disabled"),
    ("eval.bn_stats", "median", "ema, precise, batch")])
def test_a_word_outside_a_fixed_set_is_refused_at_composition_listing_the_valid_words(key, value, words):
    from normlab.train import one_line

    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as e:
        compose_config([f"{key}={value}"])
    assert f"Invalid value '{value}', expected one of [{words}]" in one_line(e.value)


def test_a_run_saved_with_the_fixed_words_as_text_is_the_same_job(tiny, tmp_path):
    """config.yaml of earlier versions holds precision, schedule and bn_stats as plain strings: the same job."""
    import yaml

    from normlab.engine.rerun import changed_keys
    from normlab.settings import schema_defaults
    from normlab.validation import resolve_run

    cfg = tiny("trainer.precision=fp32", "schedule=cosine", "eval.bn_stats=precise")
    spec = resolve_run(cfg, validate(cfg))
    saved = yaml.safe_load(spec.config_yaml)
    assert saved["trainer"]["precision"] == "fp32" and type(saved["schedule"]["name"]) is str
    assert changed_keys(saved, spec.recorded_config, schema_defaults("bn")) == []


# ---------------------------------------------------------------- the run spec below the edge

def test_the_engine_and_the_data_run_without_the_config_system():
    """Below the app's edge nothing imports Hydra or OmegaConf: the engine takes the resolved RunSpec."""
    code = ("import sys, normlab.engine.trainer, normlab.data, normlab.engine.optim, normlab.run_spec; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_run_spec_holds_the_resolved_job_and_is_frozen(tiny):
    import dataclasses

    from normlab.validation import resolve_run

    cfg = tiny("batch.workers=null", "batch.total=8", "norm=gn", "norm.groups=4", "trainer.precision=fp32")
    spec = resolve_run(cfg, validate(cfg), threads=3)
    assert (spec.batch.per_worker, spec.batch.workers, spec.batch.total_batch) == (4, 2, 8)
    assert spec.batch.lr == pytest.approx(0.1 * 8 / 256) and spec.batch.protocol == "fixed_total"
    assert spec.norm.options == {"name": "gn", "groups": 4, "eps": 1e-5, "affine": True}
    assert spec.data.shape.train_size == 64 and spec.runtime.threads == 3 and spec.runtime.precision == "fp32"
    assert spec.run_name == "gn-G4-N4xW2-s0"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from normlab.engine.cpu_features import cpu_flags, has_fast_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx2", "avx512f"} and not has_fast_bf16(cpu_flags(info))
    native = tmp_path / "cpuinfo_bf16"  # another file: the flags are read once per file
    native.write_text("processor\t: 0\nflags\t\t: avx512f avx512_bf16\n")
    assert has_fast_bf16(cpu_flags(native))
    assert cpu_flags(tmp_path / "absent") == frozenset()
    reference = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # torch's own (private) check, where it has one
    if reference is not None and Path("/proc/cpuinfo").exists():
        assert has_fast_bf16() == (reference() or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def test_bf16_asked_for_on_a_cpu_that_emulates_it_is_a_warning_and_nowhere_else():
    from normlab.engine.runtime import emulated_bf16
    from normlab.settings import Precision

    cpu, cuda, emulating, native = torch.device("cpu"), torch.device("cuda"), frozenset({"avx2"}), frozenset({"amx_tile"})
    assert "AVX512-BF16 or AMX" in emulated_bf16(Precision.bf16, cpu, emulating)
    assert emulated_bf16(Precision.bf16, cpu, native) is None
    assert emulated_bf16(Precision.fp32, cpu, emulating) is None
    assert emulated_bf16(Precision.bf16, cuda, emulating) is None
