"""What a user can set, stage by stage: typed settings that import no ML runtime (no torch,
transformers, PEFT or MLflow), so a profile is built, checked and shown without loading any of it."""
