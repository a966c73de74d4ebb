import datetime as dt

from kubetune_operator import api
from kubetune_operator.cost import accrue, cpu_cores, price_per_hour
from kubetune_operator.settings import Settings
from kubetune_operator.views import NodeView, PodView

T0 = dt.datetime(2026, 11, 22, 12, 0, 0, tzinfo=dt.UTC)


def test_cpu_quantities():
    assert cpu_cores("2") == 2 and cpu_cores("500m") == 0.5 and cpu_cores("1.5") == 1.5


def test_price_depends_on_gpu_type_and_capacity_type():
    s = Settings()
    res = api.ResourcesSpec(gpus=2, gpu_type="NVIDIA-L4")
    assert price_per_hour(s, NodeView("n", "spot", "NVIDIA-L4"), res) == 2 * 0.32
    assert price_per_hour(s, NodeView("n", "on-demand", "NVIDIA-L4"), res) == 2 * 0.81
    assert price_per_hour(s, NodeView("n", "spot", "Unheard-Of"), res) == 2 * 0.80  # default row
    assert price_per_hour(s, None, api.ResourcesSpec(cpu="4")) == 4 * 0.04


def test_accrual_is_incremental_and_idempotent():
    res = api.ResourcesSpec(gpus=1)
    nodes = {"n1": NodeView("n1", "spot"), "n2": NodeView("n2", "on-demand")}
    early = T0 - dt.timedelta(hours=2)
    pods = [
        PodView("p0", 0, 0, "Running", node="n1", started_at=early),
        PodView("p1", 0, 1, "Running", node="n2", started_at=early),
    ]
    cost = accrue(None, pods, nodes, res, lambda node, r: 3.0, T0)
    assert cost == {
        "gpuHours": 0.0,
        "spotGpuHours": 0.0,
        "onDemandGpuHours": 0.0,
        "estimatedUsd": "0.0000",
        "onDemandUsd": "0.0000",
        "accruedUntil": "2026-11-22T12:00:00Z",
        "workerSeconds": 0.0,
        "cpuCoreHours": 0.0,
        "goodput": {"pendingSeconds": 0.0},
    }
    cost = accrue(cost, pods, nodes, res, lambda node, r: 3.0, T0 + dt.timedelta(minutes=30))
    assert cost["workerSeconds"] == 3600 and cost["cpuCoreHours"] == 2.0  # two workers x 30 min x 2 cores
    assert cost["gpuHours"] == 1.0 and cost["spotGpuHours"] == 0.5 and cost["onDemandGpuHours"] == 0.5
    assert cost["estimatedUsd"] == "3.0000"
    assert accrue(cost, pods, nodes, res, lambda node, r: 3.0, T0 + dt.timedelta(minutes=30)) == cost


def test_only_the_time_a_container_ran_is_counted():
    res = api.ResourcesSpec(gpus=2)
    cost = {"estimatedUsd": "0", "accruedUntil": "2026-11-22T12:00:00Z"}
    late = PodView(
        "p",
        0,
        0,
        "Succeeded",
        node="n",
        started_at=T0 + dt.timedelta(minutes=15),
        finished_at=T0 + dt.timedelta(minutes=45),
    )
    pending = PodView("q", 0, 1, "Pending", node="n")  # bound but never started: free
    out = accrue(
        cost, [late, pending], {"n": NodeView("n", "on-demand")}, res, lambda node, r: 4.0, T0 + dt.timedelta(hours=1)
    )
    assert out["gpuHours"] == 1.0 and out["estimatedUsd"] == "2.0000" and out["spotGpuHours"] == 0.0


def test_spot_savings_are_what_on_demand_would_have_cost_minus_the_cost():
    """One hour on a spot L4 and one on an on-demand L4: the on-demand equivalent prices both at
    the on-demand rate of the same GPU type."""
    s = Settings()
    res = api.ResourcesSpec(gpus=1, gpu_type="NVIDIA-L4")
    nodes = {"s": NodeView("s", "spot", "NVIDIA-L4"), "o": NodeView("o", "on-demand", "NVIDIA-L4")}
    start = T0 - dt.timedelta(hours=1)
    pods = [
        PodView("p0", 0, 0, "Running", node="s", started_at=start),
        PodView("p1", 0, 1, "Running", node="o", started_at=start),
    ]
    cost = accrue({"accruedUntil": "2026-11-22T11:00:00Z"}, pods, nodes, res, lambda n, r: price_per_hour(s, n, r), T0)
    assert cost["estimatedUsd"] == f"{0.32 + 0.81:.4f}" and cost["onDemandUsd"] == f"{2 * 0.81:.4f}"
    assert cost["spotGpuHours"] == 1.0 and cost["onDemandGpuHours"] == 1.0 and cost["gpuHours"] == 2.0


def test_a_status_from_before_the_split_keeps_growing_from_its_totals():
    old = {"gpuHours": 3.0, "spotGpuHours": 2.0, "estimatedUsd": "5.0000", "accruedUntil": "2026-11-22T12:00:00Z"}
    cost = accrue(old, [], {}, api.ResourcesSpec(gpus=1), lambda n, r: 1.0, T0)
    assert cost["onDemandGpuHours"] == 1.0 and cost["onDemandUsd"] == "5.0000"
