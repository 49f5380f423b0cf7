"""The cluster plan's pure rules: meta names, plan order, leadership terms, exo-shaped documents."""

from __future__ import annotations

import pytest

from shoal.placement.plan import (
    STORE_PORTS,
    desired_runners,
    instance_document,
    interface_for,
    lead,
    newest_plan,
    parse_instance_document,
    parse_meta,
    parse_sharding,
    pending_auto_places,
    runner_id,
    store_port,
    with_instance,
    without_instance,
)
from shoal.schema.report import (
    AutoPlace,
    ClusterPlan,
    InstanceSpec,
    InterfaceInfo,
    NodeReport,
    RunnerState,
)


def instance(
    iid: str = "i1", nodes: tuple[str, ...] = ("a", "b"), model: str = "m"
) -> InstanceSpec:
    return InstanceSpec(
        instance_id=iid,
        model_id=model,
        nodes=nodes,
        layer_ranges=((0, 20), (20, 30))[: len(nodes)],
        store_address="10.0.0.1",
        store_port=41234,
        rank_addresses=("10.0.0.1", "10.0.0.2")[: len(nodes)],
        rank_interfaces=("eth1", "eth1")[: len(nodes)],
    )


@pytest.mark.parametrize(
    ("text", "backend", "meta"),
    [
        (None, "gloo", "GlooInstance"),
        ("gloo", "gloo", "GlooInstance"),
        ("NCCL", "nccl", "NcclInstance"),
        ("MlxRingInstance", "ring", "MlxRingInstance"),
        ("MlxJacclInstance", "jaccl", "MlxJacclInstance"),
        ("ring", "ring", "MlxRingInstance"),
        ("GlooInstance", "gloo", "GlooInstance"),
    ],
)
def test_meta_names_and_exo_aliases(text: str | None, backend: str, meta: str) -> None:
    assert parse_meta(text) == (backend, meta)


@pytest.mark.parametrize("text", ["mesh", "MlxIbvInstance", ""])
def test_unknown_meta_names_the_choices(text: str) -> None:
    if text == "":
        assert parse_meta(text)[0] == "gloo"  # empty means the default
        return
    with pytest.raises(ValueError, match="MlxRingInstance"):
        parse_meta(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, "pipeline"), ("Pipeline", "pipeline"), ("Tensor", "tensor"), ("tensor", "tensor")],
)
def test_sharding(text: str | None, expected: str) -> None:
    assert parse_sharding(text) == expected


def test_unknown_sharding() -> None:
    with pytest.raises(ValueError, match="Pipeline or Tensor"):
        parse_sharding("expert")


@pytest.mark.parametrize(
    ("held", "published", "expected"),
    [
        (None, [], (0, 0)),
        (ClusterPlan(term=1, version=3), [], (1, 3)),
        (ClusterPlan(term=1, version=3), [ClusterPlan(term=1, version=4)], (1, 4)),
        (ClusterPlan(term=2, version=0), [ClusterPlan(term=1, version=9)], (2, 0)),
        (None, [ClusterPlan(term=1, version=1), ClusterPlan(term=3, version=0)], (3, 0)),
    ],
)
def test_newest_plan_orders_by_term_then_version(
    held: ClusterPlan | None, published: list[ClusterPlan], expected: tuple[int, int]
) -> None:
    reports = [NodeReport(node_id=f"n{i}", plan=p) for i, p in enumerate(published)]
    reports.append(NodeReport(node_id="follower"))  # followers publish no plan
    newest = newest_plan(held, reports)
    assert (newest.term, newest.version) == expected


def test_a_new_leader_keeps_the_instances_under_a_higher_term() -> None:
    old = with_instance(ClusterPlan(term=4, version=2, leader="a"), instance())
    taken = lead(old, "b")
    assert (taken.term, taken.version, taken.leader) == (5, 0, "b")
    assert taken.instances == old.instances
    assert lead(taken, "b") is taken  # the sitting leader changes nothing


def test_plan_changes_bump_the_version() -> None:
    plan = with_instance(ClusterPlan(term=1, leader="a"), instance("i1"))
    plan = with_instance(plan, instance("i2"))
    assert plan.version == 2
    assert [i.instance_id for i in plan.instances] == ["i1", "i2"]
    plan = without_instance(plan, "i1")
    assert plan.version == 3
    assert [i.instance_id for i in plan.instances] == ["i2"]


def test_desired_runners_are_the_ranks_on_this_node() -> None:
    plan = ClusterPlan(instances=(instance("i1", ("a", "b")), instance("i2", ("b",))))
    assert desired_runners(plan, "a") == {runner_id("i1", 0): (plan.instances[0], 0)}
    assert set(desired_runners(plan, "b")) == {runner_id("i1", 1), runner_id("i2", 0)}
    assert desired_runners(plan, "c") == {}


