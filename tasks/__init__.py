"""preftune tasks: each module owns one stage's settings, its plain functions and its Prefect task."""

import logging

# bitsandbytes warns on every import on a CPU that an optional kernel package is missing; 4-bit never
# trains on a CPU here (the plan says so), so that one logger is kept to errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
