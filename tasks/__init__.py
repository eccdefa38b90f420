"""preftune tasks: each module owns one stage's settings, its plain functions and its Prefect task."""
