"""hlora on Flower's Deployment Engine: one SuperNode per site, the rounds run by a ServerApp.

Needs the optional extra: ``pip install hlora[flower]``. The Flower app lives in ``flower-app/`` of the
repository; see ``docs/flower.md``. The modules:

* :mod:`~hlora.engine.flower.records`: payloads and updates as Flower records (pure);
* :mod:`~hlora.engine.flower.settings`: run-config and node-config;
* :mod:`~hlora.engine.flower.transport`: send messages, collect replies with a deadline;
* :mod:`~hlora.engine.flower.server_app`, :mod:`~hlora.engine.flower.client_app`: the apps;
* :mod:`~hlora.engine.flower.node_site`: what a node computes for each message, on the site it loads once;
* :mod:`~hlora.engine.flower.node_worker`: the long-lived node worker (node-config ``worker = true``).
"""

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError("the Flower engine needs Flower: pip install 'hlora[flower]'") from e
