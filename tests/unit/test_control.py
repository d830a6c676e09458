"""workers/control.py: every request gets an answer, whatever arrives (hostile-input issue,
finding 7): deeply nested JSON, several frames, an oversized body, a wrong version or type."""

from __future__ import annotations

import json

import pytest

from sixgate.workers import control


def test_a_good_request_is_parsed_with_its_fields() -> None:
    cmd, fields, error = control.parse_request([json.dumps(control.request("flows",
                                                                          limit=5)).encode()])
    assert (cmd, fields["limit"], error) == ("flows", 5, None)


@pytest.mark.parametrize(("frames", "says"), [
    ([b"[" * 100_000], "request of"),  # json would raise RecursionError on this depth
    ([b"[" * 2000 + b"]" * 2000], "bad json"),  # under the size bound, still too deep
    ([b'{"v": 1, "cmd": "ping"}', b"second"], "one frame"),
    ([], "one frame"),
    ([b"\xff\xfe"], "bad json"),
    ([b"[1, 2]"], "version"),
    ([b'{"v": 2, "cmd": "ping"}'], "version"),
    ([b'{"v": 1, "cmd": ["ping"]}'], "cmd must be a string"),
])
def test_malformed_requests_get_an_error_reply(frames: list[bytes], says: str) -> None:
    cmd, fields, error = control.parse_request(frames)
    assert cmd == "" and fields == {} and error is not None
    assert error["ok"] is False and says in error["error"]


@pytest.mark.parametrize(("fields", "limit"), [
    ({}, control.FLOWS_PAGE_DEFAULT), ({"limit": 3}, 3), ({"limit": 10**9}, control.FLOWS_PAGE_MAX),
    ({"limit": -1}, control.FLOWS_PAGE_DEFAULT), ({"limit": "all"}, control.FLOWS_PAGE_DEFAULT),
    ({"limit": True}, control.FLOWS_PAGE_DEFAULT),
])
def test_flows_page_is_bounded(fields: dict[str, object], limit: int) -> None:
    assert control.page_limit(fields) == limit
