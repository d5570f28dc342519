import random

import pytest

from train_aux.eval import against_plain, correctness, gold_margin_shift, paired_checks


def _items(n=300, seed=0):
    rng = random.Random(seed)
    items, plain = [], []
    for _ in range(n):
        choices = [" " + "x" * rng.randint(3, 30) for _ in range(4)]
        items.append({"choices": choices, "gold": rng.randrange(4)})
        plain.append([-rng.uniform(0.5, 3.0) * len(c) for c in choices])  # per-byte scores in [-3, -0.5]
    return items, plain


def _per_byte_edit(items, scores, edit):
    """Log-likelihoods whose per-byte values are edit(item, per-byte values)."""
    out = []
    for item, s in zip(items, scores):
        norm = edit(item, [x / len(c) for x, c in zip(s, item["choices"])])
        out.append([v * len(c) for v, c in zip(norm, item["choices"])])
    return out


def test_correctness_ranks_by_sum_and_by_byte():
    item = {"choices": [" a", " bbbbbbbbb"], "gold": 1}
    assert correctness([item], [[-2.0, -5.0]]) == [(0, 1)]  # the long choice loses on the sum, wins per byte


def test_gold_margin_shift_separates_a_systematic_loss_from_rescaling_and_noise():
    items, plain = _items()
    # every margin shrunk by a fifth about each item's mean: slope 0.8, no shift, no item changes its acc_norm answer
    shrunk = _per_byte_edit(items, plain, lambda item, v: [sum(v) / 4 + 0.8 * (x - sum(v) / 4) for x in v])
    m = gold_margin_shift(items, plain, [shrunk])
    assert m["slope"] == pytest.approx(0.8) and m["shift"] == pytest.approx(0.0, abs=1e-9)
    assert [r[1] for r in correctness(items, shrunk)] == [r[1] for r in correctness(items, plain)]
    # the right answer loses 0.05 nats per byte on every item: a shift of exactly -0.05
    lowered = _per_byte_edit(items, plain, lambda item, v: [x - 0.05 * (i == item["gold"]) for i, x in enumerate(v)])
    m = gold_margin_shift(items, plain, [lowered])
    assert m["shift"] == pytest.approx(-0.05) and m["slope"] == pytest.approx(1.0)
    assert m["shift_pct"] == pytest.approx(100 * -0.05 / abs(m["plain_margin"]))
    # user rounds are averaged per item: one round lowered by 0.1, one untouched
    lowered2 = _per_byte_edit(items, plain, lambda item, v: [x - 0.1 * (i == item["gold"]) for i, x in enumerate(v)])
    assert gold_margin_shift(items, plain, [lowered2, plain])["shift"] == pytest.approx(-0.05)
    # a plain backbone that prefers a wrong choice on average: the percentage keeps the shift's sign
    worst = [{**item, "gold": min(range(4), key=[x / len(c) for x, c in zip(s, item["choices"])].__getitem__)}
             for item, s in zip(items, plain)]
    m = gold_margin_shift(worst, plain, [_per_byte_edit(worst, plain, lambda item, v: [
        x - 0.05 * (i == item["gold"]) for i, x in enumerate(v)])])
    assert m["plain_margin"] < 0 and m["shift_pct"] < 0 < m["shift_pct_se"]
    # noise that ignores which choice is right: the shift stays within its standard error's reach of 0
    rng = random.Random(1)
    noisy = _per_byte_edit(items, plain, lambda item, v: [x + rng.gauss(0, 0.2) for x in v])
    m = gold_margin_shift(items, plain, [noisy])
    assert abs(m["shift"]) < 3 * m["shift_se"] and 0 < m["shift_se"] < 0.05


def test_against_plain_pairs_each_item_with_itself():
    items, plain = _items(200)
    # the gold choice made certain on the first 50 items: exactly those the plain backbone got wrong turn right
    boosted = _per_byte_edit(items[:50], plain[:50], lambda item, v: [0.0 if i == item["gold"] else x for i, x in enumerate(v)])
    wrong = sum(1 - r[1] for r in correctness(items[:50], plain[:50]))
    accs, minus, margin = against_plain(items, plain, [boosted + plain[50:]])
    assert minus["acc_norm"]["diff"] == pytest.approx(100 * wrong / 200) and minus["acc_norm"]["diff_se"] > 0
    assert accs["acc_norm"] == pytest.approx(100 * sum(r[1] for r in correctness(items, plain)) / 200 + 100 * wrong / 200)
    assert margin["shift"] > 0
    # itself: no change, no standard error; two rounds are averaged per item (one right, one as plain: half the gain)
    assert against_plain(items, plain, [plain])[1]["acc_norm"] == {"diff": 0.0, "diff_se": 0.0}
    assert against_plain(items, plain, [boosted + plain[50:], plain])[1]["acc_norm"]["diff"] == pytest.approx(50 * wrong / 200)


def _judged(n_users=20, checks=3, rate=0.3, seed=0):
    rng = random.Random(seed)
    pairs = [[f"u{u}", f"p{k}"] for u in range(n_users) for k in range(2)]
    return pairs, [[rng.random() < rate for _ in range(checks)] for _ in pairs]


def test_paired_checks_differences_and_clustered_errors():
    pairs, a = _judged()
    same = paired_checks(a, a, pairs)
    assert same["check_pass_rate"] == 0 and same["check_pass_rate_se"] == 0 and same["all_pass_rate_se"] == 0
    assert same["n_checks"] == 120 and same["n_users"] == 20
    # b passes everything for the first 5 users' responses: exactly the checks a failed there are gained
    b = [[True] * len(x) if user in {f"u{i}" for i in range(5)} else x for (user, _), x in zip(pairs, a)]
    gained = sum(not ok for (user, _), x in zip(pairs, a) if user in {f"u{i}" for i in range(5)} for ok in x)
    m = paired_checks(a, b, pairs)
    assert m["check_pass_rate"] == pytest.approx(gained / 120) and m["check_pass_rate_se"] > 0
    assert paired_checks(b, a, pairs)["check_pass_rate"] == pytest.approx(-gained / 120)
    # the gain sits in a few users: clustering by user gives a larger error than treating the 40 responses as users
    per_response = paired_checks(a, b, [[f"{u}/{q}", q] for u, q in pairs])
    assert m["check_pass_rate_se"] > per_response["check_pass_rate_se"]
    with pytest.raises(ValueError, match="same pairs"):
        paired_checks(a, b[:-1], pairs)
