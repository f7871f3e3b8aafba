"""ray_cluster.yaml: valid for the cluster launcher of the installed Ray, GPU workers from zero."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def config() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_valid_against_the_installed_schema(config):
    jsonschema = pytest.importorskip("jsonschema")
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def test_ray_accepts_it(config):
    """Ray's own checks too (defaults filled in, head type among the node types...)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(json.loads(json.dumps(config))))


def test_gpu_workers_scale_from_zero_on_a_ray_260_gpu_image(config):
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t.get("min_workers", 0) == 0 and t["max_workers"] >= 1 for t in gpu)
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    image = config["docker"].get("worker_image", config["docker"]["image"])
    assert image.startswith("rayproject/ray:2.60.0") and image.endswith("-gpu")
