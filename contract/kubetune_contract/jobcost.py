"""What the operator tells a trainer pod about the job's earlier attempts (env `KUBETUNE_JOB_COST`,
JSON), so that the model card written at export carries the job's goodput and cost: the trainer
adds its own attempt up to the export to these totals."""

from __future__ import annotations

from pydantic import Field

from .config import SpecModel


class GoodputSeconds(SpecModel):
    """Worker-seconds by goodput category (the categories of status.cost.goodput)."""

    model_config = SpecModel.model_config | {"extra": "ignore"}

    productive_seconds: float = Field(0.0, ge=0)
    startup_seconds: float = Field(0.0, ge=0)
    checkpoint_blocked_seconds: float = Field(0.0, ge=0)
    lost_to_preemption_seconds: float = Field(0.0, ge=0)
    pending_seconds: float = Field(0.0, ge=0)


class JobCostSoFar(SpecModel):
    """The job's totals before this pod's attempt began (from its status.cost when the pod was created)."""

    model_config = SpecModel.model_config | {"extra": "ignore"}

    attempt: int = Field(0, ge=0, description="The attempt this pod belongs to; the totals are of the ones before.")
    workers: int = Field(1, ge=1, description="Worker pods of this attempt (rank 0's seconds times this).")
    after_preemption: bool = Field(
        False, description="This attempt began after a preemption: its start-up is lost to preemption."
    )
    usd_per_worker_hour: float | None = Field(
        None, ge=0, description="The operator's price of one worker of this attempt (its placement's capacity type)."
    )
    worker_seconds: float = Field(0.0, ge=0)
    estimated_usd: float = Field(0.0, ge=0)
    tokens: int = Field(0, ge=0)
    goodput: GoodputSeconds = Field(default_factory=GoodputSeconds)
