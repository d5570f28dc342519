import pytest

from train_aux.data import write_jsonl
from train_aux.users import make_users


@pytest.fixture()
def data_dir(tmp_path):
    write_jsonl(tmp_path / "train_users.jsonl", make_users(20, 0, "t", held_out_phrasing=False))
    answers = [{"prompt": f"Tell me about topic {i}.", "answer": "The quick brown fox jumps over the lazy dog. Hello there."}
               for i in range(10)]
    write_jsonl(tmp_path / "answers.jsonl", answers)
    return tmp_path


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster (4 logical CPUs: a worker or actor takes one) for Ray Train and sharded evaluation."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()
