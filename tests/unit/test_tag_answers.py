"""Which cached manifest answers which client, and which 404 is whose (pure, no I/O).

What a tag resolves to depends on the set of manifest media types a client accepts, not on how
its Accept header is spelled; each client writes it differently (REFERENCE.md).
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from proxy.cache.tag_answers import Misses, Resolution, TagAnswers
from proxy.oci import MediaType, accepted_media_types, manifest_types

OCI_MANIFEST = MediaType.OCI_MANIFEST
OCI_INDEX = MediaType.OCI_INDEX
DOCKER_MANIFEST = MediaType.DOCKER_MANIFEST
DOCKER_LIST = MediaType.DOCKER_LIST
SCHEMA1 = MediaType.DOCKER_SCHEMA1
ALL = MediaType.MANIFESTS
IMAGES_ONLY = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

# The Accept header lines real clients send on a tag (REFERENCE.md, captured on this machine).
DOCKERD = [DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX, SCHEMA1, "application/json"]
CONTAINERD = [f"{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*"]
CONTAINERS_IMAGE = [
    OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST, SCHEMA1,
    "application/vnd.docker.distribution.manifest.v1+json",
]  # fmt: skip


def types_of(lines: list[str]) -> frozenset[str]:
    return manifest_types(accepted_media_types(lines))


def resolution(digest: str, media_type: str, checked: float = 100.0) -> Resolution:
    return Resolution(f"sha256:{digest * 64}"[:71], media_type, 500, checked)


def chosen(answers: TagAnswers, types: frozenset[str]) -> str | None:
    """The digest of the manifest chosen for a client admitting `types`."""
    found = answers.choose(types)
    return None if found is None else found.digest


def test_every_real_client_accept_list_normalises_to_every_manifest_type() -> None:
    for lines in (DOCKERD, CONTAINERD, CONTAINERS_IMAGE, []):
        assert types_of(lines) == ALL


def test_wildcards_expand_and_unknown_types_are_ignored() -> None:
    assert types_of(["application/*"]) == ALL
    assert types_of([f"{OCI_MANIFEST};q=0.9, application/json, text/html"]) == {OCI_MANIFEST}
    assert types_of([OCI_MANIFEST.upper()]) == {OCI_MANIFEST}
    assert types_of(["application/json"]) == frozenset()


def test_an_index_is_chosen_over_an_image_manifest_when_the_client_accepts_both() -> None:
    index, child = resolution("a", OCI_INDEX), resolution("b", OCI_MANIFEST)
    answers = TagAnswers().record(ALL, index).record(IMAGES_ONLY, child)

    assert chosen(answers, ALL) == index.digest
    assert chosen(answers, types_of(CONTAINERD)) == index.digest
    assert chosen(answers, IMAGES_ONLY) == child.digest
    assert chosen(answers, frozenset({DOCKER_MANIFEST})) is None


def test_a_manifest_answered_to_a_client_without_indexes_is_never_given_to_one_with_them() -> None:
    # The upstream may answer an images-only client with one platform's manifest of an
    # index: handing that to an index-capable client could pull the wrong platform.
    child = resolution("b", OCI_MANIFEST)
    answers = TagAnswers().record(IMAGES_ONLY, child)

    assert chosen(answers, IMAGES_ONLY) == child.digest
    assert chosen(answers, frozenset({OCI_MANIFEST})) == child.digest
    assert chosen(answers, ALL) is None
    assert chosen(answers, IMAGES_ONLY | {OCI_INDEX}) is None


def test_an_image_manifest_answered_to_a_client_with_indexes_answers_every_client() -> None:
    image = resolution("c", DOCKER_MANIFEST)
    answers = TagAnswers().record(types_of(DOCKERD), image)

    for lines in (DOCKERD, CONTAINERD, CONTAINERS_IMAGE):
        assert chosen(answers, types_of(lines)) == image.digest
    assert chosen(answers, IMAGES_ONLY) == image.digest
    assert chosen(answers, frozenset({OCI_MANIFEST})) is None


def test_a_tag_that_moved_replaces_what_the_same_client_would_have_been_given() -> None:
    old_index = resolution("a", OCI_INDEX, checked=1.0)
    old_child = resolution("b", OCI_MANIFEST, checked=1.0)
    answers = TagAnswers().record(ALL, old_index).record(IMAGES_ONLY, old_child)

    new_image = resolution("d", DOCKER_MANIFEST, checked=2.0)
    moved = answers.record(ALL, new_image)  # the tag is a single image now

    assert [r.digest for r in moved] == [new_image.digest]
    assert chosen(moved, ALL) == new_image.digest
    assert chosen(moved, IMAGES_ONLY) == new_image.digest


def test_a_new_index_keeps_the_manifest_answered_to_clients_without_indexes() -> None:
    child = resolution("b", OCI_MANIFEST, checked=1.0)
    index = resolution("e", OCI_INDEX, checked=2.0)
    answers = TagAnswers().record(IMAGES_ONLY, child).record(ALL, index)

    assert chosen(answers, ALL) == index.digest
    assert chosen(answers, IMAGES_ONLY) == child.digest


def test_among_image_manifests_the_most_recently_confirmed_wins() -> None:
    older = resolution("a", DOCKER_MANIFEST, checked=1.0)
    newer = resolution("b", OCI_MANIFEST, checked=2.0)
    answers = (
        TagAnswers()
        .record(frozenset({DOCKER_MANIFEST}) | MediaType.INDEXES, older)
        .record(frozenset({OCI_MANIFEST}) | MediaType.INDEXES, newer)
    )
    assert chosen(answers, ALL) == newer.digest


def test_confirming_the_same_manifest_for_another_set_widens_whom_it_answers() -> None:
    image = resolution("c", OCI_MANIFEST, checked=1.0)
    answers = TagAnswers().record(IMAGES_ONLY, image)
    assert chosen(answers, ALL) is None
    again = resolution("c", OCI_MANIFEST, checked=5.0)
    answers = answers.record(ALL, again)
    assert answers.choose(IMAGES_ONLY) is not None
    assert answers.choose(ALL) == answers.choose(IMAGES_ONLY)
    assert len(answers) == 1


def test_a_404_for_one_set_removes_only_what_that_set_could_be_given() -> None:
    index, child = resolution("a", OCI_INDEX), resolution("b", OCI_MANIFEST)
    answers = TagAnswers().record(ALL, index).record(IMAGES_ONLY, child)

    assert [r.digest for r in answers.refused(IMAGES_ONLY)] == [index.digest]
    assert list(answers.refused(ALL)) == []


@given(
    st.lists(
        st.tuples(
            st.frozensets(st.sampled_from(sorted(ALL)), min_size=1),
            st.sampled_from(sorted(ALL)),
            st.sampled_from("0123456789abcdef"),
        ),
        max_size=60,
    )
)
def test_a_tag_holds_at_most_one_manifest_per_media_type_whatever_clients_ask(
    steps: list[tuple[frozenset[str], str, str]],
) -> None:
    answers = TagAnswers()
    for checked, (types, media_type, digest) in enumerate(steps):
        if media_type not in types:
            continue  # the mirror never records an answer the set does not admit
        answers = answers.record(types, resolution(digest, media_type, float(checked)))
        assert answers.choose(types) is not None
    assert len(answers) <= len(ALL)
    assert len({r.media_type for r in answers}) == len(answers)


def test_answers_round_trip_through_json() -> None:
    answers = (
        TagAnswers()
        .record(ALL, resolution("a", OCI_INDEX))
        .record(IMAGES_ONLY, resolution("b", OCI_MANIFEST))
    )
    again = TagAnswers.from_json(json.loads(json.dumps(answers.to_json())))
    assert list(again) == list(answers)
    assert again.choose(IMAGES_ONLY) == answers.choose(IMAGES_ONLY)


def test_an_entry_written_by_the_previous_version_answers_only_where_that_is_safe() -> None:
    # Before: {accept-set hash: resolution}, with no record of which set it answered.
    legacy = {
        "0123456789abcdef": {
            "digest": "sha256:" + "a" * 64, "media_type": OCI_INDEX, "size": 9, "checked": 5.0,
        },
        "fedcba9876543210": {
            "digest": "sha256:" + "b" * 64, "media_type": OCI_MANIFEST, "size": 7, "checked": 6.0,
        },
        "junk": {"digest": 3},
    }  # fmt: skip
    answers = TagAnswers.from_json(legacy)
    index = answers.choose(ALL)
    assert index is not None
    assert index.media_type == OCI_INDEX
    child = answers.choose(IMAGES_ONLY)
    assert child is not None
    assert child.digest == "sha256:" + "b" * 64
    assert list(TagAnswers.from_json(["not", "a", "dict"])) == []
    assert list(TagAnswers.from_json({OCI_INDEX: "garbage"})) == []


def test_a_404_for_a_restricted_set_is_not_a_404_for_a_wider_one() -> None:
    misses = Misses().add(IMAGES_ONLY, until=100.0, now=0.0)
    assert misses.covers(IMAGES_ONLY, now=1.0)
    assert misses.covers(frozenset({OCI_MANIFEST}), now=1.0)
    assert not misses.covers(ALL, now=1.0)
    assert not misses.covers(IMAGES_ONLY | {OCI_INDEX}, now=1.0)
    assert not misses.covers(IMAGES_ONLY, now=100.0)


def test_a_404_for_every_manifest_type_is_shared_by_all() -> None:
    misses = Misses().add(ALL, until=100.0, now=0.0)
    for types in (ALL, IMAGES_ONLY, frozenset({DOCKER_LIST})):
        assert misses.covers(types, now=1.0)


def test_misses_stay_few_and_survive_json() -> None:
    misses = Misses()
    for size in range(1, len(ALL) + 1):
        for first in range(len(ALL)):
            types = frozenset(sorted(ALL)[first : first + size])
            misses = misses.add(types, until=100.0, now=0.0)
    assert len(misses) <= 8
    again = Misses.from_json(json.loads(json.dumps(misses.to_json())))
    assert again.covers(ALL, now=1.0)
    assert not Misses.from_json(1).covers(ALL, now=1.0)  # the previous version's marker
