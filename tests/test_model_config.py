"""TF Serving's model config file: parsed by protobuf into TF Serving's own message, validated with named fields."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given
from tensorflow_serving.config import model_server_config_pb2

from service.batching import BatchingParameters
from service.model_config import (
    IGNORED_FIELDS,
    SUPPORTED_FIELDS,
    ModelConfig,
    ModelConfigError,
    VersionPolicy,
    load_model_config,
    parse_model_config,
)

ISSUE_EXAMPLE = """
model_config_list {
  config { name: 'digits' base_path: '/models/digits' model_platform: 'tensorflow'
           model_version_policy { specific { versions: 1 versions: 2 } }
           version_labels { key: 'stable' value: 1 } version_labels { key: 'canary' value: 2 } }
  config { name: 'flowers' base_path: '/models/flowers' model_platform: 'tensorflow' }
}
"""

# TF Serving's documented layout: one config per model, double quotes, comments.
COMMENTED = """
# Served by kleinserve and by tensorflow_model_server alike.
model_config_list {
  config {
    name: "half_plus_two"  # the TF Serving test model
    base_path: "/models/half_plus_two"
    model_platform: "tensorflow"
  }
  config {
    name: 'resnet'
    base_path: '/models/resnet'
    model_platform: "tensorflow"
    model_version_policy { latest { num_versions: 2 } }
  }
}
"""

# A TF1 retraining-tutorial model (output_graph.pb in each version folder): to the config
# file it is just another model, served latest-first.
FROZEN_GRAPH = """
model_config_list: {
  config: {
    name: "inception_flowers",
    base_path: "/srv/models/inception_flowers",
    model_platform: "tensorflow",
    model_version_policy: { latest: { num_versions: 1 } }
  }
}
"""

LOGGING = """
model_config_list {
  config {
    name: "digits"
    base_path: "/models/digits"
    model_platform: "tensorflow"
    logging_config {
      log_collector_config { type: "" filename_prefix: "/tmp/requests" }
      sampling_config { sampling_rate: 0.01 }
    }
  }
}
"""

VALID_TEXTS = [ISSUE_EXAMPLE, COMMENTED, FROZEN_GRAPH, LOGGING]


def config(text: str) -> str:
    """A model_config_list with one model 'm' at /models/m, extended by ``text``."""
    return f"model_config_list {{ config {{ name: 'm' base_path: '/models/m' {text} }} }}"


def test_issue_example_parses_to_plain_configs() -> None:
    """The issue's two-model file gives the specific policy, the labels and the defaults."""
    assert parse_model_config(ISSUE_EXAMPLE) == [
        ModelConfig(
            name="digits",
            base_path=Path("/models/digits"),
            policy=VersionPolicy("specific", versions=frozenset({1, 2})),
            labels={"stable": 1, "canary": 2},
        ),
        ModelConfig(name="flowers", base_path=Path("/models/flowers")),
    ]


def test_defaults_are_latest_one_no_labels_no_batching() -> None:
    """A model with only name and base_path serves its latest version, no labels, no batching."""
    (model,) = parse_model_config(config(""))
    assert model.policy == VersionPolicy("latest", num_versions=1)
    assert dict(model.labels) == {}
    assert model.batching == BatchingParameters(enabled=False)


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("", VersionPolicy("latest")),
        ("model_version_policy {}", VersionPolicy("latest")),
        ("model_version_policy { latest {} }", VersionPolicy("latest")),
        ("model_version_policy { latest { num_versions: 0 } }", VersionPolicy("latest")),
        ("model_version_policy { latest { num_versions: 3 } }", VersionPolicy("latest", 3)),
        ("model_version_policy { all {} }", VersionPolicy("all")),
        (
            "model_version_policy { specific { versions: 3 versions: 1 } }",
            VersionPolicy("specific", versions=frozenset({1, 3})),
        ),
        (
            "model_version_policy { specific { versions: [0, 7] } }",
            VersionPolicy("specific", versions=frozenset({0, 7})),
        ),
    ],
)
def test_version_policy_forms(text: str, policy: VersionPolicy) -> None:
    """Each model_version_policy form parses to its policy; unset or num_versions 0 means latest 1."""
    (model,) = parse_model_config(config(text))
    assert model.policy == policy


