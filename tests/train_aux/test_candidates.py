import pytest

from train_aux.candidates import HERE, KINDS, load, main, plot


def test_the_committed_table_loads_and_plots(tmp_path):
    candidates = load(HERE / "results" / "dev_candidates.csv")
    assert [c.kind for c in candidates].count("shipped") == 1 and {c.kind for c in candidates} <= set(KINDS)
    assert all(c.arc_easy_change_se > 0 and 0 <= c.checks_passed <= 100 for c in candidates)
    plot(candidates, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("row", ["x,guess,-1,0.5,20,2,s", "x,candidate,-1,,20,2,s", "x,candidate,-1,0.5,nan,2,s"])
def test_a_bad_row_is_refused_with_its_line(tmp_path, capsys, row):
    path = tmp_path / "c.csv"
    lines = (HERE / "results" / "dev_candidates.csv").read_text().splitlines()
    path.write_text("\n".join(lines[:3] + [row]) + "\n")
    with pytest.raises(ValueError, match="c.csv:4: needs a name, a kind"):
        load(path)
    with pytest.raises(SystemExit):
        main(["--csv", str(path), "--out", str(tmp_path / "c.png")])
    assert "c.csv:4" in capsys.readouterr().err and not (tmp_path / "c.png").exists()


def test_every_row_names_a_section_of_the_experiments_log():
    headings = {line.lstrip("#").strip() for line in (HERE / "EXPERIMENTS.md").read_text().splitlines() if line.startswith("#")}
    assert {c.section for c in load(HERE / "results" / "dev_candidates.csv")} <= headings
