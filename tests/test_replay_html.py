"""Replay reports as a self-contained HTML page: ``kvsched replay --html`` and ``kvsched report``.

The page is read back with the standard library's HTML parser: its images must be embedded
PNGs (data URIs that decode to PNG files), nothing may point outside the page, the comparison
table must hold one row per run with the figures of the JSON report, and text from the report
must arrive escaped.
"""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from scheduler.cli import main
from scheduler.replay.html import render_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        for key in ("href", "src"):
            if tag != "img" and values.get(key):
                self.links.append(values[key] or "")
        if tag == "tr":
            self._row = []
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def simulate(tmp_path: Path, *extra: str) -> int:
    return main(
        [
            "replay",
            "--simulate",
            "--workload",
            "rag",
            "--limit",
            "60",
            "--workers",
            "2",
            "--policy",
            "kvsched",
            "--policy",
            "round_robin",
            "--slo-ttft-ms",
            "500",
            *extra,
        ]
    )


def test_replay_html_is_one_self_contained_page(tmp_path: Path) -> None:
    page_file, report_file = tmp_path / "page.html", tmp_path / "r.json"
    assert simulate(tmp_path, "--html", str(page_file), "--json", str(report_file)) == 0
    page = Page(page_file.read_text(encoding="utf-8"))
    reports = json.loads(report_file.read_text())
    assert len(page.images) == 4  # CDF and hits, percentiles, endpoints, objectives
    for source in page.images:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == PNG_MAGIC
    assert page.links == []
    header = page.rows[0]
    rows = {row[0]: dict(zip(header, row, strict=True)) for row in page.rows[1:] if row[0] in reports}
    assert set(rows) == {"kvsched", "round_robin"}
    for label, row in rows.items():
        assert row["completed"] == str(reports[label]["completed"])
        assert row["TTFT p50 ms"] == f"{reports[label]['ttft_ms']['p50']:,.0f}"
        assert row["SLO met"] == f"{reports[label]['slo_attainment']:.1%}"


def test_report_command_renders_saved_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report_file = tmp_path / "r.json"
    assert simulate(tmp_path, "--json", str(report_file)) == 0
    single = tmp_path / "one.json"
    single.write_text(json.dumps(json.loads(report_file.read_text())["kvsched"]))
    page_file = tmp_path / "page.html"
    assert main(["report", "--html", str(page_file), str(report_file), str(single)]) == 0
    page = Page(page_file.read_text(encoding="utf-8"))
    labels = [row[0] for row in page.rows if row and row[0] in ("kvsched", "round_robin", "kvsched'")]
    assert labels[:3] == ["kvsched", "round_robin", "kvsched'"]  # a repeated label stays apart
    assert f"page: {page_file}" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["report", "--html", str(page_file), str(tmp_path / "bad.json")]) == 2


def test_text_from_a_report_is_escaped() -> None:
    report = {
        "policy": "<script>alert(1)</script>",
        "completed": 1,
        "failed": 0,
        "ttft_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0, "mean": 1.0},
        "tpot_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0, "mean": 1.0},
        "e2e_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0, "mean": 1.0},
        "per_endpoint": {"a&b": 1},
    }
    text = render_html([report], title="t <b>")
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "t &lt;b&gt;" in text
    page = Page(text)
    assert any(row[0] == "<script>alert(1)</script>" for row in page.rows)
