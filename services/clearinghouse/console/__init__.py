"""The operator console: ``clearingctl console`` serves one page and ``/api/state``.

``observe`` gathers (shard ownership from each node's Describe, payments/s and errors
from each node's Prometheus counters, the zone grid); ``server`` samples it every couple
of seconds and serves it; ``static/index.html`` draws it (inline SVG, no CDN).
"""
