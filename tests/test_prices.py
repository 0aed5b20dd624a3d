"""The price table and token counts: each token priced once, at the right rate."""

from __future__ import annotations

import tomllib
from datetime import date
from importlib import resources
from pathlib import Path

import pytest

from relayd.config import ConfigError, Settings, updated
from relayd.spend.prices import (
    RATE_KEYS,
    PriceBook,
    PriceTableError,
    Tokens,
    flat_unit,
    parse_table,
    tokens_from_usage,
)

CONF = Path(__file__).resolve().parent.parent / "conf" / "prices.toml"


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.load(Settings())


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_installed_package_carries_the_shipped_table() -> None:
    shipped = resources.files("relayd.spend").joinpath("prices.toml").read_bytes()
    assert shipped == CONF.read_bytes()


def test_every_shipped_row_names_its_source_and_check_date(book: PriceBook) -> None:
    document = tomllib.loads(CONF.read_text(encoding="utf-8"))
    assert len(book.rows) == len(document["models"]) >= 70
    for row in book.rows:
        assert row.source in book.sources, row.model
        assert date(2025, 1, 1) <= row.checked <= date.today(), row.model
        assert row.rates is not None or row.flat, row.model


def test_cached_tokens_priced_once_at_the_cached_rate(book: PriceBook) -> None:
    # gpt-5: $1.25 input, $0.125 cached input, $10 output per million tokens.
    usage = {
        "input_tokens": 10_000,
        "input_tokens_details": {"cached_tokens": 8_000},
        "output_tokens": 1_000,
        "output_tokens_details": {"reasoning_tokens": 700},
    }
    tokens = tokens_from_usage(usage)
    assert tokens == Tokens(input=10_000, cached_input=8_000, output=1_000, reasoning=700)
    # 2,000 fresh × 1.25 + 8,000 cached × 0.125 + 1,000 output × 10 (reasoning inside).
    assert book.token_cost("gpt-5", tokens) == 2_500 + 1_000 + 10_000


def test_reasoning_is_part_of_output_not_added(book: PriceBook) -> None:
    plain = book.token_cost("o3", Tokens(input=100, output=500))
    reasoned = book.token_cost("o3", Tokens(input=100, output=500, reasoning=450))
    assert plain == reasoned == 100 * 2 + 500 * 8


def test_chat_completions_usage_shape(book: PriceBook) -> None:
    usage = {
        "prompt_tokens": 1_200,
        "completion_tokens": 300,
        "total_tokens": 1_500,
        "prompt_tokens_details": {"cached_tokens": 1_024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0},
    }
    tokens = tokens_from_usage(usage)
    assert (tokens.input, tokens.cached_input, tokens.output, tokens.reasoning) == (
        1_200,
        1_024,
        300,
        128,
    )
    # gpt-4o-mini: $0.15 / $0.075 cached / $0.60 output: 26.4 + 76.8 + 180 → 284 (rounded up).
    assert book.token_cost("gpt-4o-mini", tokens) == 284


def test_embeddings_have_input_only(book: PriceBook) -> None:
    tokens = tokens_from_usage({"prompt_tokens": 3, "total_tokens": 3})
    assert tokens == Tokens(input=3)
    # $0.02 per million: 0.06 micro-dollars, rounded up to 1, never free.
    assert book.token_cost("text-embedding-3-small", tokens) == 1


def test_realtime_cached_audio_priced_at_its_own_rate(book: PriceBook) -> None:
    usage = {  # a response.done usage
        "total_tokens": 1_300,
        "input_tokens": 1_000,
        "output_tokens": 300,
        "input_token_details": {
            "text_tokens": 200,
            "audio_tokens": 800,
            "image_tokens": 0,
            "cached_tokens": 600,
            "cached_tokens_details": {"text_tokens": 100, "audio_tokens": 500},
        },
        "output_token_details": {"text_tokens": 100, "audio_tokens": 200},
    }
    tokens = tokens_from_usage(usage)
    assert tokens == Tokens(
        input=1_000,
        cached_input=600,
        output=300,
        audio_input=800,
        audio_output=200,
        cached_audio_input=500,
    )
    # gpt-realtime-mini: text 0.6, cached text 0.06, audio 10, cached audio 0.3,
    # text out 2.4, audio out 20 (USD per million = micro-dollars per token).
    expected = 100 * 0.6 + 100 * 0.06 + 500 * 0.3 + 300 * 10 + 100 * 2.4 + 200 * 20
    assert book.token_cost("gpt-realtime-mini", tokens) == round(expected)


