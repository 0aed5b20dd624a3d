"""``relayd usage`` and ``relayd prices check`` over a known ledger.

The ledger is written through the spend part's own ledger (``SqliteLedger.record``),
each event counted in its UTC budget windows;
each test keeps it in its own state directory (conftest's ``private_state_dir``).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import struct
import sys
import zlib
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from relayd.config import Settings, updated
from relayd.config.spend_limits import KeyLimits
from relayd.spend import report
from relayd.spend.prices import PriceBook
from relayd.spend.usage_page import PALETTE, page
from relayd.spend.windows import windows_at
from relayd.store.ledger import Event, SqliteLedger
from relayd.store.usage_rows import UsageCell, ledger_path, usage_cells, usage_span
from tests.browser import CHROMIUM, headless_args
from tests.conftest import OTHER_KEY, RELAY_KEY, RelayFactory


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# A known set: two days (UTC), two keys, a refusal of each kind, an estimated row, an
# unpriced model, and bob's first request at 23:30 UTC (00:30 the next day in Berlin).
KNOWN = [
    (at("2026-11-30T10:00"), "alice", "gpt-5", "createResponse", "ok", "",
     10_000, 8_000, 1_000, 700, 13_500, 0),
    (at("2026-11-30T23:30"), "bob", "gpt-5-mini", "createChatCompletion", "ok", "",
     1_000, 0, 100, 0, 450, 0),
    (at("2026-12-01T09:00"), "alice", "gpt-5", "createResponse", "ok", "",
     2_000, 0, 500, 0, 7_500, 1),
    (at("2026-12-01T09:01"), "alice", "gpt-5", "createResponse", "refused",
     "rate_limit_exceeded", 0, 0, 0, 0, 0, 0),
    (at("2026-12-01T12:00"), "bob", "gpt-5-mini", "createResponse", "refused",
     "insufficient_quota", 0, 0, 0, 0, 0, 0),
    (at("2026-12-01T13:00"), "bob", "gpt-9", "createResponse", "ok", "",
     100, 0, 10, 0, 0, 0),
]  # fmt: skip


def write_ledger(rows: Sequence[tuple[Any, ...]]) -> Path:
    """The rows (as KNOWN spells them) recorded by the spend part's ledger."""
    path = ledger_path(Settings())

    async def record() -> None:
        ledger = SqliteLedger(path)
        try:
            await ledger.record([event(*row) for row in rows])
        finally:
            await ledger.close()

    asyncio.run(record())
    return path


def event(
    when: float,
    key: str,
    model: str,
    operation: str,
    outcome: str,
    reason: str,
    input_tokens: int,
    cached: int,
    output_tokens: int,
    reasoning: int,
    micro_usd: int,
    estimated: int,
) -> Event:
    return Event(
        at=when,
        key=key,
        model=model,
        operation=operation,
        outcome=outcome,
        reason=reason,
        input_tokens=input_tokens,
        cached_input_tokens=cached,
        output_tokens=output_tokens,
        reasoning_tokens=reasoning,
        micro_usd=micro_usd,
        estimated=bool(estimated),
        windows=tuple(window.name for window in windows_at(when, "UTC")),
    )


@pytest.fixture
def ledger() -> Path:
    return write_ledger(KNOWN)


def run(*args: str, settings: Settings | None = None) -> tuple[int, str]:
    out = io.StringIO()
    by = [value for flag, value in zip(args, args[1:], strict=False) if flag == "--by"]
    options = dict(zip(args[::2], args[1::2], strict=False))
    code = report.usage(
        settings or Settings(),
        since=options.get("--since"),
        until=options.get("--until"),
        by=by or ["key"],
        fmt=options.get("--format", "table"),
        html=options.get("--html"),
        now=at("2026-12-02T08:00"),
        out=out,
    )
    return code, out.getvalue()


