"""Built-in method plugins of fsmis-bench (import name ``fsmis_methods``)."""
