"""rl_service.core.algorithms.normalize: the `normalize` hyperparameter's words and JSON form, parsed without eval,
refused with a reason, and written back canonically."""

from __future__ import annotations

import pytest

from rl_service.core.algorithms.hyperparams import Param, format_value
from rl_service.core.algorithms.normalize import MAX_TEXT, OFF, NormalizeOptions, parse_normalize
from rl_service.core.errors import InvalidHyperparameter

PARAM = Param("normalize", "normalize", OFF)
BOTH = NormalizeOptions(norm_obs=True, norm_reward=True)


@pytest.mark.parametrize(("text", "expected"), [
    ("true", BOTH), ("TRUE", BOTH), (" yes ", BOTH), ("1", BOTH),
    ("false", OFF), ("no", OFF), ("0", OFF),
    ("obs", NormalizeOptions(norm_obs=True)), ("OBS", NormalizeOptions(norm_obs=True)),
    ("{}", BOTH),  # VecNormalize's defaults, as in rl-baselines3-zoo
    ('{"norm_obs": true, "norm_reward": false}', NormalizeOptions(norm_obs=True)),
    ('{"norm_reward": false, "clip_obs": 5, "gamma": 0.98}', NormalizeOptions(True, False, 5.0, 10.0, 0.98)),
    ('{"norm_obs": false}', NormalizeOptions(norm_obs=False, norm_reward=True)),
    ('{"clip_reward": 1e3, "epsilon": 1e-6}', NormalizeOptions(True, True, 10.0, 1000.0, None, 1e-6)),
])
def test_accepted_forms(text: str, expected: NormalizeOptions) -> None:
    assert parse_normalize(text) == expected
    assert PARAM.parse(text) == expected


@pytest.mark.parametrize(("text", "reason"), [
    ("maybe", "expected true, false, obs or a JSON object"),
    ("{'norm_obs': True}", "not valid JSON"),  # the zoo's Python dict: never evaluated
    ("__import__('os').system('true')", "expected"),
    ("[true]", "expected"),
    ('{"norm_obs": 1}', "norm_obs must be true or false"),
    ('{"norm_ob": true}', "unknown key 'norm_ob'"),
    ('{"clip_obs": 0}', "clip_obs must be in (0, 1e+06]"),
    ('{"clip_obs": "10"}', "clip_obs must be a number"),
    ('{"clip_obs": true}', "clip_obs must be a number"),
    ('{"gamma": 1.5}', "gamma must be in [0, 1]"),
    ('{"gamma": NaN}', "NaN is not a number"),
    ('{"clip_obs": Infinity}', "Infinity is not a number"),
    ('{"clip_obs": 1e999}', "clip_obs must be in"),
    ('{"gamma": 0.9, "gamma": 0.8}', "a key appears twice"),
    ('{"norm_obs": true', "not valid JSON"),
    ("{" + " " * MAX_TEXT + "}", f"longer than {MAX_TEXT}"),
])
def test_refused_forms_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_normalize(text)
    assert reason in str(info.value)
    with pytest.raises(InvalidHyperparameter) as error:
        PARAM.parse(text)
    assert error.value.field == "hyperparameters.normalize"
    assert reason in error.value.message and error.value.message.startswith("hyperparameters['normalize']: ")
    assert len(error.value.message) < 400, "a long value is quoted only in part"


@pytest.mark.parametrize("text", ["true", "false", "obs", '{"norm_obs": false}', '{"gamma": 0.9, "clip_obs": 3.5}',
                                  '{"norm_reward": false, "epsilon": 1e-7, "clip_reward": 2}'])
def test_canonical_text_parses_back_equal(text: str) -> None:
    value = parse_normalize(text)
    canonical = format_value(value)
    assert parse_normalize(canonical) == value
    assert format_value(parse_normalize(canonical)) == canonical


def test_presets_print_as_words_and_the_rest_as_sorted_json() -> None:
    assert str(OFF) == "false" and str(BOTH) == "true" and str(NormalizeOptions(norm_obs=True)) == "obs"
    assert str(parse_normalize('{"norm_obs": false}')) == (
        '{"clip_obs":10.0,"clip_reward":10.0,"epsilon":1e-08,"norm_obs":false,"norm_reward":true}')
    assert not OFF.enabled and BOTH.enabled and parse_normalize('{"norm_obs": false}').enabled
