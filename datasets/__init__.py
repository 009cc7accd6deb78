"""Built-in dataset plugins of fsmis-bench (import name ``fsmis_datasets``)."""
