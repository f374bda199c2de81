import re
import subprocess
import sys

import pytest

from conftest import tiny_recipe_dict
from reskd.training.recipe import RECIPE_DIR, RecipeError, load_recipe, parse_recipe


BUNDLED = sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))  # every recipe file: none can be left out


def test_the_bundled_recipes_are_all_checked():
    assert {"fashion-mnist", "fashion-mnist-cpu", "fashion-mnist-reference", "cifar10", "cifar100",
            "tiny-imagenet"} <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipes_parse(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.res_students, "every bundled recipe trains res-students"
    # Every setting carries its reason: each key has, at least once in the file, a comment on its line or
    # right above it (repeated res-student sections need not repeat it).
    lines = (RECIPE_DIR / f"{name}.toml").read_text().splitlines()
    explained, keys = set(), set()
    for i, line in enumerate(lines):
        m = re.match(r"^([a-z_]+)\s*=", line)
        if m and m[1] not in ("name", "seed"):
            keys.add(m[1])
            if "#" in line or (i and lines[i - 1].lstrip().startswith("#")):
                explained.add(m[1])
    assert keys - explained == set(), f"settings without a reason in {name}.toml"


def test_stage_sections_inherit_and_override_train():
    recipe = load_recipe("fashion-mnist-cpu")
    teacher = recipe.teacher.resolve(recipe.train)
    res = recipe.res_students[0].resolve(recipe.train)
    assert teacher.epochs == 12 and res.epochs == 6
    assert teacher.lr == recipe.train.lr and res.grad_clip == 1.0 and teacher.grad_clip is None


@pytest.mark.parametrize("section,field,value,message", [
    ("train", "epochs", 0, "train.epochs: Input should be greater than or equal to 1"),
    ("train", "lr", -0.1, "train.lr: Input should be greater than 0"),
    ("train", "schedule", "linear", "train.schedule: Input should be 'onecycle' or 'cosine'"),
    ("teacher", "arch", "resnet9", "teacher: unknown arch 'resnet9'"),
    ("student", "kd_alpha", 1.5, "student.kd_alpha: Input should be less than or equal to 1"),
    ("data", "dataset", "mnist", "data.dataset: Input should be"),
    ("data", "val_size", -5, "data.val_size: Input should be greater than 0"),
    ("train", "epoch", 3, "train.epoch: unknown field (typo?)"),
])
def test_bad_values_are_named(tmp_path, section, field, value, message):
    recipe = tiny_recipe_dict(tmp_path)
    recipe[section] = {**recipe[section], field: value}
    with pytest.raises(RecipeError) as err:
        parse_recipe(recipe, "my.toml")
    assert "my.toml is invalid" in str(err.value)
    assert message in str(err.value)


def test_res_student_without_any_loss_and_unknown_cascade_member(tmp_path):
    recipe = tiny_recipe_dict(tmp_path)
    recipe["res_students"] = [{"arch": "resnet8", "mse_weight": 0.0}]
    with pytest.raises(RecipeError, match="at least one of mse_weight, ce_weight, kd_weight"):
        parse_recipe(recipe)
    recipe = tiny_recipe_dict(tmp_path)
    recipe["baselines"]["independent_cascade"] = [{"arch": "resnet56"}]
    with pytest.raises(RecipeError, match="names resnet56, which is neither the student nor in baselines.kd_grid"):
        parse_recipe(recipe)


def test_unknown_recipe_and_bad_toml(tmp_path):
    with pytest.raises(RecipeError, match="neither a file nor a bundled recipe.*fashion-mnist-cpu"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(str(bad))


def test_cli_reports_recipe_and_data_errors_without_a_traceback(tmp_path, capsys):
    from reskd.cli import main

    # the real command line once, in a process of its own...
    out = subprocess.run([sys.executable, "-m", "reskd.cli", "train", "--recipe", "fashion-mnist-cpu", "--out",
                          str(tmp_path / "run"), "--set", "train.epochs=0"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "train.epochs: Input should be greater than or equal to 1" in out.stderr
    assert "Traceback" not in out.stderr

    def run(*args) -> tuple[int, str]:  # ...and the same entry point in this one (each fresh process costs torch)
        code = main(["train", *args])
        return code, capsys.readouterr().err

    code, err = run("--recipe", "fashion-mnist-cpu", "--out", str(tmp_path / "run"), "--set",
                    f"data.root=\"{tmp_path}\"")
    assert code == 2
    assert "Fashion-MNIST IDX files not found" in err and "Traceback" not in err
    code, err = run("--recipe", "fashion-mnist-cpu", "--out", str(tmp_path / "run"), "--set", "res_students.2.epochs=1")
    assert code == 2 and "Traceback" not in err
    assert "res_students is a list of 2 entries; '2' is not an index into it" in err


def test_a_star_override_sets_every_entry_of_a_list_and_none_of_an_empty_one():
    from reskd.training.recipe import set_dotted

    data = {"res_students": [{"epochs": 6}, {"epochs": 15, "lr": 0.1}], "empty": []}
    set_dotted(data, "res_students.*.epochs", 1)
    set_dotted(data, "empty.*.epochs", 1)
    assert data == {"res_students": [{"epochs": 1}, {"epochs": 1, "lr": 0.1}], "empty": []}
    with pytest.raises(RecipeError, match=r"res_students is a list of 2 entries; 'x' is not an index into it"):
        set_dotted(data, "res_students.x.epochs", 1)


def test_tiny_applies_the_recipes_smoke_overrides_before_set(tmp_path):
    recipe = load_recipe("fashion-mnist-cpu", {"teacher.epochs": 2}, tiny=True)
    assert (recipe.data.max_train, recipe.student.epochs, recipe.teacher.epochs) == (128, 1, 2)  # --set wins
    assert all(r.epochs == 1 for r in recipe.res_students)
    assert load_recipe("fashion-mnist-cpu").data.max_train is None  # [tiny] is not part of the recipe otherwise
    bare = tmp_path / "bare.toml"
    bare.write_text((RECIPE_DIR / "fashion-mnist-cpu.toml").read_text().split("\n[tiny]")[0])
    with pytest.raises(RecipeError, match=r"has no \[tiny\] section"):
        load_recipe(str(bare), tiny=True)
