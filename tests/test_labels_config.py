import dataclasses
import os

import pytest
import yaml

from ranzcr_tf import labels
from ranzcr_tf.config import PRESET_DIR, given_keys, load_config, read_yaml, save_config


def test_label_order_is_the_submission_order():
    assert labels.LABELS == (
        "ETT - Abnormal", "ETT - Borderline", "ETT - Normal",
        "NGT - Abnormal", "NGT - Borderline", "NGT - Incompletely Imaged", "NGT - Normal",
        "CVC - Abnormal", "CVC - Borderline", "CVC - Normal",
        "Swan Ganz Catheter Present",
    )
    assert labels.NUM_CLASSES == 11
    assert labels.SUBMISSION_COLUMNS == ("StudyInstanceUID", *labels.LABELS)
    assert labels.TRAIN_COLUMNS == ("StudyInstanceUID", *labels.LABELS, "PatientID")


def test_groups_cover_labels_in_order():
    sizes = {name: len(members) for name, members in labels.GROUPS.items()}
    assert sizes == {"ETT": 3, "NGT": 4, "CVC": 3, "Swan Ganz": 1}
    flattened = [label for members in labels.GROUPS.values() for label in members]
    assert tuple(flattened) == labels.LABELS
    for name, sl in labels.group_slices().items():
        assert labels.LABELS[sl] == labels.GROUPS[name]
        for label in labels.LABELS[sl]:
            assert labels.group_of(label) == name
    with pytest.raises(ValueError, match="unknown label"):
        labels.group_of("PICC - Normal")


@pytest.mark.parametrize("preset", sorted(p for p in os.listdir(PRESET_DIR) if p.endswith(".yaml")))
def test_every_preset_loads_and_validates(preset):
    path = os.path.join(PRESET_DIR, preset)
    cfg = load_config(path)
    cfg.validate()  # validated once by load_config; the loaded object passes again
    loaded = cfg.to_dict()
    for key in given_keys(path):  # every value the preset sets reads back from the config as written
        written, value = read_yaml(path), loaded
        for part in key.split("."):
            written, value = written[part], value[part]
        assert _plain(value) == _plain(written), (preset, key, value, written)


def _plain(value):
    """Tuples as lists and numbers as floats, so a value compares equal to the YAML that wrote it."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def test_mission_preset_is_b7_at_768():
    cfg = load_config(os.path.join(PRESET_DIR, "b7_768_tpu.yaml"))
    assert cfg.model.backbone == "efficientnet_b7" and cfg.preprocess.image_size == 768


def test_load_override_validate_save_roundtrip(tmp_path):
    cfg = load_config(os.path.join(PRESET_DIR, "cpu_demo.yaml"),
                      ["train.epochs=3", "model.weights=none", "augment.hflip_prob=0.25",
                       "infer.tta=[identity]", "model.backbone=efficientnet_b3", "train.jit_compile=true"])
    assert cfg.train.epochs == 3 and cfg.model.weights is None
    assert cfg.augment.hflip_prob == 0.25 and cfg.infer.tta == ["identity"]
    assert cfg.model.backbone == "efficientnet_b3" and cfg.train.jit_compile is True
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, str(path))
    saved = yaml.safe_load(path.read_text())
    meta = saved["_meta"]
    assert "keras" in meta["versions"] and "created" in meta and "git_revision" in meta
    again = load_config(str(path))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert not [p for p in os.listdir(path.parent) if p.startswith(".tmp-")]


def test_misspelt_key_is_named():
    with pytest.raises(ValueError, match=r"unknown config key 'train\.epoch'"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(ValueError, match=r"unknown config key 'trian'"):
        load_config(None, ["trian.epochs=3"])


def test_misspelt_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  backbon: efficientnet_b0\n")
    with pytest.raises(ValueError, match=r"model\.backbon"):
        load_config(str(path))


@pytest.mark.parametrize("override, message", [
    ("train.epochs=zero", r"train\.epochs"),
    ("train.epochs=0", r"train\.epochs = 0 is invalid"),
    ("augment.hflip_prob=1.5", r"augment\.hflip_prob"),
    ("model.pooling=median", r"model\.pooling = 'median' is invalid: expected avg, gem, max or avgmax"),
    ("train.jit_compile=maybe", r"train\.jit_compile"),
    ("train.epochs", r"section\.key=value"),
])
def test_bad_values_are_rejected_with_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_missing_preset_lists_presets():
    with pytest.raises(ValueError, match="cpu_demo"):
        load_config("configs/nope.yaml")


CLUSTER = ["distribute.coordinator=10.0.0.1:1234", "distribute.num_processes=2"]


@pytest.mark.parametrize("overrides, message", [
    ([*CLUSTER, "distribute.process_id=2"], r"distribute\.process_id = 2 is invalid: processes are numbered 0\.\.1"),
    (["distribute.coordinator=10.0.0.1:1234"], r"distribute\.coordinator given without distribute\.num_processes, "
                                               r"distribute\.process_id"),
    (["distribute.num_processes=2", "distribute.process_id=0"], r"without distribute\.coordinator"),
    (["distribute.coordinator=10.0.0.1", "distribute.num_processes=2", "distribute.process_id=0"], r"HOST:PORT"),
    ([*CLUSTER, "distribute.process_id=0", "distribute.multi_process=off"], r"multi_process = 'off' contradicts"),
    (["distribute.multi_process=maybe"], r"distribute\.multi_process = 'maybe' is invalid: expected auto, on or off"),
    (["distribute.num_processes=0"], r"distribute\.num_processes = 0 is invalid"),
])
def test_bad_distribute_settings_say_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_distribute_settings_load_and_default_to_the_environment():
    cfg = load_config(None, [*CLUSTER, "distribute.process_id=1"])
    assert (cfg.distribute.coordinator, cfg.distribute.num_processes, cfg.distribute.process_id) == \
        ("10.0.0.1:1234", 2, 1)
    default = load_config(None, []).distribute
    assert (default.multi_process, default.coordinator, default.num_processes, default.process_id) == \
        ("auto", "", None, None)


def test_saved_config_does_not_rejoin_the_cluster(tmp_path):
    """A run's config.yaml keeps the cluster in ``_meta`` only: reused elsewhere, it trains alone."""
    cfg = load_config(None, [*CLUSTER, "distribute.process_id=0", "train.epochs=3"])
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    assert yaml.safe_load(path.read_text())["_meta"]["distribute"]["coordinator"] == "10.0.0.1:1234"
    again = load_config(str(path))
    assert again.train.epochs == 3
    assert (again.distribute.coordinator, again.distribute.num_processes, again.distribute.process_id) == ("", None, None)
