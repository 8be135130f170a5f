"""Weave ref parsing: what counts as a scorer reference."""

import pytest

from shared.refs import InvalidRefError, WeaveRef, parse_weave_ref


def test_parses_an_op_ref() -> None:
    assert parse_weave_ref("weave:///acme/evals/op/exact_match:abc123") == WeaveRef(
        entity="acme", project="evals", kind="op", name="exact_match", digest="abc123"
    )


def test_parses_an_object_ref_with_extra_path_and_quoted_name() -> None:
    ref = parse_weave_ref("weave:///acme/evals/object/my%2Fscorer:d1/attr/judge/index/2")
    assert (ref.kind, ref.name, ref.digest) == ("object", "my/scorer", "d1")
    assert ref.extra == ("attr", "judge", "index", "2")


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("http://acme/evals/op/f:1", "must start with"),
        ("weave://acme/evals/op/f:1", "must start with"),
        ("weave:///acme/evals/op", "must look like"),
        ("weave:///acme//op/f:1", "must not be empty"),
        ("weave:///acme/evals/table/f:1", "kind must be"),
        ("weave:///acme/evals/call/f:1", "kind must be"),
        ("weave:///acme/evals/op/f", "<name>:<digest>"),
        ("weave:///acme/evals/op/:1", "<name>:<digest>"),
        ("weave:///acme/evals/op/f:", "<name>:<digest>"),
        ("weave:///acme/evals/op/f:1:2", "<name>:<digest>"),
        ("weave:///acme/evals/op/f:1/attr", "pairs"),
        ("weave:///acme/evals/op/f:1/field/x", "extra edge must be"),
        ("weave:///acme/evals/op/f:1/index/x", "integer"),
        ("weave:///acme/evals/op/f:1/key/", "empty value"),
    ],
)
def test_rejects_what_is_not_an_object_or_op_ref(uri: str, reason: str) -> None:
    with pytest.raises(InvalidRefError, match=reason):
        parse_weave_ref(uri)
