"""workers/engine/drops.py: one registry of drop reasons, each with a one-line doc (STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

from sixgate.workers.engine.counters import Counters, LimitHits
from sixgate.workers.engine.drops import ALL_REASONS, ICMP_ERROR_EVENTS, DropReason, Event

DROPS_PY = Path(__file__).resolve().parents[2] / "workers" / "engine" / "drops.py"


def member_docs(registry: str = "DropReason") -> dict[str, str]:
    """Attribute docstrings of a registry's members (the string right after each member)."""
    tree = ast.parse(DROPS_PY.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == registry]
    docs: dict[str, str] = {}
    body = cls.body
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.Assign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.targets[0].id] = after.value.value  # type: ignore[attr-defined]
    return docs


def test_every_drop_reason_has_a_one_line_doc() -> None:
    docs = member_docs()
    assert sorted(docs) == sorted(r.name for r in DropReason)
    for name, doc in docs.items():
        assert doc.strip() and "\n" not in doc.strip(), name


def test_every_event_has_a_one_line_doc_and_a_unique_key() -> None:
    docs = member_docs("Event")
    assert sorted(docs) == sorted(e.name for e in Event)
    for name, doc in docs.items():
        assert doc.strip() and "\n" not in doc.strip(), name
    assert len({e.value for e in Event}) == len(Event)
    assert not {e.value for e in Event} & {r.value for r in DropReason}  # never both


def test_icmp_error_events_are_keyed_by_their_type_and_code() -> None:
    for (icmp_type, code), event in ICMP_ERROR_EVENTS.items():
        assert event.value == f"icmp_error_{icmp_type}_{code}"


def test_drop_reason_values_are_snake_case_labels_of_their_names() -> None:
    for reason in DropReason:
        assert reason.value == reason.name.lower()
    assert len({r.value for r in DropReason}) == len(DropReason)
    assert ALL_REASONS == tuple(DropReason)


def test_counters_start_with_every_reason_at_zero() -> None:
    counters = Counters()
    assert counters.drops == {r: 0 for r in DropReason}
    counters.drop(DropReason.QUEUE_FULL, 3)
    assert counters.as_dict()["drops"]["queue_full"] == 3  # type: ignore[index]


def test_rfc6888_req11_limit_hits_reported_at_most_once_a_minute() -> None:
    hits = LimitHits(interval_s=60.0)
    assert hits.report_due(0.0) is None  # nothing hit, nothing to say
    hits.hit(DropReason.FLOW_LIMIT)
    hits.hit(DropReason.FLOW_LIMIT)
    hits.hit(DropReason.PREFIX_FLOW_LIMIT)
    assert hits.report_due(10.0) == "flow_limit x2, prefix_flow_limit x1"
    hits.hit(DropReason.POOL_EXHAUSTED)
    assert hits.report_due(69.9) is None  # within the minute: held back, still counted
    assert hits.report_due(70.0) == "pool_exhausted x1"
    assert hits.report_due(200.0) is None
