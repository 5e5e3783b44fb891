"""Prefect orchestration over the DVC stages: `flows.pipeline` (pipeline and sweep flows, CLI),
`flows.serve` (cron schedules), `flows.dvc_repo` (what the flows ask of DVC)."""
