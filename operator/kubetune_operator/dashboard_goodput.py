"""The dashboards' goodput panels (part of `dashboards`, the one source of the shipped JSON): MFU and
the goodput breakdown on *Utilization*; USD lost to preemption, goodput USD, USD per 1M tokens and
CPU core-hours on *Cost*. The operator's per-job goodput counters come from status.cost.goodput;
USD of a category is its seconds at the job's average price, estimatedUsd / workerSeconds."""

from __future__ import annotations

from typing import Any

from .dashboard_parts import BY_JOB, JOB, JOB_LEGEND, NO_GPU, panel, row, target

SEL = f"{{{JOB}}}"
WORKER = f"max by ({BY_JOB}) (kubetune_job_worker_seconds_total{SEL})"
USD = f"max by ({BY_JOB}) (kubetune_job_cost_usd_total{SEL})"
# USD per paid worker-second of each job (absent before any worker time: no division by zero)
PRICE = f"({USD}\n/ ({WORKER} > 0))"


def _category(category: str) -> str:
    return f'max by ({BY_JOB}) (kubetune_job_goodput_seconds_total{{{JOB}, category="{category}"}})'


def _usd_of(category: str) -> str:
    return f"{_category(category)}\n* on(job_namespace, finetunejob)\n{PRICE}"


def utilization_panels() -> list[dict[str, Any]]:
    return [
        row("Goodput"),
        panel(
            "MFU",
            "Model FLOPs utilization over the trainer's last logging window (docs/metrics.md, MFU): tokens/s x "
            "FLOPs per token over the GPUs' dense peak. Absent on CPU and on a GPU whose peak is unknown.",
            "percentunit",
            [target(f"max by ({BY_JOB}) (kubetune_trainer_mfu_ratio{SEL})")],
            width=8,
            no_value=NO_GPU,
        ),
        panel(
            "Goodput breakdown",
            "Of each job's paid worker time (status.cost.workerSeconds), worker-seconds by category "
            "(status.cost.goodput): productive training, start-up, checkpoint saves, lost to preemption "
            "(steps trained again, restarts after preemptions), other (evaluation, export, the SIGTERM tail); "
            "and pending (pod creation to container start, not paid).",
            "s",
            [
                target(
                    f"max by ({BY_JOB}, category) (kubetune_job_goodput_seconds_total{SEL})",
                    f"{JOB_LEGEND} {{{{category}}}}",
                    instant=True,
                ),
                target(
                    f"clamp_min(\n{WORKER}\n- sum by ({BY_JOB}) (kubetune_job_goodput_seconds_total{SEL}),\n0)",
                    f"{JOB_LEGEND} other",
                    instant=True,
                    ref="B",
                ),
                target(
                    f"max by ({BY_JOB}) (kubetune_job_pending_seconds_total{SEL})",
                    f"{JOB_LEGEND} pending (not paid)",
                    instant=True,
                    ref="C",
                ),
            ],
            kind="bargauge",
            width=8,
            orientation="horizontal",
        ),
        panel(
            "Goodput ratio",
            "Productive share of each job's paid worker time (status.cost.goodput.ratio), over time.",
            "percentunit",
            [target(f"max by ({BY_JOB}) (kubetune_job_goodput_ratio{SEL})")],
            width=8,
        ),
    ]


def cost_panels() -> list[dict[str, Any]]:
    return [
        row("Goodput"),
        panel(
            "USD lost to preemption",
            "USD of the worker time lost to preemptions (status.cost.goodput.lostToPreemptionUsd): steps "
            "trained again after a resume and the start-up of attempts after a preemption, at the job's "
            "average price.",
            "currencyUSD",
            [target(_usd_of("lost_to_preemption"), instant=True)],
            kind="bargauge",
            orientation="horizontal",
            width=8,
        ),
        panel(
            "Goodput USD",
            "USD of the productive worker time (status.cost.goodput.productiveUsd), next to the accrued total.",
            "currencyUSD",
            [
                target(_usd_of("productive"), f"{JOB_LEGEND} productive", instant=True),
                target(USD, f"{JOB_LEGEND} total", instant=True, ref="B"),
            ],
            kind="bargauge",
            orientation="horizontal",
            width=8,
        ),
        panel(
            "USD per 1M tokens",
            "Estimated USD per million trained tokens (status.cost.usdPerMillionTokens); absent until the "
            "job has trained a token.",
            "currencyUSD",
            [
                target(
                    f"{USD}\n/ on(job_namespace, finetunejob)\n"
                    f"(max by ({BY_JOB}) (kubetune_job_tokens_total{SEL}) > 0)\n* 1e6",
                    instant=True,
                )
            ],
            kind="stat",
            width=8,
        ),
        panel(
            "CPU core-hours per job",
            "Requested CPU cores times the worker containers' time (status.cost.cpuCoreHours): for CPU jobs "
            "the counterpart of GPU-hours.",
            "suffix: core-h",
            [target(f"max by ({BY_JOB}) (kubetune_job_cpu_core_seconds_total{SEL}) / 3600")],
            width=24,
        ),
    ]
