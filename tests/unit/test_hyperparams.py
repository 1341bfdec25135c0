"""rl_service.core.algorithms.hyperparams: string parsing, range checks, error messages, canonical formatting."""

from __future__ import annotations

import math

import pytest

from rl_service.core.algorithms.hyperparams import (
    MAX_LAYER_WIDTH,
    MAX_LAYERS,
    LinearSchedule,
    Param,
    Schema,
    format_value,
    merge,
)
from rl_service.core.errors import InvalidHyperparameter, InvalidRequest

LR = Param("learning_rate", "float", 3e-4, 0.0, 1.0, low_exclusive=True, schedule=True)
GAMMA = Param("gamma", "float", 0.99, 0.0, 1.0)
N_STEPS = Param("n_steps", "int", 2048, 1, 1_000_000)
SDE_FREQ = Param("sde_sample_freq", "int", -1, -1, 100)
USE_SDE = Param("use_sde", "bool", False)
ACT = Param("activation_fn", "choice", "tanh", choices=("tanh", "relu"))
NET = Param("net_arch", "net_arch", (64, 64))
TARGET_KL = Param("target_kl", "float", None, 0.0, 10.0, low_exclusive=True, optional=True)
UNBOUNDED = Param("free", "float", 0.0)

SCHEMA = Schema((LR, GAMMA, N_STEPS, USE_SDE, ACT, NET, TARGET_KL))


def _invalid(param: Param, raw: str) -> InvalidHyperparameter:
    with pytest.raises(InvalidHyperparameter) as info:
        param.parse(raw)
    return info.value


# ------------------------------------------------------------------ floats


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("0.5", 0.5), ("1", 1.0), ("0", 0.0), ("1e-3", 1e-3), ("  0.25  ", 0.25), (".9", 0.9)],
)
def test_float_parses_within_inclusive_bounds(raw: str, expected: float) -> None:
    value = GAMMA.parse(raw)
    assert isinstance(value, float)
    assert value == expected


@pytest.mark.parametrize("raw", ["1.0000001", "-0.1", "2", "-1e-9"])
def test_float_out_of_range_is_refused(raw: str) -> None:
    error = _invalid(GAMMA, raw)
    assert error.field == "hyperparameters.gamma"
    assert "'gamma'" in error.message
    assert repr(raw) in error.message
    assert "[0, 1]" in error.message


def test_exclusive_low_bound_refuses_the_bound_itself() -> None:
    error = _invalid(LR, "0")
    assert error.field == "hyperparameters.learning_rate"
    assert "(0, 1]" in error.message
    assert LR.parse("1e-12") == 1e-12
    assert LR.parse("1") == 1.0


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "Infinity", "+inf", "1e400"])
def test_non_finite_floats_are_refused_even_without_bounds(raw: str) -> None:
    error = _invalid(UNBOUNDED, raw)
    assert error.field == "hyperparameters.free"
    assert "'free'" in error.message


@pytest.mark.parametrize("raw", ["abc", "", "1,5", "0.1.2", "1/2", "__import__('os')", "0.1; rm -rf"])
def test_unparsable_float_is_refused(raw: str) -> None:
    error = _invalid(GAMMA, raw)
    assert error.field == "hyperparameters.gamma"
    assert "gamma" in error.message


def test_invalid_hyperparameter_is_an_invalid_request() -> None:
    error = _invalid(GAMMA, "x")
    assert isinstance(error, InvalidRequest)
    assert str(error) == error.message


# ------------------------------------------------------------------ ints


@pytest.mark.parametrize(("raw", "expected"), [("64", 64), ("64.0", 64), ("1e3", 1000), (" 7 ", 7), ("1", 1)])
def test_int_parses_whole_numbers(raw: str, expected: int) -> None:
    value = N_STEPS.parse(raw)
    assert type(value) is int
    assert value == expected


@pytest.mark.parametrize("raw", ["12.5", "0", "-3", "1000001", "nan", "inf", "1e400", "lin_5", "0x10", "ten"])
def test_int_refuses_fractions_out_of_range_and_junk(raw: str) -> None:
    error = _invalid(N_STEPS, raw)
    assert error.field == "hyperparameters.n_steps"
    assert "'n_steps'" in error.message
    assert "int in [1, 1e+06]" in error.message