TABLE_BY_KEY = """\
relayd usage, all events (UTC)

key    requests  refused   input  cached  output  reasoning  rate_limit_exceeded  insufficient_quota      usd  estimated  unpriced
-----  --------  -------  ------  ------  ------  ---------  -------------------  ------------------  -------  ---------  --------
alice         3        1  12,000   8,000   1,500        700                    1                   0  $0.0210          1         0
bob           3        1   1,100       0     110          0                    0                   1  $0.0005          0         1
-----  --------  -------  ------  ------  ------  ---------  -------------------  ------------------  -------  ---------  --------
total         6        2  13,100   8,000   1,610        700                    1                   1  $0.0215          1         1

1 request(s) on models without a price count $0: dollars are a floor (relayd prices check lists the models)
"""  # noqa: E501


def test_table_by_key_counts_requests_refusals_tokens_and_dollars(ledger: Path) -> None:
    assert run() == (0, TABLE_BY_KEY)


def test_json_is_a_list_of_rows_with_grouping_and_numeric_fields(ledger: Path) -> None:
    code, text = run("--by", "model", "--format", "json")
    assert code == 0
    rows = json.loads(text)
    assert [row["model"] for row in rows] == ["gpt-5", "gpt-5-mini", "gpt-9"]
    gpt5 = rows[0]
    assert gpt5 == {
        "model": "gpt-5",
        "requests": 3,
        "refused": 1,
        "failed": 0,
        "input_tokens": 12_000,
        "cached_input_tokens": 8_000,
        "output_tokens": 1_500,
        "reasoning_tokens": 700,
        "audio_input_tokens": 0,
        "audio_output_tokens": 0,
        "micro_usd": 21_000,
        "usd": 0.021,
        "estimated": 1,
        "unpriced": 0,
        "refusals": {"rate_limit_exceeded": 1},
    }
    assert rows[2]["unpriced"] == 1 and rows[2]["micro_usd"] == 0


def test_csv_by_day_and_model(ledger: Path) -> None:
    code, text = run("--by", "day", "--by", "model", "--format", "csv")
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == (
        "day,model,requests,refused,failed,input_tokens,cached_input_tokens,output_tokens,"
        "reasoning_tokens,audio_input_tokens,audio_output_tokens,micro_usd,estimated,unpriced,"
        "usd,refused_rate_limit_exceeded,refused_insufficient_quota,refused_model_not_allowed,"
        "refused_model_not_priced,refused_store_unavailable"
    )
    assert lines[1:] == [
        "2026-11-30,gpt-5,1,0,0,10000,8000,1000,700,0,0,13500,0,0,0.013500,0,0,0,0,0",
        "2026-11-30,gpt-5-mini,1,0,0,1000,0,100,0,0,0,450,0,0,0.000450,0,0,0,0,0",
        "2026-12-01,gpt-5,2,1,0,2000,0,500,0,0,0,7500,1,0,0.007500,1,0,0,0,0",
        "2026-12-01,gpt-5-mini,1,1,0,0,0,0,0,0,0,0,0,0,0.000000,0,1,0,0,0",
        "2026-12-01,gpt-9,1,0,0,100,0,10,0,0,0,0,0,1,0.000000,0,0,0,0,0",
    ]


def test_until_a_date_includes_that_day_and_since_is_inclusive(ledger: Path) -> None:
    _, text = run("--until", "2026-11-30", "--format", "json")
    assert [(row["key"], row["requests"]) for row in json.loads(text)] == [
        ("alice", 1),
        ("bob", 1),
    ]
    _, text = run("--since", "2026-12-01T09:01", "--until", "2026-12-01T13:00", "--format", "json")
    assert [(row["key"], row["refused"]) for row in json.loads(text)] == [
        ("alice", 1),
        ("bob", 1),
    ]


