"""sixgate: IPv6 for IPv4-only hosts, in userspace.

The one import name of everything sixgate installs: ``sixgate.coordinator``,
``sixgate.workers`` (with the engine, ``sixgate.workers.engine``) and ``sixgate.deploy``. In the
checkout these are the top-level folders ``coordinator/``, ``workers/`` and ``deploy/`` (this
package links to them), so nothing generic such as ``workers`` lands in site-packages.
"""
