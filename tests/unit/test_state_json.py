"""State stores lists (a write's evidence, a count's notes and sources) as JSON text. _to_json writes plain
ids without json.dumps; what it stores must be exactly what json.dumps wrote, or rows written before and
after would differ for the same list."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from adapter.state import _to_json

# Ids as they come, and the characters json.dumps escapes: quote, backslash, control, DEL, non-ASCII.
items = st.one_of(st.sampled_from(["o1", "a-b.c", "", " ", '"', "\\", "\x00", "\x1f", "\x7f", "é", "\u2028", "💊"]),
                  st.text(max_size=8), st.integers(), st.floats(allow_nan=False), st.none(), st.booleans())


@settings(max_examples=500, deadline=None, database=None)
@given(st.one_of(st.lists(items, max_size=4), st.lists(items, max_size=4).map(tuple)))
def test_the_json_of_a_list_is_what_json_dumps_writes(values):
    assert _to_json(values) == json.dumps(list(values))


def test_common_lists():
    assert [_to_json(v) for v in ((), ("o1",), ("o1", "o2"), ("a b", 'x"y'), (1, "o"))] == \
        ["[]", '["o1"]', '["o1", "o2"]', '["a b", "x\\"y"]', '[1, "o"]']
