"""Who may do what: the gate in front of every route (``gate``), the access rule of every
route (``access``), API tokens (``tokens``) and the gate's request reading (``gate_io``)."""
