"""Prefect orchestration over the DVC stages (the pipeline flow arrives with the Prefect issue)."""
