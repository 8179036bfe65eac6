"""bench/learning_table.py for real, shrunk: the base and SFT rows rebuild a small tiny model."""

import json

from tests.conftest import run_script


def test_base_and_sft_rows_on_a_shrunk_rebuild(tmp_path):
    shrunk = "--TOKENIZER_CORPUS_SIZE=300,--VOCAB_SIZE=400,--SFT_STEPS=2,--SFT_BATCH_SIZE=4,--EVAL_LIMIT=4"
    result = run_script(["bench/learning_table.py", "--ROWS=base,sft", f"--REBUILD_ARGS={shrunk}",
                         f"--REBUILD_DIR={tmp_path / 'rebuild'}", f"--LOG_DIR={tmp_path / 'logs'}",
                         f"--OUT_FILE={tmp_path / 'table.json'}"])
    table = json.loads((tmp_path / "table.json").read_text())["results"]
    assert [row["row"] for row in table["rows"]] == ["base", "sft"]
    for row in table["rows"]:
        assert row["total"] == 4 and 0 <= row["correct"] <= 4 and row["seconds"] > 0
        assert row["ci_low"] <= row["accuracy"] <= row["ci_high"]
        assert (tmp_path / "logs" / f"{row['row']}.log").stat().st_size > 0
    # The base row trained nothing; a 2-step rebuild with another vocabulary is not the committed model.
    assert "0 steps" in (tmp_path / "logs" / "base.log").read_text()
    assert table["rows"][1]["equals_committed_model"] is False
    assert "| base (random init) |" in result.stdout and "DIFFERS FROM" in result.stdout
