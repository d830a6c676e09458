"""sixgate datapath: the pure packet engine, the flow table and the worker process.

Nothing in this package imports ``coordinator``; shared contracts (drop reasons, flow hash,
coordinator <-> worker wire format, settings) live here.
"""
