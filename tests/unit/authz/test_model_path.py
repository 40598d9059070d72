"""Model paths: which model a request is for, and which paths are refused before any lookup."""

from __future__ import annotations

import pytest

from maas_authz.model_path import (
    BadPath,
    ModelRef,
    OpenPath,
    PathRouting,
    PathTemplate,
    is_namespace_name,
    is_object_name,
)

DEFAULT = PathRouting(PathTemplate("/{namespace}/{model}"))


def bad(result: object, status: int = 400) -> BadPath:
    assert isinstance(result, BadPath), result
    assert result.status == status
    return result


# --- the platform's path -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/llm/tiny/v1/chat/completions",
        "/llm/tiny/v1/completions",
        "/llm/tiny/v1/embeddings",
        "/llm/tiny",
        "/llm/tiny/",
        "/llm/tiny/v1/chat/completions/",
    ],
)
def test_model_path_names_namespace_and_model(path: str) -> None:
    assert DEFAULT.classify(path) == ModelRef("llm", "tiny")


def test_platform_example_path() -> None:
    found = DEFAULT.classify("/llm/facebook-opt-125m-simulated/v1/chat/completions")
    assert found == ModelRef("llm", "facebook-opt-125m-simulated")
    assert str(found) == "llm/facebook-opt-125m-simulated"


def test_model_name_may_contain_dots() -> None:
    assert DEFAULT.classify("/team-a/opt-1.3b/v1/completions") == ModelRef("team-a", "opt-1.3b")


@pytest.mark.parametrize(
    "path",
    [
        "/llm/tiny/v1/chat/completions?api-version=2024-01-01",
        "/llm/tiny/v1/chat/completions?x=/../other/model",
        "/llm/tiny/v1/chat/completions?next=%2F..%2Fsecret",
        "/llm/tiny/v1/chat/completions#frag/../../x",
    ],
)
def test_query_string_and_fragment_are_ignored(path: str) -> None:
    assert DEFAULT.classify(path) == ModelRef("llm", "tiny")


# --- refused before any lookup -----------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/llm/../other/tiny/v1/chat/completions",
        "/llm/tiny/../../other/model/v1",
        "/llm/tiny/v1/..",
        "/./llm/tiny",
        "/llm/./tiny",
        "/llm/tiny/.",
        "/llm/%2e%2e/other/v1",
        "/llm/%2E%2E/other/v1",
        "/llm/.%2e/other/v1",
        "/llm/tiny/%2e/v1",
        "/..",
    ],
)
def test_dot_segments_plain_or_encoded_are_refused(path: str) -> None:
    result = bad(DEFAULT.classify(path))
    assert result.code == "invalid_path"
    assert result.message == "the request path must not contain '.' or '..'"


@pytest.mark.parametrize(
    "path",
    [
        "/llm%2Fother/tiny/v1",
        "/llm%2fother/tiny/v1",
        "/llm/tiny%2F..%2F..%2Fx/v1",
        "/llm/tiny%5C..%5Cx/v1",
        "/llm/tiny%5c..%5cx/v1",
        "/llm\\other/tiny/v1",
        "/llm/tiny/v1\\chat",
    ],
)
def test_encoded_slashes_and_backslashes_are_refused(path: str) -> None:
    result = bad(DEFAULT.classify(path))
    assert result.code == "invalid_path"
    assert result.message == "the request path must not contain encoded slashes or backslashes"


@pytest.mark.parametrize(
    "path",
    ["//llm/tiny", "/llm//tiny", "/llm/tiny//v1/chat", "/llm/tiny/v1//", "///", "//"],
)
def test_empty_segments_are_refused(path: str) -> None:
    result = bad(DEFAULT.classify(path))
    assert result.code == "invalid_path"
    assert result.message == "the request path has an empty segment ('//')"


@pytest.mark.parametrize("path", ["", "llm/tiny/v1", "?x=/llm/tiny"])
def test_relative_paths_are_refused(path: str) -> None:
    result = bad(DEFAULT.classify(path))
    assert result.code == "invalid_path"
    assert result.message == "the request path must start with '/'"


def test_uppercase_namespace_is_refused_with_the_segment_quoted() -> None:
    result = bad(DEFAULT.classify("/LLM/tiny/v1/chat/completions"))
    assert result.code == "invalid_model_path"
    assert result.message == "'LLM' is not a valid namespace name"