def test_labels_read_like_a_mapping() -> None:
    """version_labels become a read-only mapping from label to version."""
    (model,) = parse_model_config(
        config(
            "version_labels { key: 'stable' value: 4 } version_labels { key: 'canary' value: 9 }"
        )
    )
    assert model.labels["stable"] == 4
    assert model.labels == {"stable": 4, "canary": 9}
    with pytest.raises(TypeError):
        model.labels["stable"] = 5  # type: ignore[index]


def test_two_parses_of_one_file_are_equal_and_hashable() -> None:
    """Parsing the same text twice gives equal configs, usable as dict keys."""
    first, second = parse_model_config(ISSUE_EXAMPLE), parse_model_config(ISSUE_EXAMPLE)
    assert first == second
    assert {first[0]: 1}[second[0]] == 1


def test_comments_both_quote_styles_and_two_models() -> None:
    """Comments, single and double quotes parse to the same values."""
    assert parse_model_config(COMMENTED) == [
        ModelConfig("half_plus_two", Path("/models/half_plus_two")),
        ModelConfig("resnet", Path("/models/resnet"), VersionPolicy("latest", 2)),
    ]


def test_frozen_graph_model_with_colon_and_comma_syntax() -> None:
    """The `field: { … },` text-proto spelling parses like the plain one."""
    assert parse_model_config(FROZEN_GRAPH) == [
        ModelConfig("inception_flowers", Path("/srv/models/inception_flowers"))
    ]


def test_model_platform_may_be_left_out() -> None:
    """A model without model_platform is a TensorFlow model."""
    with_platform = parse_model_config(config("model_platform: 'tensorflow'"))
    assert parse_model_config(config("")) == with_platform


def test_logging_config_is_warned_about_and_ignored() -> None:
    """logging_config is accepted, reported through warn, and changes nothing."""
    warnings: list[str] = []
    models = parse_model_config(LOGGING, source="m.conf", warn=warnings.append)
    assert models == [ModelConfig("digits", Path("/models/digits"))]
    assert warnings == [
        "m.conf: model_config_list.config[0] (name 'digits'): "
        "logging_config is not supported and is ignored"
    ]


def test_deprecated_model_type_tensorflow_is_accepted_with_a_warning() -> None:
    """model_type: TENSORFLOW works like model_platform 'tensorflow', with a deprecation warning."""
    warnings: list[str] = []
    models = parse_model_config(config("model_type: TENSORFLOW"), warn=warnings.append)
    assert models == parse_model_config(config(""))
    assert len(warnings) == 1 and "model_type is deprecated" in warnings[0]


@pytest.mark.parametrize(
    "text", ["", "\n  # nothing yet\n", "model_config_list {}", "model_config_list { }"]
)
def test_empty_file_or_list_means_no_models(text: str) -> None:
    """An empty file or an empty model_config_list is valid and lists no models."""
    assert parse_model_config(text) == []


