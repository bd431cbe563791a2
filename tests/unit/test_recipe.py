"""Recipes: closed validation with line numbers, presets, steps, YAML round trip, `recipe check`."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qtool.cli import app
from qtool.errors import QtoolError, RecipeError
from qtool.recipe import Recipe, load_recipe, parse_recipe, step_name

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def parse(text: str) -> Recipe:
    return parse_recipe(textwrap.dedent(text).lstrip("\n"))


def error_of(text: str) -> str:
    with pytest.raises(RecipeError) as exc:
        parse(text)
    return str(exc.value)


def test_recipe_error_is_a_qtool_error():
    assert issubclass(RecipeError, QtoolError)


# --- the shipped recipes ------------------------------------------------------------------


def test_recipes_folder_is_not_empty():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates_and_round_trips(path):
    recipe = load_recipe(path)
    assert recipe.steps, "a shipped recipe runs at least one step"
    assert step_name(recipe.steps[-1]) == "export" or "export" not in [step_name(s) for s in recipe.steps]
    again = parse_recipe(recipe.to_yaml())
    assert again.to_dict() == recipe.to_dict()
    # and the YAML itself is stable
    assert again.to_yaml() == recipe.to_yaml()


def test_round_trip_of_a_full_recipe():
    r = parse(
        """
        model: some/model
        output: out/x
        dtype: bfloat16
        checkpoint_dtype: float16
        device: cpu
        seed: 3
        calibration: {dataset: wikitext2, split: validation, samples: 4, seq_len: 64, seed: 1}
        scheme:
          preset: W4A4KV4
          weights: {group_size: 32, symmetric: false}
          activations: {clip_ratio: 0.9}
          kv_cache: {bits: 3, past_only: true, group_size: 8}
          targets: [q_proj, down_proj]
        steps:
          - rtn: {mse_clip: true}
          - export: {format: compressed-tensors}
        """
    )
    d = r.to_dict()
    assert parse_recipe(r.to_yaml()).to_dict() == d
    assert yaml.safe_load(r.to_yaml()) == d
    assert d["scheme"]["kv_cache"] == {
        "bits": 3,
        "symmetric": False,
        "group_size": 8,
        "clip_ratio": 1.0,
        "past_only": True,
    }
    assert d["steps"] == [{"rtn": {"mse_clip": True}}, {"export": {"format": "compressed-tensors"}}]
    assert r.scheme.label() == "W4A4KV3"


def test_empty_recipe_gets_defaults():
    r = parse_recipe("")
    assert r.model == "smollm2-135m"
    assert r.steps == [] and r.scheme.weights is None
    assert r.calibration.split == "auto"


# --- malformed and unknown input ----------------------------------------------------------


@pytest.mark.parametrize("text", ["model: x\nscheme: [\n", "model: [x\n  y: 1\n", "a: b: c\n"])
def test_malformed_yaml(text):
    with pytest.raises(RecipeError, match="malformed YAML"):
        parse_recipe(text, source="bad.yaml")


def test_not_a_mapping():
    with pytest.raises(RecipeError, match="a recipe is a YAML mapping"):
        parse_recipe("- rtn\n- export\n")


def test_unknown_top_level_key():
    msg = error_of(
        """
        model: x
        calibraton: {samples: 4}
        steps: [rtn]
        """
    )
    assert "unknown key 'calibraton'" in msg
    assert "(line 2)" in msg
    assert (
        "allowed keys: model, output, dtype, checkpoint_dtype, device, seed, calibration, scheme, steps"
        in msg
    )


@pytest.mark.parametrize(
    "section,line,allowed",
    [
        ("scheme", "  wieghts: {bits: 4}", "preset, weights, activations, kv_cache, targets"),
        ("weights", "    sym: true", "bits, symmetric, group_size, ragged"),
        ("activations", "    symmetric: true", "bits, clip_ratio, group_size, ragged"),
        ("kv_cache", "    bitz: 4", "bits, symmetric, group_size, clip_ratio, past_only"),
    ],
)
def test_unknown_scheme_key(section, line, allowed):
    header = "scheme:\n  preset: W4A4KV4\n" + ("" if section == "scheme" else f"  {section}:\n    bits: 4\n")
    text = "model: x\n" + header + line + "\nsteps: [rtn]\n"
    lineno = text.splitlines().index(line) + 1
    key = line.split(":")[0].strip()
    msg = error_of(text)
    assert f"unknown key '{key}'" in msg
    assert f"(line {lineno})" in msg
    assert f"allowed keys: {allowed}" in msg


def test_unknown_calibration_key():
    msg = error_of(
        """
        model: x
        calibration:
          samples: 4
          seqlen: 64
        """
    )
    assert (
        "calibration.seqlen (line 4)" in msg and "allowed keys: dataset, split, samples, seq_len, seed" in msg
    )


def test_unknown_step_lists_known_steps():
    msg = error_of(
        """
        model: x
        scheme: W4A16
        steps:
          - rtn
          - gptqq: {blocksize: 64}
        """
    )
    assert "unknown step 'gptqq'" in msg
    assert "(line 5)" in msg
    known = re.search(r"known steps: ([a-z_, ]+)", msg).group(1).split(", ")
    assert {"rtn", "export"} <= set(known)


def test_unknown_bare_step_points_at_its_line():
    msg = error_of(
        """
        model: x
        scheme: W4A16
        steps:
          - rtn
          - gptqq
        """
    )
    assert "unknown step 'gptqq'" in msg
    assert "(line 5)" in msg


def test_unknown_step_option():
    msg = error_of(
        """
        model: x
        scheme: W4A16
        steps:
          - rtn:
              mse: true
          - export
        """
    )
    assert "step 1 `rtn`: unknown key 'mse'" in msg
    assert "(line 5)" in msg
    assert "allowed keys: mse_clip" in msg


def test_step_option_bad_value():
    msg = error_of(
        """
        model: x
        scheme: W4A16
        steps:
          - rtn: {mse_clip: maybe}
        """
    )
    assert "mse_clip" in msg and "(line 4)" in msg and "valid boolean" in msg


def test_export_format_must_be_known():
    msg = error_of(
        """
        model: x
        scheme: W4A16
        steps: [rtn, {export: {format: gguf}}]
        """
    )
    assert "format" in msg and "compressed-tensors" in msg and "gptq" in msg


@pytest.mark.parametrize(
    "key,value,line,allowed",
    [
        ("bits", 0, 4, "greater than or equal to 2"),
        ("bits", 9, 4, "less than or equal to 8"),
        ("group_size", 3, 5, "greater than or equal to 8"),
    ],
)
def test_bad_weight_values(key, value, line, allowed):
    body = {"bits": 4, "group_size": 64}
    body[key] = value
    text = f"model: x\nscheme:\n  weights:\n    bits: {body['bits']}\n    group_size: {body['group_size']}\nsteps: [rtn]\n"
    msg = error_of(text)
    assert f"scheme.weights.{key} (line {line})" in msg
    assert allowed in msg


@pytest.mark.parametrize(
    "text,where,allowed",
    [
        ("dtype: int8\n", "dtype (line 1)", "'float32', 'bfloat16' or 'float16'"),
        ("calibration:\n  samples: 0\n", "calibration.samples (line 2)", "greater than or equal to 1"),
        (
            "scheme:\n  activations:\n    clip_ratio: 0\n",
            "scheme.activations.clip_ratio (line 3)",
            "greater than 0",
        ),
        ("scheme:\n  preset: W9A9\n", "scheme (line 1)", "known presets: W4A16"),
        ("steps: rtn\n", "steps (line 1)", "steps must be a list"),
        (
            "steps:\n  - {rtn: {}, export: {}}\n",
            "steps (line 2)",
            "write a step as `name` or `name: {options}`",
        ),
    ],
)
def test_other_bad_values(text, where, allowed):
    msg = error_of(text)
    assert where in msg and allowed in msg


def test_line_number_of_a_repeated_key_name():
    msg = error_of(
        """
        model: x
        scheme:
          weights:
            bits: 4
          activations:
            bits: 0
        steps: [rtn]
        """
    )
    assert "scheme.activations.bits (line 6)" in msg
    msg = error_of(
        """
        model: x
        scheme: W4A16
        steps:
          - rtn: {mse_clip: true}
          - rtn: {mse_clip: 5}
        """
    )
    assert "(line 5)" in msg


# --- steps, presets, consistency ----------------------------------------------------------


def test_steps_as_names_and_as_mappings():
    a = parse("scheme: W4A16\nsteps: [rtn, export]\n")
    b = parse("scheme: W4A16\nsteps:\n  - rtn: {mse_clip: true}\n  - export: null\n")
    assert [step_name(s) for s in a.steps] == ["rtn", "export"]
    assert [step_name(s) for s in b.steps] == ["rtn", "export"]
    assert a.steps[0].mse_clip is False and b.steps[0].mse_clip is True
    assert a.steps[1].format == b.steps[1].format == "compressed-tensors"


@pytest.mark.parametrize(
    "preset,weights,acts,kv",
    [
        ("W4A16", 4, None, None),
        ("w8a8", 8, 8, None),
        ("W4A4KV4", 4, 4, 4),
        ("W3A3KV3", 3, 3, 3),
        ("W4KV4", 4, None, 4),
    ],
)
def test_presets_expand(preset, weights, acts, kv):
    s = parse(f"scheme: {preset}\nsteps: [rtn]\n").scheme
    assert s.preset == preset.upper()
    assert s.weights.bits == weights
    assert (s.activations.bits if s.activations else None) == acts
    assert (s.kv_cache.bits if s.kv_cache else None) == kv
    assert s.label() == f"W{weights}A{acts or 16}" + (f"KV{kv}" if kv else "")


def test_explicit_keys_override_the_preset():
    s = parse(
        """
        scheme:
          preset: W4A4KV4
          weights: {group_size: 64, symmetric: false}
          activations: {bits: 8}
          kv_cache: null
        steps: [rtn]
        """
    ).scheme
    assert (s.weights.bits, s.weights.group_size, s.weights.symmetric) == (4, 64, False)
    assert s.activations.bits == 8
    assert s.kv_cache is None
    assert s.label() == "W4A8"
    spec = s.weights.spec()
    assert (spec.granularity, spec.group_size, spec.symmetric) == ("group", 64, False)


def test_fp_preset_needs_no_step():
    r = parse("scheme: FP\nsteps: [export]\n")
    assert r.scheme.weights is None and r.scheme.label() == "W16A16"


def test_calibration_on_test_split_refused():
    msg = error_of("calibration:\n  split: test\n")
    assert "calibration.split (line 2)" in msg and "leak" in msg and "validation" in msg


def test_weights_scheme_without_weight_step_refused():
    msg = error_of("scheme: W4A16\nsteps: [export]\n")
    assert "no step does" in msg and "rtn" in msg and "gptq" in msg
    msg = error_of("scheme: W4A16\n")
    assert "no step does" in msg


def test_export_must_be_last():
    assert "`export` must be the last step" in error_of("scheme: W4A16\nsteps: [export, rtn]\n")


def test_source_named_in_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: x\nfoo: 1\n")
    with pytest.raises(RecipeError, match=re.escape(str(path))):
        load_recipe(path)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_assignment_is_validated():
    r = parse("scheme: W4A16\nsteps: [rtn]\n")
    with pytest.raises(ValueError):
        r.scheme.weights.bits = 1


# --- `qtool recipe check` ------------------------------------------------------------------


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_recipe_check_cli_ok():
    result = CliRunner().invoke(app, ["recipe", "check", *map(str, RECIPES)])
    assert result.exit_code == 0, result.output
    out = _flat(result.output)
    for path in RECIPES:
        assert path.name in out
    assert out.count("ok") >= len(RECIPES)


def test_recipe_check_cli_fails_on_any_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nscheme:\n  weights: {bits: 4, sym: true}\nsteps: [rtn]\n")
    result = CliRunner().invoke(app, ["recipe", "check", str(RECIPES[0]), str(bad)])
    assert result.exit_code == 1
    out = _flat(result.output)
    assert "FAIL" in out and "unknown key 'sym'" in out and "line 3" in out
    result = CliRunner().invoke(app, ["recipe", "check", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "recipe file not found" in _flat(result.output)


def test_recipe_show_cli_prints_resolved_yaml():
    result = CliRunner().invoke(app, ["recipe", "show", str(RECIPES[0])])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output) == load_recipe(RECIPES[0]).to_dict()