def test_uppercase_model_is_refused_with_the_segment_quoted() -> None:
    result = bad(DEFAULT.classify("/llm/Tiny/v1/chat/completions"))
    assert result.code == "invalid_model_path"
    assert result.message == "'Tiny' is not a valid model name"


@pytest.mark.parametrize(
    ("path", "segment", "kind"),
    [
        ("/llm/tiny_model/v1", "tiny_model", "model"),
        ("/llm/-tiny/v1", "-tiny", "model"),
        ("/llm/tiny-/v1", "tiny-", "model"),
        ("/llm/.hidden/v1", ".hidden", "model"),
        ("/llm/a..b/v1", "a..b", "model"),
        ("/llm/t%69ny/v1", "t%69ny", "model"),
        ("/my.ns/tiny/v1", "my.ns", "namespace"),
        ("/ns_1/tiny/v1", "ns_1", "namespace"),
        ("/llm/ti ny/v1", "ti ny", "model"),
    ],
)
def test_invalid_names_are_refused(path: str, segment: str, kind: str) -> None:
    result = bad(DEFAULT.classify(path))
    assert result.code == "invalid_model_path"
    assert result.message == f"{segment!r} is not a valid {kind} name"


def test_non_ascii_segment_is_escaped_in_the_message() -> None:
    result = bad(DEFAULT.classify("/llm/tïny-\u202emodel/v1"))
    assert result.message.isascii()
    assert "\\xef" in result.message
    assert "\\u202e" in result.message
    assert "ï" not in result.message
    assert result.message.endswith("is not a valid model name")


def test_long_invalid_segment_is_truncated_in_the_message() -> None:
    segment = "X" * 500
    result = bad(DEFAULT.classify(f"/llm/{segment}/v1"))
    assert result.message == f"'{'X' * 61}...' is not a valid model name"
    assert len(result.message) < 100


def test_segment_of_64_characters_is_quoted_whole() -> None:
    segment = "Y" * 64
    result = bad(DEFAULT.classify(f"/llm/{segment}/v1"))
    assert result.message == f"'{segment}' is not a valid model name"


def test_namespace_longer_than_63_is_refused_and_63_is_accepted() -> None:
    assert DEFAULT.classify(f"/{'n' * 63}/tiny/v1") == ModelRef("n" * 63, "tiny")
    result = bad(DEFAULT.classify(f"/{'n' * 64}/tiny/v1"))
    assert result.code == "invalid_model_path"
    assert result.message.endswith("is not a valid namespace name")
    assert result.message.startswith("'" + "n" * 64 + "'")


def test_model_name_longer_than_253_is_refused_and_253_is_accepted() -> None:
    longest = ".".join(["m" * 63] * 4)[:253]
    assert len(longest) == 253
    assert is_object_name(longest)
    assert DEFAULT.classify(f"/llm/{longest}/v1") == ModelRef("llm", longest)
    result = bad(DEFAULT.classify(f"/llm/{longest}x/v1"))
    assert result.code == "invalid_model_path"
    assert result.message.endswith("is not a valid model name")


def test_name_predicates() -> None:
    assert is_namespace_name("llm")
    assert not is_namespace_name("a.b")  # a namespace is a DNS label, no dots
    assert not is_namespace_name("")
    assert is_object_name("a.b")
    assert not is_object_name("")
    assert not is_object_name("A")


@pytest.mark.parametrize("path", ["/", "/llm", "/llm/", "/?x=1"])
def test_paths_that_name_no_model_are_404(path: str) -> None:
    result = bad(DEFAULT.classify(path), status=404)
    assert result.code == "model_not_found"
    assert result.message == "the path names no model (expected /{namespace}/{model}/...)"


# --- open paths -------------------------------------------------------------------------------

OPEN = PathRouting(
    PathTemplate("/{namespace}/{model}"),
    (
        OpenPath("/v1/models"),
        OpenPath("/docs", match="prefix", authenticate=False),
        OpenPath("/healthz", authenticate=False),
    ),
)


def test_exact_open_path_matches_only_exactly() -> None:
    found = OPEN.classify("/v1/models")
    assert found == OpenPath("/v1/models")
    assert isinstance(found, OpenPath) and found.authenticate
    # a longer path is not the open path: it is read as a model path
    assert OPEN.classify("/v1/models/extra") == ModelRef("v1", "models")


def test_exact_open_path_ignores_the_query() -> None:
    assert OPEN.classify("/v1/models?limit=5") == OpenPath("/v1/models")