def test_relative_base_path_stays_relative() -> None:
    """A relative base_path is kept as written, not resolved here."""
    (model,) = parse_model_config(
        "model_config_list { config { name: 'm' base_path: 'models/m' } }"
    )
    assert model.base_path == Path("models/m")
    assert not model.base_path.is_absolute()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("model_config_list { config { nmae: 'm' base_path: '/m' } }", 'no field named "nmae"'),
        (config("model_version_policy { latest { num_version: 2 } }"), "num_version"),
        (config("model_version_policy { lastest {} }"), "lastest"),
        (config("model_version_policy { latest { num_versions: 'x' } }"), "num_versions"),
        (config("model_version_policy { latest { num_versions: -1 } }"), "num_versions"),
        (config("model_version_policy { latest {} all {} }"), "policy_choice"),
        (config("name: 'again'"), '"name"'),
        (
            "model_config_list { config { name: 'm' base_path: '/a' } config { name: 'm' base_path: '/b' } }",
            r"config\[1\] \(name 'm'\): name 'm' is already used by model_config_list.config\[0\]",
        ),
        ("model_config_list { config { base_path: '/m' } }", r"config\[0\]: name is required"),
        ("model_config_list { config { name: 'a/b' base_path: '/m' } }", "name 'a/b'"),
        ("model_config_list { config { name: 'a:b' base_path: '/m' } }", "name 'a:b'"),
        ("model_config_list { config { name: 'm' } }", "base_path is required"),
        (config("model_platform: 'tensorflow_lite'"), "model_platform 'tensorflow_lite'"),
        (config("model_type: OTHER"), "model_type OTHER"),
        (config("model_type: 7"), "model_type 7"),
        (config("model_type: TENSORFLOW model_platform: 'tensorflow'"), "model_type"),
        (config("model_version_policy { specific {} }"), "model_version_policy.specific.versions"),
        (
            config("model_version_policy { specific { versions: 2 versions: -1 } }"),
            "model_version_policy.specific.versions must be 0 or more, not -1",
        ),
        (
            config(
                "model_version_policy { specific { versions: 1 versions: 2 } } "
                "version_labels { key: 'canary' value: 3 }"
            ),
            "version_labels: label 'canary' points at version 3, "
            "which model_version_policy.specific does not serve",
        ),
        (config("version_labels { key: 'can/ary' value: 1 }"), "version_labels: label 'can/ary'"),
        (config("version_labels { key: '' value: 1 }"), "version_labels: label ''"),
        (config("version_labels { key: 'old' value: -2 }"), "version_labels: label 'old'"),
        (config("version_labels { key: 'old' value: 'x' }"), "version_labels"),
        (
            "custom_model_config { type_url: 'x' }",
            "custom_model_config is not supported; use model_config_list",
        ),
        (config("base_path: '/again'"), '"base_path"'),
    ],
)
def test_bad_files_fail_naming_the_field(text: str, named: str) -> None:
    """Unknown, mistyped, missing, duplicated and out-of-range fields fail with the field's name."""
    with pytest.raises(ModelConfigError, match=named) as raised:
        parse_model_config(text, source="models.conf")
    assert str(raised.value).startswith("models.conf: ")


def test_deeply_nested_any_is_a_config_error() -> None:
    """A file nesting google.protobuf.Any past Python's recursion limit fails as a config error."""
    depth = 2000
    text = (
        "custom_model_config "
        + "{ [type.googleapis.com/google.protobuf.Any] " * depth
        + "{}"
        + " }" * depth
    )
    with pytest.raises(ModelConfigError, match="nested too deeply"):
        parse_model_config(text)


def test_load_reads_the_file_and_names_it_in_errors(tmp_path: Path) -> None:
    """load_model_config parses a file, and its errors start with the file's path."""
    good = tmp_path / "models.conf"
    good.write_text(ISSUE_EXAMPLE, encoding="utf-8")
    assert load_model_config(good) == parse_model_config(ISSUE_EXAMPLE)
    bad = tmp_path / "bad.conf"
    bad.write_text("model_config_list { config { nmae: 'x' } }", encoding="utf-8")
    with pytest.raises(ModelConfigError, match=f"^{bad}: 1:"):
        load_model_config(bad)


def test_load_passes_warnings_on(tmp_path: Path) -> None:
    """load_model_config reports ignored fields through warn, naming the file."""
    path = tmp_path / "models.conf"
    path.write_text(LOGGING, encoding="utf-8")
    warnings: list[str] = []
    load_model_config(path, warn=warnings.append)
    assert [w.split(":")[0] for w in warnings] == [str(path)]


