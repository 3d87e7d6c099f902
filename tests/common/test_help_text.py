"""--help as users read it: an example first, each default once, 0/1 flags as {0,1}, a short usage line;
and the one settings format every command prints at its start."""

from __future__ import annotations

import re

import pytest

import build_lmdb
from lib.common.cli import flag_bool, make_parser, settings_table
from lib.common.help_text import EXAMPLES, example

CLIS = ("build_lmdb.py", "train_unet.py", "train_fcn.py", "inference.py", "fuse_masks.py")


def _help(parser) -> str:
    return parser.format_help()


def _flag_blocks(text: str) -> dict[str, str]:
    """``{flag: its help text}`` from a --help page (argparse's two-column layout)."""
    blocks, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (--[a-z_]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def test_every_cli_has_an_example_that_runs_that_cli():
    for prog in CLIS:
        shown = example(prog)
        assert shown and shown.startswith(f"python {prog} "), prog
    assert example("/some/path/build_lmdb.py") == EXAMPLES["build_lmdb.py"]
    assert example("other.py") is None and example(None) is None


def test_build_help_opens_with_its_example_and_shows_each_default_once():
    text = _help(build_lmdb.make_build_parser())
    assert text.startswith("example:\n  python build_lmdb.py --image_folder images")
    assert text.index("example:") < text.index("usage:")
    usage = text[text.index("usage:"):text.index("\n\n", text.index("usage:"))]
    assert usage.rstrip().endswith("[options]") and "--tile_size" not in usage
    blocks = _flag_blocks(text)
    assert "(default: None)" not in text
    for flag, block in blocks.items():
        assert block.lower().count("default") <= 1, (flag, block)
    assert "{0,1}" in blocks["--use_tiling"] and "(default: 1)" in blocks["--use_tiling"]
    assert "(default: 256)" in blocks["--tile_size"]
    assert "default: tile_size" in blocks["--stride"] and "(default" not in blocks["--stride"].replace(
        "(default: tile_size", "")
    assert "(default" not in blocks["--overwrite"]  # an on/off switch has no default to show


def test_make_parser_rules_for_any_cli():
    parser = make_parser("A tool.", prog="inference.py")
    parser.add_argument("--needed", required=True, help="a required flag")
    parser.add_argument("--switch", type=flag_bool, nargs="?", const=True, default=False, help="on or off")
    parser.add_argument("--pair", type=float, nargs=2, default=(1.0, 99.8), help="two numbers")
    parser.add_argument("--rate", type=float, default=0.5, help="a rate in %% of the total")
    text = _help(parser)
    assert text.startswith("example:\n  python inference.py")
    blocks = _flag_blocks(text)
    assert "[{0,1}]" in blocks["--switch"] and "(default: 0)" in blocks["--switch"]
    assert "(default: 1.0 99.8)" in blocks["--pair"]
    assert "a rate in % of the total (default: 0.5)" in blocks["--rate"]
    assert "(default" not in blocks["--needed"]
    assert parser.parse_args(["--needed", "x", "--switch", "0"]).switch is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--needed", "x", "--switch", "maybe"])


def test_settings_are_printed_as_one_short_table():
    text = settings_table("train_unet.py", {"output_dir": "runs/a", "batch_size": 8, "use_augmentation": True,
                                            "percentiles": (1.0, 99.8)},
                          {"batch_size": 8, "use_augmentation": False, "percentiles": (1.0, 99.8)},
                          "runs/a/train_config.json")
    assert text.splitlines() == ["train_unet.py settings:", "  output_dir        runs/a",
                                 "  use_augmentation  1", "  (2 more at their defaults; all in runs/a/train_config.json)"]
    assert settings_table("x", {"a": 1}) == "x settings:\n  a  1"


def test_the_build_prints_the_table_and_records_every_setting(tmp_path, capsys):
    from tests.conftest import write_pairs

    folder = write_pairs(tmp_path / "data", [(40, 40)] * 3, n_classes=2)
    out = tmp_path / "db"
    assert build_lmdb.main(["--image_folder", str(folder / "images"), "--mask_folder", str(folder / "masks"),
                            "--output_folder", str(out), "--dataset_name", "h", "--tile_size", "32",
                            "--workers", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("build_lmdb.py settings:\n  image_folder ")
    assert "(build_config))" in printed and "  tile_size      32" in printed
    assert sorted(p.name for p in out.iterdir()) == ["split-h.csv", "test-h.lmdb", "train-h.lmdb"]
    from lib.store.lmdb_store import LmdbReader

    with LmdbReader(out / "train-h.lmdb") as reader:
        saved = reader.metadata["build_config"]
    assert saved["tile_size"] == 32 and saved["train_fraction"] == 0.8