def test_prefix_open_path_matches_below_it() -> None:
    for path in ("/docs", "/docs/", "/docs/index.html", "/docs/a/b/c?q=1"):
        found = OPEN.classify(path)
        assert isinstance(found, OpenPath), path
        assert found.path == "/docs"
        assert found.match == "prefix"
        assert not found.authenticate


def test_open_path_with_authenticate_false() -> None:
    found = OPEN.classify("/healthz")
    assert isinstance(found, OpenPath)
    assert found.authenticate is False


def test_open_path_matches() -> None:
    assert OpenPath("/a").matches("/a")
    assert not OpenPath("/a").matches("/a/b")
    assert OpenPath("/a", "prefix").matches("/a/b")
    assert not OpenPath("/a/b", "prefix").matches("/a")


@pytest.mark.parametrize(
    "path",
    [
        "/docs/../llm/tiny/v1/chat/completions",
        "/docs/%2e%2e/llm/tiny/v1",
        "/docs/./x",
        "/docs%2F..%2Fllm/tiny",
        "/docs\\..\\llm\\tiny",
        "/docs//llm/tiny",
        "/v1/models/../../llm/tiny/v1/chat/completions",
    ],
)
def test_open_path_cannot_smuggle_dot_segments_or_separators(path: str) -> None:
    result = bad(OPEN.classify(path))
    assert result.code == "invalid_path"


# --- custom templates --------------------------------------------------------------------------


def test_template_with_a_literal_prefix() -> None:
    routing = PathRouting(PathTemplate("/models/{namespace}/{model}"))
    assert routing.classify("/models/llm/tiny/v1/chat/completions") == ModelRef("llm", "tiny")
    result = bad(routing.classify("/llm/tiny/v1/chat/completions"), status=404)
    assert result.code == "model_not_found"
    assert result.message == "the path names no model (expected /models/{namespace}/{model}/...)"
    bad(routing.classify("/models/llm"), status=404)


def test_template_with_model_before_namespace() -> None:
    routing = PathRouting(PathTemplate("/{model}/in/{namespace}"))
    assert routing.classify("/tiny/in/llm/v1") == ModelRef("llm", "tiny")
    bad(routing.classify("/tiny/at/llm/v1"), status=404)


def test_template_model_only_with_default_namespace() -> None:
    routing = PathRouting(PathTemplate("/{model}", default_namespace="llm"))
    assert routing.classify("/tiny/v1/chat/completions") == ModelRef("llm", "tiny")
    assert routing.classify("/tiny") == ModelRef("llm", "tiny")
    bad(routing.classify("/"), status=404)
    assert bad(routing.classify("/Tiny/v1")).message == "'Tiny' is not a valid model name"


def test_default_namespace_is_overridden_by_a_namespace_segment() -> None:
    routing = PathRouting(PathTemplate("/{namespace}/{model}", default_namespace="llm"))
    assert routing.classify("/team-a/tiny/v1") == ModelRef("team-a", "tiny")


def test_invalid_default_namespace_is_refused_per_request() -> None:
    routing = PathRouting(PathTemplate("/{model}", default_namespace="Bad_NS"))
    result = bad(routing.classify("/tiny/v1"))
    assert result.message == "'Bad_NS' is not a valid namespace name"


@pytest.mark.parametrize(
    ("template", "default_namespace", "message"),
    [
        ("{namespace}/{model}", None, "must start with '/'"),
        ("/{namespace}", None, "must contain the segment {model}"),
        ("/models", "llm", "must contain the segment {model}"),
        ("/{model}/{model}", "llm", "may name {model} and {namespace} once each"),
        ("/{namespace}/{namespace}/{model}", None, "may name {model} and {namespace} once each"),
        ("/{model}", None, "needs a {namespace} segment or models.default_namespace"),
        (
            "/{namespace}/{name}/{model}",
            None,
            "segment '{name}' is neither a literal nor {model}/{namespace}",
        ),
        (
            "/{namespace}//{model}",
            None,
            "segment '' is neither a literal nor {model}/{namespace}",
        ),
        (
            "/x{model}/{namespace}/{model}",
            None,
            "segment 'x{model}' is neither a literal nor {model}/{namespace}",
        ),
        (
            "/pre-{model}/{namespace}",
            None,
            "must contain the segment {model}",
        ),
    ],
)
def test_invalid_templates_raise_value_error(
    template: str, default_namespace: str | None, message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        PathTemplate(template, default_namespace)
    assert str(caught.value) == message