def test_unreadable_or_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing file and a file that is not UTF-8 both raise ModelConfigError naming the path."""
    missing = tmp_path / "missing.conf"
    with pytest.raises(ModelConfigError, match=f"cannot read model config file {missing}"):
        load_model_config(missing)
    latin1 = tmp_path / "latin1.conf"
    latin1.write_bytes(b"model_config_list { config { name: 'caf\xe9' } }")
    with pytest.raises(ModelConfigError, match=f"{latin1} is not UTF-8"):
        load_model_config(latin1)


def test_every_proto_field_has_a_decision() -> None:
    """Each field of the installed TF Serving ModelConfig message is either supported or ignored."""
    fields = {f.name for f in model_server_config_pb2.ModelConfig.DESCRIPTOR.fields}
    assert fields == SUPPORTED_FIELDS | set(IGNORED_FIELDS)


def test_import_does_not_import_tensorflow() -> None:
    """service.model_config and TF Serving's config protos load without TensorFlow."""
    code = "import sys, service.model_config; print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# -- VersionPolicy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "on_disk", "served"),
    [
        (VersionPolicy("latest"), [1, 2, 3], {3}),
        (VersionPolicy("latest", 2), [3, 1, 2], {2, 3}),
        (VersionPolicy("latest", 5), [1, 2], {1, 2}),
        (VersionPolicy("all"), [1, 2, 3], {1, 2, 3}),
        (VersionPolicy("specific", versions=frozenset({1, 4})), [1, 2, 3], {1}),
        (VersionPolicy("latest"), [], set()),
        (VersionPolicy("all"), [], set()),
        (VersionPolicy("specific", versions=frozenset({1})), [], set()),
    ],
)
def test_select_follows_tf_serving(policy: VersionPolicy, on_disk: list[int], served: set) -> None:
    """latest N takes the N highest, all takes all, specific takes the listed ones on disk."""
    assert policy.select(on_disk) == served


@pytest.mark.parametrize(
    ("policy", "text"),
    [
        (VersionPolicy("latest"), "latest 1"),
        (VersionPolicy("latest", 2), "latest 2"),
        (VersionPolicy("all"), "all"),
        (VersionPolicy("specific", versions=frozenset({2, 1})), "specific 1, 2"),
    ],
)
def test_describe_for_logs(policy: VersionPolicy, text: str) -> None:
    """describe() names the kind and its numbers, versions in order."""
    assert policy.describe() == text


@pytest.mark.parametrize("bad", [dict(kind="newest"), dict(kind="latest", num_versions=0)])
def test_policy_refuses_unknown_kind_and_zero_versions(bad: dict) -> None:
    """A VersionPolicy of an unknown kind, or latest 0, cannot be built."""
    with pytest.raises(ValueError):
        VersionPolicy(**bad)


versions_on_disk = st.lists(st.integers(0, 10**6), max_size=20)


@given(on_disk=versions_on_disk, n=st.integers(1, 25))
def test_latest_picks_the_n_highest(on_disk: list[int], n: int) -> None:
    """latest N selects min(N, count) versions, all of them at least as high as any left out."""
    chosen = VersionPolicy("latest", n).select(on_disk)
    assert chosen <= set(on_disk)
    assert len(chosen) == min(n, len(set(on_disk)))
    assert all(c > other for c in chosen for other in set(on_disk) - chosen)


@given(
    on_disk=versions_on_disk,
    policy=st.one_of(
        st.builds(VersionPolicy, st.just("latest"), st.integers(1, 25)),
        st.just(VersionPolicy("all")),
        st.builds(
            VersionPolicy,
            st.just("specific"),
            versions=st.frozensets(st.integers(0, 10**6), min_size=1, max_size=5),
        ),
    ),
)
def test_select_only_picks_versions_on_disk(on_disk: list[int], policy: VersionPolicy) -> None:
    """Whatever the policy, it selects a subset of the versions on disk."""
    assert policy.select(on_disk) <= set(on_disk)


# -- Round trips and random damage -------------------------------------------------------------

label_names = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,8}", fullmatch=True)


