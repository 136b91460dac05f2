import pytest
import yaml

from dlip_ds.config import (
    ConfigError,
    KDTerm,
    ModelConfig,
    Recipe,
    model_config_from_dict,
    to_dict,
)
from dlip_ds.recipe import load_recipe, parse_override, recipe_from_dict, save_recipe

SMALL_MODEL = {
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2},
    "text": {"vocab_size": 100, "width": 32, "depth": 2, "heads": 2, "intermediate": 64},
    "fusion": {"layers": 1},
}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_parse_override_reads_yaml_scalars():
    assert parse_override("student.vision.depth=6") == {"student": {"vision": {"depth": 6}}}
    assert parse_override("train.lr=1e-4") == {"train": {"lr": 1e-4}}
    assert parse_override("data.train_shards=[a.tar, b.tar]") == {"data": {"train_shards": ["a.tar", "b.tar"]}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("student.vision.depth")


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = write(tmp_path, "r.yaml", {"train": {"max_step": 10}})
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step' \(did you mean 'max_steps'\?\)"):
        load_recipe(str(path))


def test_unknown_nested_model_key(tmp_path):
    path = write(tmp_path, "r.yaml", {"student": {**SMALL_MODEL, "vision": {"dept": 3}}})
    with pytest.raises(ConfigError, match=r"student.vision.dept.*did you mean 'depth'"):
        load_recipe(str(path))


def test_width_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"vision.width=30 is not divisible by .*heads=4"):
        model_config_from_dict({"vision": {"width": 30, "heads": 4}})
    with pytest.raises(ConfigError, match=r"text.width=33"):
        model_config_from_dict({"text": {"width": 33, "heads": 2}})


def test_fusion_layers_beyond_text_depth():
    with pytest.raises(ConfigError, match="fusion.layers=5 exceeds text.depth=2"):
        model_config_from_dict({**SMALL_MODEL, "fusion": {"layers": 5}})


def test_type_errors_name_the_field(tmp_path):
    path = write(tmp_path, "r.yaml", {"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        load_recipe(str(path))


def test_overrides_and_base_inheritance(tmp_path):
    write(tmp_path, "base.yaml", {"student": SMALL_MODEL, "train": {"max_steps": 7, "lr": 3e-4}})
    child = write(tmp_path, "child.yaml", {"base": "base.yaml", "train": {"max_steps": 9}})
    r = load_recipe(str(child), ["student.vision.depth=3", "train.warmup_steps=2"])
    assert r.train.max_steps == 9 and r.train.lr == pytest.approx(3e-4) and r.train.warmup_steps == 2
    assert r.student.model.vision.depth == 3 and r.student.model.text.width == 32
    assert r.name == "child"


def test_kd_terms_validated_with_their_index():
    base = {"teacher": {"source": "t"}, "student": SMALL_MODEL}
    bad_kind = {**base, "loss": {"kd": [{"kind": "repr"}, {"kind": "attention"}]}}
    with pytest.raises(ConfigError, match=r"loss.kd\[1\].kind"):
        recipe_from_dict(bad_kind)
    bad_cross = {**base, "loss": {"kd": [{"kind": "attn", "module": "vision", "attn": "cross"}]}}
    with pytest.raises(ConfigError, match=r"loss.kd\[0\]: cross-attention exists only"):
        recipe_from_dict(bad_cross)
    bad_layers = {**base, "loss": {"kd": [{"kind": "repr", "layers": [[0, 1, 2]]}]}}
    with pytest.raises(ConfigError, match=r"loss.kd\[0\].layers"):
        recipe_from_dict(bad_layers)
    no_teacher = {"student": SMALL_MODEL, "loss": {"kd": [{"kind": "repr"}]}}
    with pytest.raises(ConfigError, match="teacher.source is empty"):
        recipe_from_dict(no_teacher)


def test_missing_recipe_file_and_unknown_shipped_name(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="no recipe 'no-such-recipe'"):
        load_recipe("no-such-recipe")


def test_save_and_reload_round_trip(tmp_path):
    r = recipe_from_dict({"teacher": {"source": "t"}, "student": SMALL_MODEL,
                          "loss": {"kd": [to_dict(KDTerm(kind="attn", module="fusion", attn="cross"))]}})
    save_recipe(r, tmp_path / "config.yaml")
    again = load_recipe(str(tmp_path / "config.yaml"))
    again.name = r.name
    assert to_dict(again) == to_dict(r)


def test_defaults_are_blip_base_sized():
    cfg = ModelConfig()
    assert (cfg.vision.width, cfg.vision.depth, cfg.text.width, cfg.text.vocab_size) == (768, 12, 768, 30524)
    assert isinstance(Recipe().loss.kd, list)


@pytest.mark.parametrize("section, value, message", [
    ({"loss": {"itc_soft_targets": "momentm"}}, None,
     r"loss.itc_soft_targets must be none\|momentum\|teacher, got 'momentm' \(did you mean 'momentum'\?\)"),
    ({"loss": {"hard_negatives_from": "both"}}, None, r"loss.hard_negatives_from must be teacher\|student"),
    ({"teacher": {"dtype": "fp8"}}, None, r"teacher.dtype must be auto\|fp16\|bf16\|fp32, got 'fp8'"),
    ({"student": {**SMALL_MODEL, "fusion": {"mode": "late"}}}, None, r"student.fusion.mode must be blip\|albef"),
    ({"task": "pretrian"}, None, r"task must be .*pretrain.*did you mean 'pretrain'"),
])
def test_enumerations_are_checked_where_they_are_read(section, value, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(section)


def test_a_kd_module_is_one_enumeration_of_modules_and_logits():
    term = recipe_from_dict({"teacher": {"source": "t"}, "loss": {"kd": [{"kind": "logit", "module": "itm"}]}})
    assert term.loss.kd[0].module == "itm"
    with pytest.raises(ConfigError, match=r"loss.kd\[0\].module must be vision\|text\|fusion\|decoder\|itc\|itm\|lm"):
        recipe_from_dict({"teacher": {"source": "t"}, "loss": {"kd": [{"kind": "repr", "module": "fuson"}]}})


def test_checking_a_recipe_changes_nothing_in_it():
    from dlip_ds.recipe import validate_recipe

    r = recipe_from_dict({"student": SMALL_MODEL})  # pretraining: no teacher
    assert r.loss.hard_negatives_from == "teacher"  # the task draws from the student when no teacher runs
    before = to_dict(r)
    validate_recipe(r)
    assert to_dict(r) == before
