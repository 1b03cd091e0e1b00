"""params.yaml validation: every bad value is refused with a message naming key, value and allowed values."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, set_dotted, to_dict
from pipeline.params import METHODS, Params, load_params

ROOT = Path(__file__).resolve().parents[1]


def write_params(tmp_path, **overrides):
    data = set_dotted(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_project_params_load_and_round_trip():
    params = load_params(ROOT / "params.yaml")
    assert params.augself.lambda_ == 1.0
    assert params.data.downstream[:3] == ["cfmnist/class", "cfmnist/color", "cfmnist/hue"]
    again = load_params(ROOT / "params.yaml", overrides={})
    assert to_dict(again) == to_dict(params)


# (key, value, texts the error must contain); tests/test_refusals.py runs each through a stage too.
BAD_VALUES = [
    ("ssl.methods", ["simclr", "swav"], ["ssl.methods", "'swav'", "simclr, simsiam, moco, byol"]),
    ("ssl.backbone", "vit_b", ["ssl.backbone", "'vit_b'", "resnet_small, resnet18, resnet50"]),
    ("augself.augmentations", ["crop", "cutout"], ["augself.augmentations", "'cutout'",
                                                   "crop, flip, color, blur, rotation, solarize"]),
    ("augself.augmentations", ["crop", "rotation"], ["augself.augmentations", "'rotation'", "augment.rotation_p"]),
    ("augment.color_strength", "extreme", ["augment.color_strength", "'extreme'", "weak, default, strong"]),
    ("augment.order", ["flip", "crop", "color", "solarize", "grayscale", "blur", "rotation"],
     ["augment.order", "crop first"]),
    ("augment.order", ["crop", "flip", "color"], ["augment.order", "every op exactly once"]),
    ("augment.rotation_p", 1.5, ["augment.rotation_p", "1.5"]),
    ("augself.lambda", -0.5, ["augself.lambda", "-0.5", "[0, inf]"]),
    ("augself.lambda", "high", ["augself.lambda", "expected a number", "'high'"]),
    ("data.pretrain", "imagenet", ["data.pretrain", "'imagenet'", "data.datasets"]),
    ("ssl.epochs", 0, ["ssl.epochs", "0"]),
    ("ssl.amp", "fp8", ["ssl.amp", "'fp8'", "auto, bf16, fp16, off"]),
    ("augment.crop_scale", [0.5, 0.2], ["augment.crop_scale[1]", "0.2"]),
    ("ssl.simclr.temperature", 0, ["ssl.simclr.temperature", "0"]),
    ("eval.fewshot.shots", [0, 5], ["eval.fewshot.shots[0]"]),
    ("eval.linear.tol", 0, ["eval.linear.tol", "0"]),
]


@pytest.mark.parametrize("key, value, expected", BAD_VALUES)
def test_bad_values_are_refused_with_key_value_and_allowed(tmp_path, key, value, expected):
    path = write_params(tmp_path, **{key: value})
    with pytest.raises(ConfigError) as err:
        load_params(path)
    for text in expected:
        assert text in str(err.value), (text, str(err.value))


def test_unknown_key_lists_allowed_keys(tmp_path):
    path = write_params(tmp_path, **{"augself.lamda": 0.5})
    with pytest.raises(ConfigError, match=r"augself.lamda: unknown key; allowed keys under augself: .*lambda"):
        load_params(path)


# The stage-level refusals (exit code 2, one error line, workspace untouched) run in a temporary
# project in tests/test_refusals.py, not in the repository.


def test_group_hash_ignores_seed_lambda_and_method_list():
    a, b = Params(), Params()
    b.seed, b.augself.lambda_, b.ssl.methods = 3, 0.25, ["simclr"]
    assert a.group_hash() == b.group_hash()
    b.ssl.epochs = 7
    assert a.group_hash() != b.group_hash()


def test_methods_tuple_matches_registry():
    from pipeline.methods import METHODS as REGISTRY

    assert set(REGISTRY) == set(METHODS)


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "presets").glob("*.yaml")))
def test_presets_are_valid_params_files(preset):
    """Every preset loads and names only registered datasets and tasks."""
    from pipeline.cli import check_dataset_entries

    params = load_params(ROOT / "presets" / preset)
    check_dataset_entries(params)
    assert params.ssl.backbone == "resnet18" and params.ssl.epochs == 200
