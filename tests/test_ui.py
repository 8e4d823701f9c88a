"""Console output: whole lines off a terminal whatever COLUMNS says; folded, never cut, cells on a narrow one."""

import io
import json

from minicpm_edge import ui

LONG = "/tmp/" + "a-rather-long-folder-name/" * 8 + "ios.json"
DEVICE = "Huawei Nova 11 SE, HarmonyOS 4.0 (Snapdragon 778)"


def render(console, *things) -> str:
    for t in things:
        console.print(t)
    return console.file.getvalue()


def sample_table():
    t = ui.table("device", "decode tok/s", "artifact", title="decode speed against the memory-bandwidth roofline")
    t.add_row(DEVICE, "3057.12 ± 12.50", LONG)
    return t


def test_not_a_terminal_never_wraps(monkeypatch):
    for columns in ("40", "300", None):
        if columns:
            monkeypatch.setenv("COLUMNS", columns)
        else:
            monkeypatch.delenv("COLUMNS", raising=False)
        c = ui.WholeLineConsole(file=io.StringIO(), markup=False)
        assert not c.is_terminal
        lines = render(c, f"{LONG}: 2 rows, 0 new", sample_table()).splitlines()
        assert lines[0] == f"{LONG}: 2 rows, 0 new"
        row = next(ln for ln in lines if DEVICE in ln)
        assert "3057.12 ± 12.50" in row and LONG in row
        assert any("decode speed against the memory-bandwidth roofline" in ln for ln in lines)


def test_a_narrow_terminal_folds_cells_instead_of_cutting_them():
    c = ui.WholeLineConsole(file=io.StringIO(), force_terminal=True, width=40, color_system=None)
    lines = render(c, sample_table()).splitlines()
    assert max(len(ln) for ln in lines) <= 40 and not any("…" in ln for ln in lines)
    body = [ln for ln in lines if ln.startswith("│")]
    header_end = next(i for i, ln in enumerate(lines) if ln.startswith("┡"))
    rows = [ln.split("│")[1:-1] for ln in lines[header_end + 1:] if ln.startswith("│")]
    assert body and rows
    columns = ["".join(cells[k] for cells in rows).replace(" ", "") for k in range(3)]
    assert columns == [x.replace(" ", "") for x in (DEVICE, "3057.12 ± 12.50", LONG)]  # every character kept


def test_json_to_standard_output_or_a_file(tmp_path, capsys):
    ui.write_json("-", {"a": 1})
    assert json.loads(capsys.readouterr().out) == {"a": 1}
    ui.write_json(tmp_path / "r.json", [1, 2])
    assert json.loads((tmp_path / "r.json").read_text()) == [1, 2]
    assert ui.out_for("-") is ui.err and ui.out_for(tmp_path / "r.json") is ui.console and ui.out_for(None) is ui.console
