"""Metrics sinks: JSONL rows, console line, TensorBoard events, plots, resume truncation."""

import json

from grpo_jax.config import LoggingConfig
from grpo_jax.metrics import MetricsLogger, plot_run, read_metrics, running_mean


def test_jsonl_console_and_tensorboard(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=True), total_steps=5)
    logger.log(1, {"reward/mean": 0.25, "loss": 0.1, "kl": float("nan")})
    logger.log(2, {"reward/mean": 0.5, "reward/accuracy/mean": 0.5, "loss": 0.05})
    logger.log_samples(2, [{"prompt": "What is 1 + 1?", "completion": "2", "reward": 1.0}])
    logger.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] is None and rows[1]["reward/mean"] == 0.5
    out = capsys.readouterr().out
    assert "step 1/5 | reward 0.250 | loss +0.1000" in out and "kl" not in out.splitlines()[0]
    assert "=> 2" in out
    assert list((tmp_path / "tensorboard").iterdir())
    assert json.loads((tmp_path / "samples.jsonl").read_text())["completion"] == "2"


def test_non_main_process_writes_nothing(tmp_path, capsys):
    logger = MetricsLogger(tmp_path / "x", LoggingConfig(), total_steps=1, is_main=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "x").exists() and capsys.readouterr().out == ""


def test_cut_back_keeps_the_rows_a_checkpoint_recorded_and_drops_torn_lines(tmp_path):
    logger = MetricsLogger(tmp_path, LoggingConfig(), total_steps=5)
    for s in range(1, 6):
        logger.log(s, {"loss": s}, console=False)
        logger.log_samples(s, [{"prompt": "p", "completion": "c", "reward": 1.0}], limit=1)
        if s == 3:
            recorded = dict(logger.rows)
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    assert recorded == {"metrics": 3, "samples": 3}
    resumed = MetricsLogger(tmp_path, LoggingConfig(), total_steps=5)
    resumed.cut_back(recorded)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3
    resumed.log(4, {"loss": 4.0}, console=False)
    assert resumed.rows["metrics"] == 4
    resumed.close()
    MetricsLogger(tmp_path, LoggingConfig(), total_steps=5).cut_back(None)  # a fresh start: no rows
    assert read_metrics(tmp_path) == [] and (tmp_path / "samples.jsonl").read_text() == ""


def test_plots_are_written(tmp_path):
    logger = MetricsLogger(tmp_path, LoggingConfig(), total_steps=3)
    for s in range(1, 4):
        logger.log(s, {"reward/mean": s / 3, "reward/accuracy/mean": s / 4, "kl": 0.01 * s, "clip_ratio/region": 0.0,
                       "completion/mean_length": 10 + s}, console=False)
    logger.close()
    names = sorted(p.name for p in plot_run(tmp_path))
    assert names == ["clip_ratio.png", "completion_length.png", "kl.png", "reward.png", "reward_per_function.png"]
    assert all((tmp_path / "plots" / n).stat().st_size > 1000 for n in names)


def test_running_mean_averages_the_last_window_values():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0], 5) == [2.0]


def test_wandb_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    import pytest

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ValueError, match="pip install wandb"):
        MetricsLogger(tmp_path, LoggingConfig(wandb=True), total_steps=1)


def test_progress_bar_in_a_terminal_shows_the_key_numbers(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, LoggingConfig(), total_steps=4, interactive=True)
    logger.log(2, {"reward/mean": 0.75, "loss": 0.01})
    logger.close()
    err = capsys.readouterr().err  # tqdm draws on stderr
    assert "2/4" in err and "reward 0.750" in err