def test_int_negative_lower_bound() -> None:
    assert SDE_FREQ.parse("-1") == -1
    assert _invalid(SDE_FREQ, "-2").field == "hyperparameters.sde_sample_freq"


# ------------------------------------------------------------------ bools and choices


@pytest.mark.parametrize(("raw", "expected"), [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), (" True ", True),
    ("false", False), ("False", False), ("0", False), ("no", False),
])
def test_bool_spellings(raw: str, expected: bool) -> None:
    assert USE_SDE.parse(raw) is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "", "t", "none"])
def test_bool_refuses_other_text(raw: str) -> None:
    error = _invalid(USE_SDE, raw)
    assert error.field == "hyperparameters.use_sde"
    assert "true or false" in error.message


def test_choice_is_case_insensitive_and_canonicalised() -> None:
    assert ACT.parse("RELU") == "relu"
    assert ACT.parse(" tanh ") == "tanh"


def test_choice_refuses_unknown_and_lists_choices() -> None:
    error = _invalid(ACT, "sigmoid")
    assert error.field == "hyperparameters.activation_fn"
    assert "one of tanh, relu" in error.message


# ------------------------------------------------------------------ net_arch


@pytest.mark.parametrize(("raw", "expected"), [
    ("64,64", (64, 64)), ("[32, 16]", (32, 16)), ("(8,)", (8,)), ("256", (256,)),
    (" 1 , 2 ,3 ", (1, 2, 3)), (",".join(["4"] * MAX_LAYERS), (4,) * MAX_LAYERS),
    (str(MAX_LAYER_WIDTH), (MAX_LAYER_WIDTH,)),
])
def test_net_arch_parses_layer_lists(raw: str, expected: tuple[int, ...]) -> None:
    assert NET.parse(raw) == expected


@pytest.mark.parametrize("raw", [
    "", "[]", "0", "64,0", "-8", "1.5", "a,b", "none",
    ",".join(["4"] * (MAX_LAYERS + 1)), str(MAX_LAYER_WIDTH + 1),
])
def test_net_arch_refuses_bad_layer_lists(raw: str) -> None:
    error = _invalid(NET, raw)
    assert error.field == "hyperparameters.net_arch"
    assert "layer widths" in error.message


# ------------------------------------------------------------------ optional and schedules


@pytest.mark.parametrize("raw", ["none", "None", "NULL", "", "  "])
def test_optional_accepts_none(raw: str) -> None:
    assert TARGET_KL.parse(raw) is None


def test_optional_still_range_checks_numbers() -> None:
    assert TARGET_KL.parse("0.02") == 0.02
    assert _invalid(TARGET_KL, "0").field == "hyperparameters.target_kl"
    assert '"none"' in _invalid(TARGET_KL, "11").message


def test_non_optional_refuses_none() -> None:
    error = _invalid(GAMMA, "none")
    assert error.field == "hyperparameters.gamma"


@pytest.mark.parametrize(("raw", "start"), [("lin_0.001", 0.001), ("LIN_0.5", 0.5), ("lin_1", 1.0), ("lin_3e-4", 3e-4)])
def test_linear_schedule_parses(raw: str, start: float) -> None:
    value = LR.parse(raw)
    assert isinstance(value, LinearSchedule)
    assert value.start == start


@pytest.mark.parametrize("raw", ["lin_", "lin_abc", "lin_0", "lin_-0.1", "lin_2", "lin_nan", "lin_inf", "lin_0.1x"])
def test_linear_schedule_start_is_range_checked(raw: str) -> None:
    error = _invalid(LR, raw)
    assert error.field == "hyperparameters.learning_rate"
    assert '"lin_<start>"' in error.message


def test_schedule_refused_where_not_accepted() -> None:
    error = _invalid(GAMMA, "lin_0.5")
    assert error.field == "hyperparameters.gamma"
    assert "lin_" not in GAMMA.describe_range()


def test_linear_schedule_str() -> None:
    assert str(LinearSchedule(0.001)) == "lin_0.001"


# ------------------------------------------------------------------ describe_range


def test_describe_range_texts() -> None:
    assert GAMMA.describe_range() == "float in [0, 1]"
    assert LR.describe_range() == 'float in (0, 1] or "lin_<start>"'
    assert TARGET_KL.describe_range() == 'float in (0, 10] or "none"'
    assert UNBOUNDED.describe_range() == "float in [-inf, inf]"
    assert USE_SDE.describe_range() == "true or false"
    assert ACT.describe_range() == "one of tanh, relu"
    assert str(MAX_LAYERS) in NET.describe_range()


