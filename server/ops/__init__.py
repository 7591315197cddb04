"""Running the service: its counters and ``/metrics`` (``observability``) and the periodic
background jobs every worker runs (``background``)."""