def test_days_are_calendar_days_in_the_report_time_zone(ledger: Path) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    span = usage_span(ledger, None, None)
    assert span is not None
    days = report.day_spans(*span, berlin)
    assert [d.day for d in days] == ["2026-11-30", "2026-12-01"]
    cells = usage_cells(ledger, None, None, days)
    assert cells is not None
    rows = report.group_rows(cells, ["day", "key"], PriceBook([]))
    assert [(r.group["day"], r.group["key"], r.counts["requests"]) for r in rows] == [
        ("2026-11-30", "alice", 1),
        ("2026-12-01", "alice", 2),
        ("2026-12-01", "bob", 3),  # 23:30 UTC is 00:30 in Berlin
    ]
    moment = report.parse_moment("2026-12-01", berlin, until=False, flag="--since")
    assert moment == at("2026-11-30T23:00")
    in_berlin = updated(Settings(), spend={"timezone": "Europe/Berlin"})
    code, text = run("--by", "day", "--since", "2026-12-01", "--format", "csv", settings=in_berlin)
    assert code == 0
    assert [line.split(",")[:3] for line in text.splitlines()[1:]] == [
        ["2026-12-01", "5", "2"]
    ]  # bob at 23:30 UTC included


def test_each_key_shows_its_budget_left_and_reset(ledger: Path) -> None:
    limits = KeyLimits(usd_per_day=5_000_000, usd_total=100_000_000)
    settings = updated(Settings(), spend={"keys": {"alice": limits}})
    # The report runs at 2026-12-02T08:00 (run's now): alice spent nothing that day.
    code, text = run("--format", "json", settings=settings)
    assert code == 0
    alice, bob = json.loads(text)
    assert alice["budgets"] == [
        {
            "limit": "usd_per_day",
            "limit_micro_usd": 5_000_000,
            "spent_micro_usd": 0,
            "left_micro_usd": 5_000_000,
            "resets_at": "2026-12-03T00:00:00+00:00",
        },
        {
            "limit": "usd_total",
            "limit_micro_usd": 100_000_000,
            "spent_micro_usd": 21_000,
            "left_micro_usd": 99_979_000,
            "resets_at": None,
        },
    ]
    assert bob["budgets"] == []
    page = ledger.parent / "budgets.html"
    assert run("--html", str(page), settings=settings) == (0, "")
    assert "<td>$5.00</td><td>$0.0000</td><td>$5.0000</td>" in page.read_text(encoding="utf-8")
    _, table = run(settings=settings)
    assert table.splitlines()[-5:-2] == [
        "budgets",
        "  alice: usd_per_day $5.0000, spent $0.0000, left $5.0000, "
        "resets 2026-12-03T00:00:00+00:00",
        "  alice: usd_total $100.0000, spent $0.0210, left $99.9790, resets never",
    ]


def test_a_missing_ledger_is_no_usage_yet_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run("--format", "json") == (0, "[]\n")
    assert "no usage yet" in capsys.readouterr().err
    code, text = run()
    assert code == 0 and text.endswith("no usage in this window\n")


def test_a_ledger_that_cannot_be_read_is_one_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = ledger_path(Settings())
    path.write_bytes(b"not a database, " * 512)
    assert run() == (1, "")
    err = capsys.readouterr().err
    assert err.startswith(f"relayd: cannot read the ledger {path}: ") and "Traceback" not in err
    assert report.prices_check(Settings(), older_than_days=90, today=date.today()) == 1


def test_a_bad_date_is_a_clear_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--since", "last tuesday") == (2, "")
    assert "--since 'last tuesday' is neither a date" in capsys.readouterr().err


async def relayd(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "RELAYD_CONFIG": ""},
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_relayd_usage_reads_while_a_writer_holds_the_ledger(ledger: Path) -> None:
    writer = sqlite3.connect(ledger, isolation_level=None, timeout=0)
    writer.execute("BEGIN IMMEDIATE")  # relayd settling a request, mid-transaction
    writer.execute(
        "INSERT INTO events (at, key, model, operation, outcome) "
        "VALUES (?, 'carol', 'gpt-5', 'createResponse', 'ok')",
        (at("2026-12-01T14:00"),),
    )
    try:
        started = asyncio.get_running_loop().time()
        code, out, err = await relayd("usage", "--format", "json", "--by", "key")
        elapsed = asyncio.get_running_loop().time() - started
        assert (code, err) == (0, "")
        # The committed rows only, at once: the reader never waited for the writer.
        assert [row["key"] for row in json.loads(out)] == ["alice", "bob"]
        assert elapsed < 10
        writer.execute("COMMIT")  # and the writer was never held up by the reader
    finally:
        writer.close()
    code, out, _ = await relayd("usage", "--format", "json")
    assert [row["key"] for row in json.loads(out)] == ["alice", "bob", "carol"]


