"""Zone-failover drills under load, with a report an SRE can trust.

``clearingctl drill <scenario>`` drives payments at the switch (:mod:`.load`, every
payment and every answer in a durable client-side log, :mod:`.clientlog`), injects one
fault picked from a seed (:mod:`.scenarios`), brings the cluster back, and then checks
what the clients were told against the ledger each city holds on its own, the banks'
journals and the shard map (:mod:`.observe` gathers, :mod:`.checker` judges). The
report (:mod:`.timeline`, :mod:`.report`) is a terminal summary, a JSON file and a
self-contained HTML timeline. :mod:`.runner` puts it together.
"""
