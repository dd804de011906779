"""Mesh construction and logical-axis rules."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from dpo_jax import sharding


def test_mesh_fills_the_minus_one_axis():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "context": 1, "tensor": 1}
    assert mesh.axis_names == sharding.MESH_AXES


@pytest.mark.parametrize(
    "shape, message",
    [({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices"),
     ({"data": -1, "fsdp": -1}, "at most one"),
     ({"data": -1, "fsdp": 3}, "does not divide"),
     ({"pipeline": 2}, "unknown")],
)
def test_bad_mesh_shapes_are_explained(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(shape)


def test_rules_map_logical_axes_and_skip_indivisible_dims():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.logical_to_spec(("vocab", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
    # 50257 is odd: the vocab dim stays replicated rather than failing.
    assert sharding.logical_to_spec(("vocab", "embed"), (50257, 32), mesh) == P(None, "fsdp")
    # A mesh axis is never used twice in one array.
    assert sharding.logical_to_spec(("mlp", "heads"), (8, 8), mesh) == P("tensor", None)
    assert sharding.logical_to_spec(("layers", "embed", "mlp"), (3, 8, 8), mesh) == P(None, "fsdp", "tensor")
    assert sharding.logical_to_spec(None, (3,), mesh) == P()
    with pytest.raises(ValueError, match="do not match"):
        sharding.logical_to_spec(("embed",), (3, 4), mesh)


def test_batch_rows_split_over_data_and_fsdp():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    assert sharding.batch_sharding(mesh, 2).spec == P(("data", "fsdp"), None)
    assert sharding.num_batch_shards(mesh) == 8
    assert len(jax.devices()) == 8