def test_auto_place_asks_once_per_model_without_an_instance() -> None:
    want = AutoPlace(model_id="m", min_nodes=2)
    other = AutoPlace(model_id="x", min_nodes=3)
    reports = [
        NodeReport(node_id="b", auto_place=(want,)),
        NodeReport(node_id="a", auto_place=(want, other)),
    ]
    assert pending_auto_places(reports, ClusterPlan()) == [want, other]
    placed = ClusterPlan(instances=(instance(model="m"),))
    assert pending_auto_places(reports, placed) == [other]


def test_store_port_is_stable_and_in_range() -> None:
    ports = {store_port(f"instance-{i}") for i in range(200)}
    assert all(STORE_PORTS[0] <= p <= STORE_PORTS[1] for p in ports)
    assert store_port("x") == store_port("x")
    assert len(ports) > 150  # spread out, so two instances rarely share one


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.0.0.2", "eth1"),  # exact address
        ("192.168.100.7", "tb0"),  # exact beats the /16 of br0 that also contains it
        ("192.168.5.5", "br0"),  # only the subnet matches
        ("127.0.0.3", "lo"),  # loopback aliases on one machine
        ("172.16.0.1", None),
        ("not-an-ip", None),
    ],
)
def test_interface_for_an_address(host: str, expected: str | None) -> None:
    report = NodeReport(
        node_id="a",
        interfaces=(
            InterfaceInfo(name="lo", addresses=("127.0.0.1/8",)),
            InterfaceInfo(name="eth1", addresses=("10.0.0.2/24",)),
            InterfaceInfo(name="br0", addresses=("192.168.0.1/16",)),
            InterfaceInfo(name="tb0", addresses=("192.168.100.7/24",)),
        ),
    )
    assert interface_for(report, host) == expected
    assert interface_for(None, host) is None


def test_instance_document_has_exo_shape_and_round_trips() -> None:
    spec = instance()
    running = {runner_id("i1", 0): RunnerState(runner_id="i1-g0-r0", instance_id="i1",
                                                status="ready")}  # fmt: skip
    doc = instance_document(spec, running)
    ((meta, body),) = doc.items()
    assert meta == "GlooInstance"
    assert body["nodeToRunner"] == {"a": "i1-g0-r0", "b": "i1-g0-r1"}
    shard = body["runnerToShard"]["i1-g0-r1"]["PipelineShardMetadata"]
    assert (shard["deviceRank"], shard["worldSize"], shard["startLayer"], shard["endLayer"]) == (
        1, 2, 20, 30,
    )  # fmt: skip
    assert body["runnerStatus"]["i1-g0-r0"]["status"] == "ready"
    assert body["runnerStatus"]["i1-g0-r1"]["status"] == "pending"
    assert parse_instance_document(doc) == ("m", "pipeline", "GlooInstance", ["a", "b"])


def _doc(**body: object) -> dict[str, object]:
    base: dict[str, object] = {
        "modelId": "m",
        "nodeToRunner": {"a": "r0", "b": "r1"},
        "runnerToShard": {
            "r0": {"PipelineShardMetadata": {"deviceRank": 0}},
            "r1": {"PipelineShardMetadata": {"deviceRank": 1}},
        },
    }
    return {"MlxRingInstance": {**base, **body}}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "one key"),
        ({"A": {}, "B": {}}, "one key"),
        ({"Bogus": {}}, "unknown instance_meta"),
        ({"GlooInstance": []}, "must be an object"),
        (_doc(modelId=""), "modelId"),
        (_doc(nodeToRunner={}), "nodeToRunner"),
        (_doc(runnerToShard=[]), "runnerToShard"),
        (_doc(runnerToShard={"r0": {"PipelineShardMetadata": {"deviceRank": 0}}}), "no shard"),
        (_doc(runnerToShard={"r0": {"X": {}}, "r1": {"X": {}}}), "unknown shard kind"),
        (
            _doc(
                runnerToShard={
                    "r0": {"PipelineShardMetadata": {"deviceRank": 0}},
                    "r1": {"TensorShardMetadata": {"deviceRank": 1}},
                }
            ),
            "same sharding",
        ),  # fmt: skip
        (
            _doc(
                runnerToShard={
                    "r0": {"PipelineShardMetadata": {"deviceRank": 0}},
                    "r1": {"PipelineShardMetadata": {"deviceRank": "1"}},
                }
            ),
            "integer",
        ),  # fmt: skip
        (
            _doc(
                runnerToShard={
                    "r0": {"PipelineShardMetadata": {"deviceRank": 0}},
                    "r1": {"PipelineShardMetadata": {"deviceRank": 5}},
                }
            ),
            "0..1",
        ),  # fmt: skip
    ],
)
def test_bad_instance_documents_say_what_is_wrong(doc: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_instance_document(doc)


def test_exo_ring_document_is_accepted() -> None:
    assert parse_instance_document(_doc()) == ("m", "pipeline", "MlxRingInstance", ["a", "b"])
