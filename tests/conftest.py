import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_pipe():
    from tiny import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def smoke_build(tmp_path_factory):
    """One reduced `miniworld build --smoke` (components, features, prior, oracle, bundle), shared by every test
    that needs a built family; returns its work folder (``bundle/`` is the pipeline folder)."""
    from lambda_eclipse.miniworld.bundle import MiniworldBuild, build_miniworld

    out = tmp_path_factory.mktemp("smoke-build")
    build_miniworld(out, MiniworldBuild.smoke(), install=out.parent / "smoke-installed")
    return out
