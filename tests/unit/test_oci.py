"""The OCI domain module: grammars, references, API paths, media types and error bodies.

The grammars are the OCI distribution spec's (see REFERENCE.md); Hypothesis generates strings
from them and from arbitrary text, so a parser either returns a valid value or raises our
`RegistryError` with the right code, never anything else.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.errors import ErrorCode, RegistryError
from proxy.oci import (
    ApiPath,
    BlobPath,
    Digest,
    ManifestPath,
    MediaType,
    Ping,
    ReferrersPath,
    Repository,
    Tag,
    TagsPath,
    Unsupported,
    accepted_media_types,
    manifest_media_type,
    manifest_types,
    parse_api_path,
    parse_reference,
)

# The grammars as written in the OCI distribution spec, kept apart from proxy/oci.py's regexes so
# a mistake in one is caught by the other.
NAME_GRAMMAR = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*"
TAG_GRAMMAR = r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"
SHA256_GRAMMAR = r"sha256:[a-f0-9]{64}"
SHA512_GRAMMAR = r"sha512:[a-f0-9]{128}"

SHA256 = "sha256:" + "ab" * 32
SHA512 = "sha512:" + "cd" * 64

names = st.from_regex(NAME_GRAMMAR, fullmatch=True)
tags = st.from_regex(TAG_GRAMMAR, fullmatch=True)
digests = st.from_regex(SHA256_GRAMMAR, fullmatch=True) | st.from_regex(
    SHA512_GRAMMAR, fullmatch=True
)

# Text that sometimes lands inside a grammar and often just outside it.
near_grammar_text = st.text(alphabet="az09AZ._-/:%\x00 \n", max_size=40)
any_text = near_grammar_text | st.text(max_size=80)

# Path segments an attacker or a confused client might send after /v2/.
PATH_SEGMENTS = [
    "library",
    "alpine",
    "a",
    "..",
    ".",
    "",
    "%2e%2e",
    "%2E%2E",
    "%2f",
    "..%2f",
    "\x00",
    "Upper",
    "manifests",
    "blobs",
    "uploads",
    "tags",
    "list",
    "referrers",
    "_catalog",
    "latest",
    "3.20",
    SHA256,
    "sha256:totallywrong",
]
api_paths = (
    st.lists(st.sampled_from(PATH_SEGMENTS), max_size=8).map("/".join)
    | st.lists(st.sampled_from(PATH_SEGMENTS), max_size=8).map(lambda parts: "/" + "/".join(parts))
    | st.text(max_size=200)
)


def _assert_code(error: RegistryError, code: ErrorCode) -> None:
    assert error.code is code, f"{error.code.name} instead of {code.name}: {error.message}"


# --- Digest ---------------------------------------------------------------------------------


@given(digests)
def test_a_digest_from_the_grammar_parses_and_prints_back_unchanged(text: str) -> None:
    digest = Digest.parse(text)
    assert str(digest) == text
    assert digest.algorithm == text.split(":")[0]


@given(any_text)
@example("sha256:totallywrong")
@example("sha256:" + "AB" * 32)
@example("md5:" + "ab" * 16)
@example(SHA256 + "\n")
@example(SHA256[:-1])
@example("sha256" + "ab" * 32)
def test_any_text_is_a_valid_digest_or_a_digest_invalid_error(text: str) -> None:
    try:
        digest = Digest.parse(text)
    except RegistryError as error:
        _assert_code(error, ErrorCode.DIGEST_INVALID)
        assert error.status == HTTPStatus.BAD_REQUEST
    else:
        assert re.fullmatch(f"{SHA256_GRAMMAR}|{SHA512_GRAMMAR}", text)
        assert str(digest) == text


def test_a_digest_with_an_encoded_part_that_is_not_hex_is_invalid() -> None:
    with pytest.raises(RegistryError) as raised:
        Digest.parse("sha256:totallywrong")
    _assert_code(raised.value, ErrorCode.DIGEST_INVALID)


@pytest.mark.parametrize(
    "text",
    ["sha256:" + "ab" * 31, "sha256:" + "ab" * 33, "sha512:" + "ab" * 32, "sha256:" + "AB" * 32],
)
def test_a_digest_of_the_wrong_length_or_case_is_invalid(text: str) -> None:
    with pytest.raises(RegistryError) as raised:
        Digest.parse(text)
    _assert_code(raised.value, ErrorCode.DIGEST_INVALID)


def test_the_digest_of_some_bytes_is_their_sha256() -> None:
    digest = Digest.of(b"hello")
    assert str(digest) == "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert Digest.parse(str(digest)) == digest


def test_a_digest_hasher_uses_the_digest_algorithm() -> None:
    hasher = Digest.parse(SHA512).hasher()
    hasher.update(b"x")
    assert Digest("sha512", hasher.hexdigest()) == Digest.of(b"x", "sha512")


# --- Repository -----------------------------------------------------------------------------


@given(names)
@settings(max_examples=50)  # generating from the nested name grammar is slow
def test_a_name_from_the_grammar_parses_and_prints_back_unless_too_long(text: str) -> None:
    if len(text) > 255:
        with pytest.raises(RegistryError) as raised:
            Repository.parse(text)
        _assert_code(raised.value, ErrorCode.NAME_INVALID)
    else:
        assert str(Repository.parse(text)) == text


@given(any_text)
@example("library/Alpine")
@example("a//b")
@example("a/../b")
@example("%2e%2e/etc")
@example("a__b")
@example("a___b")
@example("-a")
@example("a-")
@example("a" * 256)
def test_any_text_is_a_valid_name_or_a_name_invalid_error(text: str) -> None:
    try:
        repository = Repository.parse(text)
    except RegistryError as error:
        _assert_code(error, ErrorCode.NAME_INVALID)
    else:
        assert re.fullmatch(NAME_GRAMMAR, text)
        assert len(text) <= 255
        assert str(repository) == text


@pytest.mark.parametrize("text", ["Library/alpine", "library/ALPINE", "UPPER"])
def test_a_name_with_upper_case_letters_is_invalid(text: str) -> None:
    with pytest.raises(RegistryError) as raised:
        Repository.parse(text)
    _assert_code(raised.value, ErrorCode.NAME_INVALID)
    assert raised.value.status == HTTPStatus.BAD_REQUEST


@pytest.mark.parametrize(
    "text", ["library/alpine", "a/b/c", "my-org/my_image.v2", "a--b", "a__b", "ghcr.io/x/y"]
)
def test_names_with_several_components_and_separators_are_valid(text: str) -> None:
    assert Repository.parse(text).name == text


# --- Tag and reference ----------------------------------------------------------------------


@given(tags)
def test_a_tag_from_the_grammar_parses_and_prints_back_unchanged(text: str) -> None:
    assert str(Tag.parse(text)) == text
    assert parse_reference(text) == Tag(text)


@given(any_text)
@example("." + "a")
@example("-latest")
@example("a" * 129)
@example("a" * 128)
@example("")
def test_any_text_is_a_valid_tag_or_a_manifest_unknown_error(text: str) -> None:
    try:
        tag = Tag.parse(text)
    except RegistryError as error:
        _assert_code(error, ErrorCode.MANIFEST_UNKNOWN)
    else:
        assert re.fullmatch(TAG_GRAMMAR, text)
        assert str(tag) == text


@given(digests)
def test_a_reference_with_a_colon_is_a_digest(text: str) -> None:
    assert parse_reference(text) == Digest.parse(text)


@given(any_text)
def test_any_reference_text_parses_or_raises_the_code_for_what_it_looks_like(text: str) -> None:
    try:
        reference = parse_reference(text)
    except RegistryError as error:
        expected = ErrorCode.DIGEST_INVALID if ":" in text else ErrorCode.MANIFEST_UNKNOWN
        _assert_code(error, expected)
    else:
        assert str(reference) == text
        assert isinstance(reference, Digest if ":" in text else Tag)


# --- API paths ------------------------------------------------------------------------------


@given(api_paths)
@example("../../etc/passwd/manifests/latest")
@example("%2e%2e/%2e%2e/etc/manifests/latest")
@example("a/%2e%2e/b/blobs/" + SHA256)
@example("a/\x00/manifests/latest")
@example("/etc/passwd/manifests/latest")
@example("a/./b/tags/list")
@example("blobs/uploads/")
@example("manifests/latest")
@settings(max_examples=300)
def test_any_path_is_an_api_path_or_a_registry_error_and_never_escapes(text: str) -> None:
    try:
        api = parse_api_path(text)
    except RegistryError:
        return
    assert isinstance(api, ApiPath)
    assert api.endpoint in {"ping", "manifest", "blob", "tags", "referrers", "unsupported"}
    if not isinstance(api, Ping | Unsupported):
        name = api.repository.name
        assert ".." not in name.split("/")
        assert "%" not in name
        assert "\x00" not in name
        assert not name.startswith("/")
        assert re.fullmatch(NAME_GRAMMAR, name)
    if isinstance(api, BlobPath | ReferrersPath):
        assert isinstance(api.digest, Digest)


@pytest.mark.parametrize(
    "text",
    [
        "a" * 1_000_000,
        "a/" * 200_000 + "manifests/latest",
        "a-" * 200_000 + "a/manifests/latest",
        "a/blobs/" * 100_000 + SHA256,
    ],
)
def test_a_very_long_path_is_rejected_quickly_with_a_registry_error(text: str) -> None:
    with pytest.raises(RegistryError):
        parse_api_path(text)


def test_an_empty_tail_is_the_ping_endpoint() -> None:
    assert parse_api_path("") == Ping()


@pytest.mark.parametrize(
    ("text", "repository", "reference"),
    [
        ("library/alpine/manifests/3.20", "library/alpine", Tag("3.20")),
        ("a/b/c/manifests/latest", "a/b/c", Tag("latest")),
        ("docker.io/library/nginx/manifests/1.27", "docker.io/library/nginx", Tag("1.27")),
        ("alpine/manifests/" + SHA256, "alpine", Digest.parse(SHA256)),
        # A repository may itself be called "manifests": the endpoint is read from the end.
        ("x/manifests/manifests/latest", "x/manifests", Tag("latest")),
    ],
)
def test_a_manifest_path_splits_into_repository_and_reference(
    text: str, repository: str, reference: Tag | Digest
) -> None:
    assert parse_api_path(text) == ManifestPath(Repository(repository), reference)


def test_a_blob_path_names_a_repository_and_a_digest() -> None:
    api = parse_api_path("library/alpine/blobs/" + SHA512)
    assert api == BlobPath(Repository("library/alpine"), Digest.parse(SHA512))
    assert api.digest == Digest.parse(SHA512)


def test_a_tags_list_path_names_only_a_repository() -> None:
    assert parse_api_path("a/b/tags/list") == TagsPath(Repository("a/b"))


def test_a_referrers_path_names_a_repository_and_a_digest() -> None:
    api = parse_api_path("a/referrers/" + SHA256)
    assert api == ReferrersPath(Repository("a"), Digest.parse(SHA256))


@pytest.mark.parametrize(
    "text",
    [
        "_catalog",
        "_catalog/",
        "library/alpine/blobs/uploads/",
        "library/alpine/blobs/uploads/0c3b4d8e-uuid",
        "a/b/c/blobs/uploads/",
    ],
)
def test_writes_and_the_catalog_are_unsupported_endpoints(text: str) -> None:
    assert parse_api_path(text).endpoint == "unsupported"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("Library/alpine/manifests/latest", ErrorCode.NAME_INVALID),
        ("%2e%2e/x/manifests/latest", ErrorCode.NAME_INVALID),
        ("../x/manifests/latest", ErrorCode.NAME_INVALID),
        ("a//b/manifests/latest", ErrorCode.NAME_INVALID),
        ("x/manifests/sha256:totallywrong", ErrorCode.DIGEST_INVALID),
        ("x/blobs/latest", ErrorCode.DIGEST_INVALID),
        ("x/referrers/latest", ErrorCode.DIGEST_INVALID),
    ],
)
def test_a_bad_name_or_reference_in_a_path_raises_its_own_code(text: str, code: ErrorCode) -> None:
    with pytest.raises(RegistryError) as raised:
        parse_api_path(text)
    _assert_code(raised.value, code)
    assert raised.value.status == HTTPStatus.BAD_REQUEST


@pytest.mark.parametrize(
    "text",
    [
        "x/manifests/.INVALID_MANIFEST_NAME",
        "x/manifests/-bad-tag",
        "x/manifests/",
        "x/manifests/" + "a" * 129,
    ],
)
def test_a_reference_that_is_neither_a_tag_nor_a_digest_is_an_unknown_manifest(text: str) -> None:
    """No manifest can have such a name: 404 MANIFEST_UNKNOWN, as Distribution answers and the
    OCI conformance suite expects (this replaced an earlier 400 MANIFEST_INVALID)."""
    with pytest.raises(RegistryError) as raised:
        parse_api_path(text)
    _assert_code(raised.value, ErrorCode.MANIFEST_UNKNOWN)
    assert raised.value.status == HTTPStatus.NOT_FOUND


@pytest.mark.parametrize("text", ["library", "a/unknown", "tags/list", "a/tags/other", "v2"])
def test_an_unknown_endpoint_is_a_404(text: str) -> None:
    with pytest.raises(RegistryError) as raised:
        parse_api_path(text)
    _assert_code(raised.value, ErrorCode.UNSUPPORTED)
    assert raised.value.status == HTTPStatus.NOT_FOUND


# --- Media types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"mediaType": MediaType.DOCKER_MANIFEST, "config": {}}, MediaType.DOCKER_MANIFEST),
        ({"mediaType": MediaType.DOCKER_LIST, "manifests": []}, MediaType.DOCKER_LIST),
        ({"schemaVersion": 2, "manifests": []}, MediaType.OCI_INDEX),
        ({"schemaVersion": 2, "config": {}, "layers": []}, MediaType.OCI_MANIFEST),
        ({"schemaVersion": 1, "fsLayers": []}, MediaType.DOCKER_SCHEMA1),
        ({"mediaType": "", "manifests": []}, MediaType.OCI_INDEX),
        ({"mediaType": 7, "config": {}}, MediaType.OCI_MANIFEST),
    ],
)
def test_a_manifest_media_type_is_its_own_field_or_inferred(
    document: dict[str, object], expected: str
) -> None:
    assert manifest_media_type(json.dumps(document).encode()) == expected


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[1, 2]", b'"a string"', b"\xff\xfe\x00", b"[" * 100_000]
)
def test_bytes_that_are_not_a_json_object_are_octet_stream(body: bytes) -> None:
    assert manifest_media_type(body) == "application/octet-stream"


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_manifest_bytes_give_a_media_type_and_never_raise(body: bytes) -> None:
    assert isinstance(manifest_media_type(body), str)


def test_accepted_media_types_are_read_from_every_accept_line() -> None:
    # containers/image sends one Accept line per type; containerd one comma-joined line.
    lines = [
        f"{MediaType.OCI_INDEX}",
        f"{MediaType.DOCKER_MANIFEST}; q=0.9, {MediaType.OCI_MANIFEST}",
        " Application/JSON ,, ",
    ]
    assert accepted_media_types(lines) == {
        MediaType.OCI_INDEX,
        MediaType.DOCKER_MANIFEST,
        MediaType.OCI_MANIFEST,
        "application/json",
    }


@given(st.permutations([MediaType.OCI_INDEX, MediaType.DOCKER_LIST, "application/json", "*/*"]))
def test_accepted_media_types_do_not_depend_on_their_order(types: list[str]) -> None:
    # dockerd reorders its Accept list between requests; the set is what a cache key needs.
    assert accepted_media_types([", ".join(types)]) == accepted_media_types(sorted(types))


def test_no_accept_header_accepts_nothing_in_particular() -> None:
    assert accepted_media_types([]) == frozenset()
    assert accepted_media_types(["", " , "]) == frozenset()


@pytest.mark.parametrize(
    ("accepted", "media_type", "expected"),
    [
        (frozenset(), MediaType.OCI_INDEX, True),
        (frozenset({"*/*"}), MediaType.OCI_INDEX, True),
        (frozenset({MediaType.OCI_INDEX}), MediaType.OCI_INDEX, True),
        (frozenset({"application/*"}), MediaType.OCI_INDEX, True),
        (frozenset({MediaType.DOCKER_MANIFEST}), MediaType.OCI_INDEX, False),
        (
            frozenset({MediaType.DOCKER_MANIFEST, MediaType.OCI_MANIFEST}),
            MediaType.DOCKER_LIST,
            False,
        ),
        (frozenset({"text/*"}), MediaType.OCI_MANIFEST, False),
    ],
)
def test_a_client_accepts_exact_wildcard_or_any_type_when_it_names_none(
    accepted: frozenset[str], media_type: str, expected: bool
) -> None:
    assert (media_type in manifest_types(accepted)) is expected


# --- Errors ---------------------------------------------------------------------------------


def test_an_error_body_is_the_oci_errors_document() -> None:
    error = RegistryError(ErrorCode.MANIFEST_UNKNOWN, "no such tag", detail={"tag": "x"})
    assert json.loads(error.body()) == {
        "errors": [{"code": "MANIFEST_UNKNOWN", "message": "no such tag", "detail": {"tag": "x"}}]
    }
    assert error.status == HTTPStatus.NOT_FOUND
    assert error.headers == {}


def test_an_error_without_message_or_detail_uses_the_code_message_and_omits_detail() -> None:
    error = RegistryError(ErrorCode.BLOB_UNKNOWN)
    assert json.loads(error.body()) == {
        "errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry"}]
    }
    assert str(error) == "BLOB_UNKNOWN: blob unknown to registry"


def test_an_error_status_and_headers_can_be_overridden() -> None:
    error = RegistryError(
        ErrorCode.TOOMANYREQUESTS, status=HTTPStatus.SERVICE_UNAVAILABLE, headers={"A": "b"}
    )
    assert error.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert error.headers == {"A": "b"}
    assert RegistryError(ErrorCode.TOOMANYREQUESTS).status == HTTPStatus.TOO_MANY_REQUESTS


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.BLOB_UNKNOWN, 404),
        (ErrorCode.MANIFEST_UNKNOWN, 404),
        (ErrorCode.NAME_UNKNOWN, 404),
        (ErrorCode.DIGEST_INVALID, 400),
        (ErrorCode.NAME_INVALID, 400),
        (ErrorCode.UNAUTHORIZED, 401),
        (ErrorCode.DENIED, 403),
        (ErrorCode.UNSUPPORTED, 405),
        (ErrorCode.TOOMANYREQUESTS, 429),
    ],
)
def test_each_error_code_has_the_status_the_spec_gives_it(code: ErrorCode, status: int) -> None:
    assert code.status == status
    assert code.message


@given(st.sampled_from(ErrorCode), st.text(max_size=50), st.none() | st.text(max_size=20))
def test_every_error_body_is_json_naming_its_code(
    code: ErrorCode, message: str, detail: str | None
) -> None:
    document = json.loads(RegistryError(code, message, detail=detail).body())
    [error] = document["errors"]
    assert error["code"] == code.name
    assert error["message"] == (message or code.message)
    assert error.get("detail") == detail