# ------------------------------------------------------------------ format_value


@pytest.mark.parametrize(("value", "text"), [
    (None, "none"), (True, "true"), (False, "false"), ((64, 64), "64,64"), ((8,), "8"),
    (0.001, "0.001"), (3e-4, "0.0003"), (0.99, "0.99"), (2048, "2048"), ("relu", "relu"),
    (LinearSchedule(0.001), "lin_0.001"),
])
def test_format_value(value: object, text: str) -> None:
    assert format_value(value) == text  # type: ignore[arg-type]


@pytest.mark.parametrize(("param", "raw"), [
    (LR, "0.001"), (LR, "3e-4"), (LR, "lin_0.001"), (LR, "lin_2.5e-4"), (GAMMA, "0.99"), (GAMMA, "0"),
    (N_STEPS, "2048"), (USE_SDE, "yes"), (USE_SDE, "0"), (ACT, "ReLU"), (NET, "[256, 128, 64]"),
    (TARGET_KL, "none"), (TARGET_KL, "0.015"),
])
def test_format_value_round_trips(param: Param, raw: str) -> None:
    value = param.parse(raw)
    text = format_value(value)
    assert param.parse(text) == value
    assert format_value(param.parse(text)) == text


@pytest.mark.parametrize(("param", "raw"), [(GAMMA, "0.9999999"), (LR, "0.000123456789"), (LR, "lin_0.000123456789")])
def test_format_value_round_trips_full_precision(param: Param, raw: str) -> None:
    value = param.parse(raw)
    assert param.parse(format_value(value)) == value


# ------------------------------------------------------------------ Schema


def test_schema_defaults_and_sorted_names() -> None:
    assert SCHEMA.names == sorted(["learning_rate", "gamma", "n_steps", "use_sde", "activation_fn", "net_arch",
                                   "target_kl"])
    assert SCHEMA.defaults() == {
        "learning_rate": 3e-4, "gamma": 0.99, "n_steps": 2048, "use_sde": False, "activation_fn": "tanh",
        "net_arch": (64, 64), "target_kl": None,
    }


def test_schema_parse_overlays_client_values_on_defaults() -> None:
    values = SCHEMA.parse({"gamma": "0.9", "n_steps": "128", "learning_rate": "lin_0.001"})
    assert values["gamma"] == 0.9
    assert values["n_steps"] == 128
    assert values["learning_rate"] == LinearSchedule(0.001)
    assert values["use_sde"] is False
    assert values["net_arch"] == (64, 64)
    assert set(values) == set(SCHEMA.names)


def test_schema_parse_keys_are_case_and_space_insensitive() -> None:
    values = SCHEMA.parse({"  Gamma ": "0.5", "N_STEPS": "3"})
    assert values["gamma"] == 0.5
    assert values["n_steps"] == 3


def test_schema_parse_empty_mapping_gives_defaults() -> None:
    assert SCHEMA.parse({}) == SCHEMA.defaults()


def test_schema_unknown_key_lists_accepted_keys() -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        SCHEMA.parse({"gamma": "0.9", "lerning_rate": "0.1"})
    error = info.value
    assert error.field == "hyperparameters.lerning_rate"
    assert "'lerning_rate'" in error.message
    assert "accepted keys: " + ", ".join(SCHEMA.names) in error.message


def test_schema_bad_value_names_the_key() -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        SCHEMA.parse({"n_steps": "many"})
    assert info.value.field == "hyperparameters.n_steps"
    assert "'n_steps'" in info.value.message


def test_schema_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Schema((GAMMA, Param("gamma", "float", 0.5)))


def test_merge_later_groups_override_earlier() -> None:
    override = Param("gamma", "float", 0.5, 0.0, 0.9)
    schema = merge((GAMMA, N_STEPS), (override,))
    assert schema.names == ["gamma", "n_steps"]
    assert schema.defaults()["gamma"] == 0.5
    with pytest.raises(InvalidHyperparameter):
        schema.parse({"gamma": "0.95"})


def test_param_is_frozen() -> None:
    with pytest.raises(AttributeError):
        GAMMA.default = 0.5  # type: ignore[misc]
    assert math.isclose(GAMMA.default, 0.99)  # type: ignore[arg-type]