async def test_relayd_usage_reports_what_went_through_the_relay(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    """Known requests through relayd (in-process, the fake upstream), then the real
    ``relayd usage`` command over the ledger they left."""
    keys = {
        "team": KeyLimits(usd_per_day=5_000_000),
        "other": KeyLimits(models=("gpt-5*",)),
    }
    client = await relay_factory(spend={"keys": keys})
    team = {"Authorization": f"Bearer {RELAY_KEY}"}
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    async with asyncio.timeout(30):
        chat = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}
        async with client.post("/v1/chat/completions", json=chat, headers=team) as answer:
            assert answer.status == 200
        response = {"model": "gpt-5-mini", "input": "hi"}
        async with client.post("/v1/responses", json=response, headers=team) as answer:
            assert answer.status == 200
        refused = {**chat, "model": "gpt-4o"}
        async with client.post("/v1/chat/completions", json=refused, headers=other) as answer:
            assert answer.status == 403
        await client.close()  # the app's cleanup settles what is still in flight
    config = tmp_path / "relayd.toml"
    config.write_text("[spend.keys.team]\nusd_per_day = 5.0\n", encoding="utf-8")
    code, out, err = await relayd(
        "usage", "--config", str(config), "--by", "key", "--by", "model", "--format", "json"
    )
    assert (code, err) == (0, "")
    rows = {(row["key"], row["model"]): row for row in json.loads(out)}
    assert sorted(rows) == [("other", "gpt-4o"), ("team", "gpt-5"), ("team", "gpt-5-mini")]
    fields = ("requests", "refused", "input_tokens", "output_tokens", "micro_usd", "estimated")
    # gpt-5: 5 × $1.25 + 3 × $10 per million; gpt-5-mini: 11 × $0.25 + 3 × $2 (rounded up).
    assert [rows["team", "gpt-5"][name] for name in fields] == [1, 0, 5, 3, 37, 0]
    assert [rows["team", "gpt-5-mini"][name] for name in fields] == [1, 0, 11, 3, 9, 0]
    assert rows["other", "gpt-4o"]["refusals"] == {"model_not_allowed": 1}
    (day,) = rows["team", "gpt-5"]["budgets"]
    assert (day["limit"], day["spent_micro_usd"], day["left_micro_usd"]) == (
        "usd_per_day",
        46,
        5_000_000 - 46,
    )


async def test_relayd_prices_check_flags_unpriced_models_for_cron(ledger: Path) -> None:
    code, out, err = await relayd("prices", "check", "--older-than", "100000")
    assert code == 1
    assert out.splitlines() == ["unpriced  gpt-9  (1 events, last 2026-12-01)"]
    assert "1 model(s) seen without a price" in err


