import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2`: one torch thread per worker, not two workers × all cores
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # Tests that share the one smoke build run on one xdist worker, so that it is built once.
    for item in items:
        if "smoke_build" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smoke-build"))


@pytest.fixture(scope="session")
def tiny_pipe():
    from tiny import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny pipeline saved as a model folder (read-only: a test that damages one copies it first)."""
    from tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smoke_build(tmp_path_factory):
    """One reduced `miniworld build --smoke` (components, features, prior, oracle, bundle), shared by every test
    that needs a built family; returns its work folder (``bundle/`` is the pipeline folder)."""
    from lambda_eclipse.miniworld.bundle import MiniworldBuild, build_miniworld

    out = tmp_path_factory.mktemp("smoke-build")
    build_miniworld(out, MiniworldBuild.smoke(), install=out.parent / "smoke-installed")
    return out
