"""What the test suites share: the engine test helpers (``helpers``: settings, the two-party
client/service harness, scapy-built packets), hypothesis strategies (``strategies``), scapy's
checksum reading (``scapy_check``) and the PromQL evaluation of the dashboards (``promql``).

Importable as ``support`` in every suite: pyproject.toml's pytest ``pythonpath`` names
``tests`` once, so no test edits ``sys.path``."""
