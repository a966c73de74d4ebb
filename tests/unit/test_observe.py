from kubetune_operator.observe import node_view, pod_view
from kubetune_operator.settings import Settings


def test_pod_view_reads_exit_code_termination_message_and_disruption():
    pod = {
        "metadata": {
            "name": "j-a2-w1",
            "labels": {"kubetune.io/attempt": "2", "kubetune.io/rank": "1"},
            "deletionTimestamp": "2026-11-22T12:00:00Z",
        },
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": "Failed",
            "podIP": "10.0.0.9",
            "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
            "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": 3, "reason": "Error", "message": "{}"}}}
            ],
        },
    }
    v = pod_view(pod)
    assert (v.attempt, v.rank, v.exit_code, v.message, v.disruption, v.deleting, v.node, v.ip) == (
        2,
        1,
        3,
        "{}",
        "EvictionByEvictionAPI",
        True,
        "n1",
        "10.0.0.9",
    )


def test_pod_view_unschedulable_and_waiting():
    pod = {
        "metadata": {"name": "p", "labels": {}},
        "spec": {},
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}
            ],
            "containerStatuses": [
                {"name": "trainer", "state": {"waiting": {"reason": "ErrImagePull", "message": "nope"}}}
            ],
        },
    }
    v = pod_view(pod)
    assert v.unschedulable == "0/1 nodes" and v.waiting_reason == "ErrImagePull" and v.exit_code is None


def test_node_view_uses_the_configured_labels():
    s = Settings(capacity_type_label="eks.amazonaws.com/capacityType", spot_value="SPOT")
    n = {
        "metadata": {
            "name": "n",
            "labels": {"eks.amazonaws.com/capacityType": "SPOT", "nvidia.com/gpu.product": "NVIDIA-L4"},
        }
    }
    assert node_view(n, s).capacity_type == "spot" and node_view(n, s).gpu_type == "NVIDIA-L4"
    assert node_view({"metadata": {"name": "m"}}, s).capacity_type == "on-demand"
