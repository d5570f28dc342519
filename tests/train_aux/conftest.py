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