def test_prices_check_lists_rows_older_than_n_days(
    ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = io.StringIO()
    assert report.prices_check(Settings(), older_than_days=0, today=date(2030, 1, 1), out=out) == 1
    stale = [line for line in out.getvalue().splitlines() if line.startswith("stale")]
    assert len(stale) == len(PriceBook.load(Settings()).rows)
    assert any(line.startswith("stale     gpt-5  checked 2025-11-13") for line in stale)


def test_prices_check_passes_when_all_is_priced_and_fresh(
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_ledger([row for row in KNOWN if row[2] != "gpt-9"])
    out = io.StringIO()
    code = report.prices_check(Settings(), older_than_days=100_000, today=date.today(), out=out)
    assert (code, out.getvalue()) == (0, "")
    assert "every model seen (2) has a price" in capsys.readouterr().err


# The HTML page.

HOSTILE = '<img src=x onerror="alert(1)">&'


@pytest.fixture
def page_file(tmp_path: Path) -> Iterator[Path]:
    rows = list(KNOWN)
    rows.append(
        (at("2026-12-01T15:00"), HOSTILE, "gpt-5</text><script>x()</script>", "createResponse",
         "ok", "", 500, 0, 50, 0, 1_200, 0)
    )  # fmt: skip
    write_ledger(rows)
    path = tmp_path / "usage.html"
    assert run("--html", str(path)) == (0, "")
    yield path


def test_the_page_is_self_contained_and_escapes_every_name(page_file: Path) -> None:
    text = page_file.read_text(encoding="utf-8")
    assert "<script" not in text and "onerror=" not in text.replace("onerror=&quot;", "")
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;" in text  # legend and table
    assert "gpt-5&lt;/text&gt;&lt;script&gt;x()&lt;/script&gt;" in text
    for fetch in ("src=", "href=", "url(", "@import", "<link", "<iframe", "<img"):
        assert fetch not in text.replace("&lt;img src=", ""), fetch
    assert text.count("<svg") == 2
    assert ">alice (" in text and ">bob (" in text  # the legend names the keys


def test_keys_beyond_the_palette_share_one_band_named_in_the_legend() -> None:
    cells = [
        UsageCell("2026-12-01", f"key{n:02d}", "gpt-5", "ok", "", 1, 0, 0, 0, 0, 0, 0, 0, 1000 * n)
        for n in range(1, 13)
    ]
    window = report.Window(None, None, ZoneInfo("UTC"), "UTC")
    text = page(cells, window, PriceBook([]), {}, generated=at("2026-12-02T00:00"))
    legend = text[text.index('<ul class="legend">') : text.index("</ul>")]
    named = [f"key{n:02d}" for n in range(12, 4, -1)]  # the eight biggest spenders
    assert [name for name in named if f"</span>{name} (" in legend] == named
    assert "key04 (" not in legend
    assert "</span>other keys ($0.0100)" in legend  # keys 1 to 4: 1+2+3+4 thousand


async def test_the_page_renders_in_headless_chromium(page_file: Path, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(
            "LOUD SKIP: chromium is not installed, the usage page was NOT rendered "
            "(.ci/run installs the Debian package)"
        )
    shot = tmp_path / "usage.png"
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *headless_args(tmp_path / "profile"),
        f"--screenshot={shot}",
        "--window-size=1200,900",
        page_file.as_uri(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(60):
        await process.wait()
    width, height, pixels = read_png(shot.read_bytes())
    assert (width, height) == (1200, 900)
    colors: dict[tuple[int, int, int], int] = {}
    for pixel in pixels:
        colors[pixel] = colors.get(pixel, 0) + 1
    assert len(colors) > 50, "the screenshot is blank"
    # The stacked bars were drawn: alice's and bob's colours (the two biggest spenders
    # after the hostile key) cover real areas of the chart.
    for hex_color in PALETTE[:3]:
        red, green, blue = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
        assert colors.get((red, green, blue), 0) > 300, hex_color


def read_png(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """An 8-bit RGB/RGBA, non-interlaced PNG (what Chromium writes) as RGB pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat, header = 8, b"", b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color_type in (2, 6) and interlace == 0
    channels = 3 if color_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    previous = bytearray(stride)
    pixels: list[tuple[int, int, int]] = []
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            upper_left = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                estimate = left + up - upper_left
                pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - upper_left)
                nearest = left if pa <= pb and pa <= pc else up if pb <= pc else upper_left
                line[i] = (line[i] + nearest) & 0xFF
        pixels.extend((line[i], line[i + 1], line[i + 2]) for i in range(0, stride, channels))
        previous = line
    return width, height, pixels
