import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random ZImagePipeline saved in diffusers format (built once per session)."""
    from twostep.testing import tiny_zimage_pipeline

    path = tmp_path_factory.mktemp("tiny_zimage")
    tiny_zimage_pipeline(seed=0).save_pretrained(str(path))
    return str(path)