def test_every_token_counted_once_whatever_its_kind() -> None:
    rates = "".join(f"{key} = 1\n" for key in RATE_KEYS)
    rows, _ = parse_table(
        f'[models."m"]\n{rates}source = "s"\nchecked = 2026-01-01\n', origin="test"
    )
    book = PriceBook(rows)
    mixed = Tokens(
        input=1_000,
        cached_input=600,
        cached_audio_input=500,
        audio_input=800,
        image_input=150,
        output=300,
        reasoning=50,
        audio_output=200,
        image_output=60,
    )
    assert book.token_cost("m", mixed) == 1_300


def test_image_tokens_priced_at_image_rates(book: PriceBook) -> None:
    usage = {
        "input_tokens": 300,
        "input_tokens_details": {"text_tokens": 50, "image_tokens": 250},
        "output_tokens": 4_000,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 4_000},
    }
    tokens = tokens_from_usage(usage)
    # gpt-image-1.5: text in 5, image in 8, image out 32.
    assert book.token_cost("gpt-image-1.5", tokens) == 50 * 5 + 250 * 8 + 4_000 * 32


def test_parts_never_exceed_their_whole() -> None:
    tokens = tokens_from_usage(
        {
            "input_tokens": 10,
            "input_tokens_details": {"cached_tokens": 50},
            "output_tokens": "many",
            "output_tokens_details": {"reasoning_tokens": 9},
        }
    )
    assert tokens == Tokens(input=10, cached_input=10)
    assert tokens_from_usage({}) == Tokens()


def test_long_context_rates_apply_to_the_whole_request(book: PriceBook) -> None:
    # gpt-5.4: 2.5 / 15 up to 272,000 input tokens; 5 / 22.5 beyond, for every token.
    assert book.token_cost("gpt-5.4", Tokens(input=272_000, output=1_000)) == 680_000 + 15_000
    assert book.token_cost("gpt-5.4", Tokens(input=272_001, output=1_000)) == 1_360_005 + 22_500


def test_dated_snapshots_take_their_family_price(book: PriceBook) -> None:
    assert book.price("gpt-5-mini-2025-08-07") is book.price("gpt-5-mini")
    assert book.price("gpt-4o-2024-08-06") is book.price("gpt-4o")
    assert not book.knows("gpt-9")
    assert book.token_cost("gpt-9", Tokens(input=1)) is None
    assert book.flat_cost("gpt-9", "image", 1) is None


def test_flat_prices_fall_back_to_the_shorter_unit(book: PriceBook) -> None:
    hd = flat_unit("image", "1792x1024", "hd")
    assert book.flat_cost("dall-e-3", hd, 2) == 240_000
    standard = flat_unit("image", "1024x1024", "standard")
    assert book.flat_cost("dall-e-3", standard, 1) == 40_000
    assert book.flat_cost("dall-e-3", "image", 1) == 40_000
    assert book.flat_cost("sora-2", flat_unit("video_second", "1280x720"), 8) == 800_000
    assert book.flat_cost("sora-2-pro", flat_unit("video_second", "1792x1024"), 4) == 2_000_000
    assert book.flat_cost("sora-2", flat_unit("video_second"), 2.5) == 250_000
    assert book.flat_cost("sora-2", "character", 10) is None
    assert book.knows("dall-e-3") and book.token_cost("dall-e-3", Tokens(input=5)) is None