@st.composite
def model_configs(draw: st.DrawFn, name: str) -> ModelConfig:
    """A valid ModelConfig with a random policy and labels that fit it."""
    policy = draw(
        st.one_of(
            st.builds(VersionPolicy, st.just("latest"), st.integers(1, 5)),
            st.just(VersionPolicy("all")),
            st.builds(
                VersionPolicy,
                st.just("specific"),
                versions=st.frozensets(st.integers(0, 10**9), min_size=1, max_size=4),
            ),
        )
    )
    versions = (
        st.sampled_from(sorted(policy.versions))
        if policy.kind == "specific"
        else st.integers(0, 10**9)
    )
    return ModelConfig(
        name=name,
        base_path=Path(
            draw(st.from_regex(r"/[a-z0-9_.-]{1,10}(/[a-z0-9_.-]{1,10}){0,2}", fullmatch=True))
        ),
        policy=policy,
        labels=draw(st.dictionaries(label_names, versions, max_size=3)),
    )


def render(models: list[ModelConfig]) -> str:
    """The model config file TF Serving would read for ``models``."""
    lines = ["model_config_list {"]
    for m in models:
        policy = {
            "latest": f"latest {{ num_versions: {m.policy.num_versions} }}",
            "all": "all {}",
            "specific": "specific { "
            + " ".join(f"versions: {v}" for v in sorted(m.policy.versions))
            + " }",
        }[m.policy.kind]
        labels = " ".join(
            f"version_labels {{ key: '{k}' value: {v} }}" for k, v in m.labels.items()
        )
        lines.append(
            f"  config {{ name: '{m.name}' base_path: '{m.base_path}' model_platform: 'tensorflow'"
            f" model_version_policy {{ {policy} }} {labels} }}"
        )
    lines.append("}")
    return "\n".join(lines)


@given(
    st.lists(
        st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True), unique=True, max_size=4
    ).flatmap(lambda names: st.tuples(*(model_configs(n) for n in names)))
)
def test_rendered_configs_parse_back_unchanged(models: tuple[ModelConfig, ...]) -> None:
    """Any valid set of models, written as a config file, parses back to the same configs."""
    assert parse_model_config(render(list(models))) == list(models)


field_names = sorted(
    {
        f.name
        for message in (
            model_server_config_pb2.ModelServerConfig,
            model_server_config_pb2.ModelConfigList,
            model_server_config_pb2.ModelConfig,
        )
        for f in message.DESCRIPTOR.fields
    }
    | {"latest", "all", "specific", "num_versions", "versions", "key", "value"}
)
fragments = st.one_of(
    st.sampled_from(field_names),
    st.sampled_from(["{", "}", "<", ">", "[", "]", ":", ",", ";", "'", '"', "#", "\n", " ", "\\"]),
    st.sampled_from(["0", "-1", "1.5", "99999999999999999999", "0x1f", "TENSORFLOW", "OTHER"]),
    st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
    st.text(max_size=8),
)


@st.composite
def damaged_configs(draw: st.DrawFn) -> str:
    """A valid config text with a few characters or tokens deleted, inserted or replaced."""
    text = draw(st.sampled_from(VALID_TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, len(text)))
        stop = draw(st.integers(start, min(len(text), start + 12)))
        match draw(st.sampled_from(["delete", "insert", "replace"])):
            case "delete":
                text = text[:start] + text[stop:]
            case "insert":
                text = text[:start] + draw(fragments) + text[start:]
            case _:
                text = text[:start] + draw(fragments) + text[stop:]
    return text


@given(damaged_configs())
def test_damaged_configs_parse_or_fail_cleanly(text: str) -> None:
    """A damaged config either parses to valid configs or raises ModelConfigError, nothing else."""
    try:
        models = parse_model_config(text)
    except ModelConfigError as e:
        assert str(e).startswith("model config: ")
        return
    assert len({m.name for m in models}) == len(models)
    for m in models:
        assert m.name and "/" not in m.name and ":" not in m.name
        assert str(m.base_path)
        assert all(v >= 0 for v in m.labels.values())
        if m.policy.kind == "specific":
            assert m.policy.versions and set(m.labels.values()) <= m.policy.versions


@given(st.text(max_size=80))
def test_any_text_parses_or_fails_cleanly(text: str) -> None:
    """Random unicode text either parses or raises ModelConfigError, nothing else."""
    try:
        assert isinstance(parse_model_config(text), list)
    except ModelConfigError:
        pass
