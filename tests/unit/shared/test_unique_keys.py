"""A YAML or JSON document that says a key twice in one mapping is refused, not read as
its last value."""

from __future__ import annotations

import json

import pytest

from shared.unique_keys import RepeatedKeyError, load_yaml, repeated_json_keys


def test_yaml_names_the_lines_of_a_repeated_key():
    text = "name: terms\ntraining:\n  epochs: 1\n  learning_rate: 0.001\n  epochs: 3\n"
    with pytest.raises(RepeatedKeyError) as caught:
        load_yaml(text)
    assert (caught.value.key, caught.value.line, caught.value.again) == ("epochs", 3, 5)
    assert str(caught.value) == (
        "line 5: the key 'epochs' a second time in one mapping (first on line 3): say each key once"
    )


def test_yaml_reads_as_safe_load_does_without_repeats():
    text = (
        "base: &base {epochs: 1, learning_rate: 0.001}\n"
        "training:\n  <<: *base\n  epochs: 3\n"  # a merge the mapping overrides: allowed
        "other: {1: one, '1': text}\n"  # two keys: the number 1 and the text '1'
        "same: {a: 1}\nlist: [{a: 1}, {a: 2}]\n"  # equal keys in different mappings
    )
    assert load_yaml(text) == {
        "base": {"epochs": 1, "learning_rate": 0.001},
        "training": {"epochs": 3, "learning_rate": 0.001},
        "other": {1: "one", "1": "text"},
        "same": {"a": 1},
        "list": [{"a": 1}, {"a": 2}],
    }


def test_yaml_refuses_what_safe_load_refuses():
    with pytest.raises(Exception, match="could not determine a constructor"):
        load_yaml("!!python/object:os.system {}\n")


def test_json_gives_the_path_of_each_repeated_key():
    text = (
        '{"name": "a", "training": {"epochs": 1, "epochs": 3, "epochs": 4},'
        ' "cases": [{"q": 1}, {"q": 2, "q": 3}], "name": "b"}'
    )
    assert json.loads(text)["name"] == "b"  # what json.loads does without a word
    assert repeated_json_keys(text) == [("name",), ("training", "epochs"), ("cases", 1, "q")]
    assert repeated_json_keys(b'{"a": {"a": 1}, "b": [1, {"a": 2}]}') == []
    assert repeated_json_keys("{not json") == []