def test_moderations_are_priced_at_zero(book: PriceBook) -> None:
    assert book.token_cost("omni-moderation-latest", Tokens(input=1_000)) == 0


def test_output_estimate_defaults_and_per_row(tmp_path: Path, book: PriceBook) -> None:
    assert book.estimate_output("gpt-5") == 4096
    overrides = write(
        tmp_path,
        '[models."gpt-5"]\ninput = 1\noutput = 2\noutput_estimate = 800\n'
        'source = "our contract"\nchecked = 2026-11-30\n',
    )
    assert PriceBook.load(Settings(), overrides).estimate_output("gpt-5-2025-08-07") == 800


def test_operator_rows_replace_shipped_rows_and_keep_their_aliases(tmp_path: Path) -> None:
    overrides = write(
        tmp_path,
        """
[sources]
contract = "our enterprise contract, 2026"

[models."gpt-5"]
input = 1.0
output = 8.0
source = "contract"
checked = 2026-11-30

[models."team-finetune"]
input = 3
cached_input = 1.5
output = 12
aliases = ["ft:gpt-4.1:team::abc"]
source = "contract"
checked = 2026-11-30
""",
    )
    book = PriceBook.load(Settings(), overrides)
    gpt5 = book.price("gpt-5-chat-latest")  # a shipped alias, kept
    assert gpt5 is not None and gpt5.origin == str(overrides)
    assert book.source_of(gpt5) == "our enterprise contract, 2026"
    # The whole row is replaced: no cached discount unless the operator names one.
    assert book.token_cost("gpt-5", Tokens(input=1_000, cached_input=1_000, output=10)) == 1_080
    assert book.token_cost("ft:gpt-4.1:team::abc", Tokens(input=100, output=10)) == 420
    assert book.knows("gpt-5-mini")  # rows the operator did not name stay


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models."x"]\ninput = 1\nsource = "s"\n', "checked = <date"),
        ('[models."x"]\ninput = 1\nchecked = 2026-01-01\n', "source ="),
        ('[models."x"]\ninput = 1\ninptu = 2\nsource = "s"\nchecked = 2026-01-01\n', "'inptu'"),
        ('[models."x"]\ninput = -1\nsource = "s"\nchecked = 2026-01-01\n', "negative"),
        ('[models."x"]\ninput = 1e-9\nsource = "s"\nchecked = 2026-01-01\n', "finer"),
        ('[models."x"]\ninput = "1"\nsource = "s"\nchecked = 2026-01-01\n', "number"),
        ('[models."x"]\nsource = "s"\nchecked = 2026-01-01\n', "token prices"),
        ('[models."x"]\noutput = 1\nsource = "s"\nchecked = 2026-01-01\n', "need input"),
        (
            '[models."x"]\ninput = 1\naliases = ["gpt-5"]\nsource = "s"\nchecked = 2026-01-01\n',
            "'gpt-5' names both",
        ),
        ("[prices]\n", "unknown table 'prices'"),
        ('[models."x"\n', "not valid TOML"),
    ],
)
def test_a_bad_operator_file_is_refused_with_the_row_named(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PriceTableError) as caught:
        PriceBook.load(Settings(), path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ConfigError)  # the CLI's exit 2, one line


def test_a_missing_operator_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(PriceTableError, match="cannot read the price file"):
        PriceBook.load(Settings(), tmp_path / "absent.toml")


def test_spend_settings_choose_the_file_the_estimate_and_unpriced_policy(
    tmp_path: Path,
) -> None:
    overrides = write(
        tmp_path,
        '[models."team-model"]\ninput = 1\nsource = "ours"\nchecked = 2026-11-30\n',
    )
    settings = updated(
        Settings(),
        spend={
            "prices_file": str(overrides),
            "allow_unpriced": True,
            "default_output_tokens": 1000,
        },
    )
    book = PriceBook.load(settings)
    assert book.knows("team-model") and book.knows("gpt-5")
    assert book.allow_unpriced and book.estimate_output("gpt-5") == 1000
