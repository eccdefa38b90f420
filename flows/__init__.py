"""preftune flows: the pipeline's composition, its configuration and its command line."""
